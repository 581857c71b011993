"""Sharding (byte-identical, atomic, bad input) and the streaming loader (equal batches per rank)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.augment import draw
from pipeline.data.loader import RawSample, TrainStream, read_shard, train_loader
from pipeline.data.manifest import Manifest, ShardRef, load_manifest, shard_refs
from pipeline.data.readers import make_reader
from pipeline.data.shard import shard_dataset
from pipeline.errors import DataError
from pipeline.sections import DataParams
from tests.conftest import CAMVID, label_grid, synthetic, write_image, write_label

runner = CliRunner()


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_shards_are_byte_identical_across_runs(tmp_path: Path) -> None:
    a = shard_dataset(synthetic(), ("train", "val"), tmp_path / "a", max_count=3, workers=2)
    b = shard_dataset(synthetic(), ("train", "val"), tmp_path / "b", max_count=3, workers=1)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert a == b
    names = [s.name for s in a.splits["train"].shards]
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s.samples for s in a.splits["train"].shards] == [3, 3, 1]
    with tarfile.open(tmp_path / "a" / names[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == [
        "synthetic_train_000000.json", "synthetic_train_000000.png", "synthetic_train_000000.seg.png",
    ]  # fmt: skip
    assert {(m.mtime, m.uname, m.gname, m.mode) for m in members} == {(0, "", "", 0o444)}


def test_manifest_contents_and_raw_labels(tmp_path: Path) -> None:
    reader = synthetic()
    manifest = shard_dataset(reader, ("train", "val"), tmp_path / "s", max_count=4)
    assert manifest.dataset == "synthetic"
    assert len(manifest.classes) == len(manifest.palette) == 11
    train = manifest.splits["train"]
    assert train.samples == 7
    assert sum(train.class_pixels) + train.ignore_pixels == 7 * 64 * 48
    assert all(0 < m < 1 for m in manifest.mean) and all(0 < s < 1 for s in manifest.std)
    for shard in train.shards:
        path = tmp_path / "s" / shard.name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard.sha256
        assert path.stat().st_size == shard.bytes
    assert load_manifest(tmp_path / "s") == manifest  # what was written reads back the same
    # Labels come back exactly as the reader produced them (single-channel PNG, raw decode).
    key, _, label = next(read_shard(str(tmp_path / "s" / train.shards[0].name)))
    assert np.array_equal(label, reader.read(reader.items("train")[0]).train_ids)
    with tarfile.open(tmp_path / "s" / "train-000000.tar") as tar:
        member = tar.extractfile(f"{key}.json")
        assert member is not None
        meta = json.loads(member.read())
    assert meta == {"source": "synthetic:seed=0:train:0", "width": 64, "height": 48}


def test_jpeg_reencoding(tmp_path: Path) -> None:
    manifest = shard_dataset(
        synthetic(2, 1), ("train",), tmp_path / "j", image_format="jpg", jpeg_quality=80
    )
    with tarfile.open(tmp_path / "j" / manifest.splits["train"].shards[0].name) as tar:
        assert sorted(m.name.split(".", 1)[1] for m in tar.getmembers()) == [
            "jpg",
            "jpg",
            "json",
            "json",
            "seg.png",
            "seg.png",
        ]


def bad_camvid(root: Path) -> Path:
    for i in range(3):
        write_image(root / f"val/img{i}.png")
        write_label(root / f"valannot/img{i}.png", label_grid([1, 2, 11]))
    write_label(root / "valannot/img1.png", label_grid([1, 99]))  # value outside the classes
    return root


def test_cli_bad_input_one_line_error_and_nothing_written(tmp_path: Path) -> None:
    root = bad_camvid(tmp_path / "camvid")
    out = tmp_path / "out"
    args = [
        "shard",
        "--dataset",
        "camvid",
        "--root",
        str(root),
        "--out",
        str(out),
        "--splits",
        "val",
        "--workers",
        "1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"error: {root}/valannot/img1.png: label value 99 is outside CamVid's 0..11"
    )
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_failed_run_leaves_previous_output_untouched(tmp_path: Path) -> None:
    root = bad_camvid(tmp_path / "camvid")
    out = tmp_path / "out"
    shard_dataset(synthetic(2, 1), ("train",), out)
    before = digest(out)
    with pytest.raises(DataError, match=r"img1\.png"):
        shard_dataset(make_reader("camvid", root), ("val",), out)
    assert digest(out) == before


def test_skip_mode_lists_bad_samples(tmp_path: Path) -> None:
    root = bad_camvid(tmp_path / "camvid")
    manifest = shard_dataset(
        make_reader("camvid", root), ("val",), tmp_path / "out", on_error="skip"
    )
    val = manifest.splits["val"]
    assert val.samples == 2
    assert len(val.skipped) == 1 and val.skipped[0].path.endswith("valannot/img1.png")
    assert "outside" in val.skipped[0].error


# --- loader ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[ShardRef], Manifest]:
    out = tmp_path_factory.mktemp("uneven") / "s"
    shard_dataset(synthetic(11, 5), ("train", "val"), out, max_count=4)  # 4 + 4 + 3
    manifest = load_manifest(out)
    return shard_refs(manifest, "train"), manifest


def stream(
    refs: list[ShardRef], manifest: Manifest, rank: int, world: int, epoch: int = 0
) -> TrainStream:
    s = TrainStream(
        refs,
        batch_size=2,
        batches_per_epoch=5,
        augment=DataParams(crop_size=32),
        mean=manifest.mean,
        std=manifest.std,
        rank=rank,
        world_size=world,
        seed=1,
        shuffle_buffer=4,
    )
    s.set_epoch(epoch)
    return s


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_two_ranks_get_equal_batch_counts_from_uneven_shards(
    uneven_shards: tuple[list[ShardRef], Manifest], loader_workers: int
) -> None:
    urls, manifest = uneven_shards
    counts = []
    for rank in range(2):
        batches = list(train_loader(stream(urls, manifest, rank, 2), loader_workers))
        counts.append(len(batches))
        assert all(x.shape == (2, 3, 32, 32) and y.shape == (2, 32, 32) for x, y in batches)
    assert counts == [5, 5]


def labels(s: TrainStream) -> list[torch.Tensor]:
    return [batch[1] for batch in s if isinstance(batch, tuple)]


def test_data_order_reproducible_from_seed_epoch_rank(
    uneven_shards: tuple[list[ShardRef], Manifest],
) -> None:
    urls, manifest = uneven_shards
    first = labels(stream(urls, manifest, 0, 2, epoch=3))
    again = labels(stream(urls, manifest, 0, 2, epoch=3))
    other_epoch = labels(stream(urls, manifest, 0, 2, epoch=4))
    other_rank = labels(stream(urls, manifest, 1, 2, epoch=3))
    assert len(first) == 5
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other_epoch, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other_rank, strict=True))


def test_augmentation_pads_labels_with_ignore_and_flips_jointly() -> None:
    """One sample as the loader builds it (``TrainStream.build``: decode, the draw applied to
    image and label, normalise)."""
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    image[:, :10] = 255  # left half white
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    label = torch.zeros(10, 20, dtype=torch.uint8)
    label[:, :10] = 1
    params = DataParams(crop_size=24, scale_min=1.0, scale_max=1.0, flip=True)
    stream = TrainStream([], 1, 1, params, [0.5] * 3, [0.5] * 3)
    raw = RawSample("x", png.getvalue(), "png", b"")
    for seed in range(6):
        x, y = stream.build(raw, draw(10, 20, params, np.random.default_rng(seed)), label)
        assert isinstance(x, torch.Tensor) and x.shape == (3, 24, 24) and y.shape == (24, 24)
        valid = y != 255
        assert valid.sum() == 10 * 20  # the padding is all ignore
        white = x[0] > 0.9
        assert torch.equal(white & valid, (y == 1))  # image and label moved together


def test_cli_shards_synthetic_default_from_params(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "synthetic: {num_samples: {train: 5, val: 2}, width: 64, height: 48, seed: 0}\n"
        f"shard: {{dataset: synthetic, out: {tmp_path / 'shards'}, max_count: 2, workers: 1}}\n"
    )
    result = runner.invoke(app, ["shard", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "train: 5 samples in 3 shards" in result.output
    manifest = load_manifest(tmp_path / "shards")
    assert manifest.dataset == "synthetic" and manifest.splits["val"].samples == 2
    params.write_text("shard: {max_count: 0}\n")
    result = runner.invoke(app, ["shard", "--params", str(params)])
    assert result.exit_code == 2
    assert result.output.strip() == "error: shard.max_count must be >= 1, got 0"
    params.write_text("shard: {max_cuont: 3}\n")
    result = runner.invoke(app, ["shard", "--params", str(params)])
    assert "error: shard.max_cuont is not a known param" in result.output


@pytest.mark.slow
@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_cli_shards_real_camvid(tmp_path: Path) -> None:
    out = tmp_path / "camvid"
    args = [
        "shard",
        "--dataset",
        "camvid",
        "--root",
        str(CAMVID),
        "--out",
        str(out),
        "--workers",
        "2",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    train, val = manifest.splits["train"], manifest.splits["val"]
    assert (train.samples, val.samples) == (367, 101)
    assert train.ignore_pixels > 0  # Unlabelled (11) became 255
    assert sum(val.class_pixels) + val.ignore_pixels == 101 * 480 * 360


def test_gpu_path_applies_the_cpu_paths_draws(tmp_path: Path) -> None:
    """The GPU path (run here on the CPU device) decodes JPEGs in the batch and applies the draws
    the workers made; for one seed it gives the CPU path's labels exactly and its images within
    rounding (uint8 vs float resizing)."""
    from pipeline.data.gpu import decode_batch
    from pipeline.data.loader import RawBatch

    shard_dataset(synthetic(6, 1), ("train",), tmp_path / "j", image_format="jpg", max_count=3)
    manifest = load_manifest(tmp_path / "j")
    refs = shard_refs(manifest, "train")
    augment = DataParams(crop_size=40, scale_min=0.6, scale_max=1.4, photometric=True)

    def make(gpu: bool) -> TrainStream:
        return TrainStream(
            refs,
            batch_size=3,
            batches_per_epoch=2,
            augment=augment,
            mean=manifest.mean,
            std=manifest.std,
            seed=5,
            shuffle_buffer=4,
            gpu_decode=gpu,
        )

    cpu = [b for b in make(False) if isinstance(b, tuple)]
    raw = [b for b in make(True) if isinstance(b, RawBatch)]
    assert len(cpu) == len(raw) == 2
    assert all(t.dim() == 1 for b in raw for t in b.images)  # the workers left the JPEGs encoded
    for (x_cpu, y_cpu), batch in zip(cpu, raw, strict=True):
        x_gpu, y_gpu = decode_batch(batch, 40, manifest.mean, manifest.std, torch.device("cpu"))
        assert torch.equal(y_cpu, y_gpu)
        assert x_gpu.shape == x_cpu.shape == (3, 3, 40, 40)
        assert (x_gpu - x_cpu).abs().mean() < 0.03, (x_gpu - x_cpu).abs().mean()
