"""Shards in object storage: an S3-compatible server (moto) on 127.0.0.1; shard to it, byte for
byte as a local shard, published with the manifest last; train and evaluate from it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import fsspec
import pytest

from pipeline.data.loader import read_shard
from pipeline.data.manifest import load_manifest, shard_refs
from pipeline.data.readers.synthetic import SyntheticReader
from pipeline.data.shard import shard_dataset
from pipeline.errors import DataError
from pipeline.sections import EvaluateParams
from tests.conftest import mean_of, tiny_params


def reader(seed: int = 0) -> SyntheticReader:
    return SyntheticReader(num_samples={"train": 6, "val": 3}, width=64, height=48, seed=seed)


def test_shard_to_s3_equals_a_local_shard_and_publishes_the_manifest_last(
    s3_bucket: str, tmp_path: Path
) -> None:
    local = shard_dataset(reader(), ("train", "val"), tmp_path / "local", max_count=4)
    url = f"{s3_bucket}/shards"
    remote = shard_dataset(reader(), ("train", "val"), url, max_count=4)
    fs, root = fsspec.core.url_to_fs(url)
    for split in ("train", "val"):
        for mine, theirs in zip(
            local.splits[split].shards, remote.splits[split].shards, strict=True
        ):
            assert theirs.name == f"{mine.name[:-4]}-{mine.sha256[:12]}.tar"  # content-addressed
            data = fs.cat_file(f"{root}/{theirs.name}")
            assert hashlib.sha256(data).hexdigest() == mine.sha256 == theirs.sha256  # same bytes
    opened = load_manifest(url)
    assert opened == remote and opened.location == url
    refs = shard_refs(opened, "val")
    assert [key for key, _, _ in read_shard(refs[0])] == [
        "synthetic_val_000000",
        "synthetic_val_000001",
        "synthetic_val_000002",
    ]

    # Sharded again from other data: the new set replaces the old one, whose files are removed.
    shard_dataset(reader(seed=1), ("train", "val"), url, max_count=4)
    names = {p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/*.tar")}
    assert names == {s.name for info in load_manifest(url).splits.values() for s in info.shards}
    assert not names & {s.name for info in remote.splits.values() for s in info.shards}


def test_a_tampered_remote_shard_is_named(s3_bucket: str) -> None:
    url = f"{s3_bucket}/tampered"
    manifest = shard_dataset(reader(), ("val",), url, max_count=4)
    fs, root = fsspec.core.url_to_fs(url)
    name = manifest.splits["val"].shards[0].name
    data = bytearray(fs.cat_file(f"{root}/{name}"))
    data[700] ^= 0xFF  # a flipped byte inside a member: same size, other content
    fs.pipe_file(f"{root}/{name}", bytes(data))
    (ref,) = shard_refs(load_manifest(url), "val")
    with pytest.raises(
        DataError, match=rf"{name}: shard content differs from the manifest's sha256"
    ):
        list(read_shard(ref))
    fs.rm_file(f"{root}/{name}")
    with pytest.raises(DataError, match=rf"{name}: shard is missing"):
        shard_refs(load_manifest(url), "val")


@pytest.mark.slow
def test_train_and_evaluate_from_s3(s3_bucket: str, tmp_path: Path, ray_cluster: None) -> None:
    """Shards and Ray's checkpoints in the bucket; training and evaluation read them there."""
    from pipeline.evaluation.evaluate import run_evaluation
    from pipeline.training.checkpoint import checkpoint_dirs
    from pipeline.training.driver import run_training

    url = f"{s3_bucket}/train-shards"
    shard_dataset(reader(), ("train", "val"), url, max_count=4)
    params = tiny_params(tmp_path, url, train={"storage_path": f"{s3_bucket}/ray"})
    uri = params[3].tracking_uri
    summary = run_training(*params)
    assert summary.final["iteration"] == 4
    assert checkpoint_dirs(
        f"{s3_bucket}/ray/{summary.run_name}"
    )  # the checkpoints are in the bucket
    evaluation = run_evaluation(
        EvaluateParams(
            model=str(tmp_path / "out" / "model.pt"), shards=url, out=str(tmp_path / "eval")
        ),
        uri,
    )
    assert evaluation.images == 3
    assert evaluation.miou == pytest.approx(mean_of(evaluation.iou_per_class))
    assert evaluation.split_sha256 == load_manifest(url).split_digest("val")


def test_a_location_is_never_run_as_a_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """webdataset's ``pipe:`` would run the location's text in a shell (a manifest or params
    file from someone else: ``pipe:cat x;touch y``). Refused in one line wherever a location is
    opened; no shell is ever started (the marker file never appears)."""
    import dataclasses
    import subprocess

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.data.storage import open_binary

    local = tmp_path / "local"
    shard_dataset(reader(), ("train", "val"), local, max_count=4)
    marker = tmp_path / "ran"
    command = f"pipe:touch {marker}; cat {local}"
    with pytest.raises(DataError, match=r"a shell command .*pipe:.*not a location"):
        load_manifest(command)
    manifest = dataclasses.replace(load_manifest(local), location=command)
    with pytest.raises(DataError, match="a shell command"):
        shard_refs(manifest, "val")
    with pytest.raises(DataError, match="a shell command"), open_binary(f" PIPE:touch {marker}"):
        pass
    calls: list[object] = []
    real_popen = subprocess.Popen

    def spy(*args: object, **kwargs: object) -> object:
        if kwargs.get("shell") or str(marker) in str(args):
            calls.append(args)
        return real_popen(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "Popen", spy)
    result = CliRunner().invoke(
        app, ["evaluate", "--set", f"evaluate.shards={command}", "--set", "evaluate.model=x.pt"]
    )
    assert result.exit_code == 2 and not marker.exists()
    assert not calls, calls  # no shell, nothing with the command's text
    assert "shell command" in result.output
