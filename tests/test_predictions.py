"""The one loop of a model over shards (pipeline/data/predictions.py): each image once, whatever
the ranks and loader workers; the labels ``label_map`` gives; bad labels named."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from danet.inference import Protocol, label_map, to_input
from pipeline.artifacts.refs import load_model
from pipeline.data.manifest import ShardRef, load_manifest, shard_refs
from pipeline.data.predictions import ShardImages, confusion, prediction_rows, predictions
from pipeline.errors import DataError
from tests.conftest import write_model_file


def test_shard_images_cover_each_image_once(tiny_shards: Path) -> None:
    refs = shard_refs(load_manifest(tiny_shards), "val")
    assert len(refs) > 1  # more shards than one: the split among ranks and workers is tested
    once = [k for _, k, _, _ in ShardImages(refs)]
    split = [k for rank in range(2) for _, k, _, _ in ShardImages(refs, rank, 2)]
    assert len(once) == 4 and sorted(split) == sorted(once)

    def loaded(rank: int) -> list[str]:  # rank of 2, read by 2 loader workers
        images = ShardImages(refs, rank, 2)
        return [k for _, k, _, _ in torch.utils.data.DataLoader(images, None, num_workers=2)]

    assert sorted(loaded(0) + loaded(1)) == sorted(once)


def test_to_input_scales_every_byte_as_a_true_division() -> None:
    image = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    x = to_input(torch.from_numpy(image), "cpu")
    assert x.shape == (1, 3, 16, 16)
    assert torch.equal(x.flatten(), (torch.arange(256).double() / 255).float().repeat(3))
    assert torch.equal(x, to_input(image))


def test_predictions_are_label_map_and_rows_come_in_shard_order(
    tiny_shards: Path, tmp_path: Path
) -> None:
    module = load_model(str(write_model_file(tmp_path / "model.pt", tiny_shards))).module
    refs = shard_refs(load_manifest(tiny_shards), "val")
    protocol = Protocol(scales=(0.75, 1.0), flip=True)
    got = list(predictions(module, refs, "cpu", protocol))
    assert [p.key for p in got] == [k for _, k, _, _ in ShardImages(refs)]
    for p in got:
        assert torch.equal(
            p.predicted.to(torch.uint8),
            torch.from_numpy(label_map(module, p.image.numpy(), protocol)),
        )
    rows = prediction_rows(module, refs, 2, protocol=protocol)
    assert len(rows) == 2 and all(
        np.array_equal(r[2], g.row()[2]) for r, g in zip(rows, got[:2], strict=True)
    )
    assert prediction_rows(module, refs, 0) == []


def test_a_label_that_does_not_fit_its_image_is_named(tiny_shards: Path, tmp_path: Path) -> None:
    """A shard whose label is smaller than its image: a DataError naming shard and sample."""
    manifest = load_manifest(tiny_shards)
    bad = tmp_path / "bad-000000.tar"
    with tarfile.open(bad, "w") as tar:
        for name, picture in (
            ("x.jpg", Image.new("RGB", (8, 6))),
            ("x.seg.png", Image.new("L", (4, 6))),
        ):
            data = io.BytesIO()
            picture.save(data, format="PNG" if name.endswith("png") else "JPEG")
            info = tarfile.TarInfo(name)
            info.size = len(data.getvalue())
            tar.addfile(info, io.BytesIO(data.getvalue()))
    module = load_model(str(write_model_file(tmp_path / "model.pt", tiny_shards))).module
    images = predictions(module, [ShardRef(str(bad))], "cpu")
    with pytest.raises(DataError, match=r"bad-000000.tar.*sample x"):
        confusion(images, manifest.num_classes, "cpu")
