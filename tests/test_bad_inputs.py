"""A catalogue of bad inputs and faults across every stage, as a hostile but fair user makes them.

Each case runs a ``danet`` command against a prepared project and must end with exit code 2
(predict: 1, after the good files) and exactly one ``error:`` line that names the file or param
and the problem -- no traceback -- with the stage's previous output and its inputs untouched and
no half-written output left. The families: corrupt, empty, oversized and mislabelled files; bad
params at every nesting level; tampered and truncated shards and manifests; foreign, corrupt and
mismatched models; unreachable or unwritable Ray, MLflow and output locations; signals during
shard and evaluate.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import write_model_file
from tests.test_datasets import label_grid, write_image, write_label

runner = CliRunner()
Setup = Callable[[Path], None]


@dataclass
class Case:
    name: str
    args: list[str]
    message: str  # a regex the one error line must match (after "error: ")
    setup: Setup | None = None
    code: int = 2
    guarded: list[str] = field(
        default_factory=list
    )  # paths (under the project) that must not change


def digest(path: Path) -> str:
    """A digest of a file or a folder's files (names and bytes)."""
    if not path.exists():
        return "absent"
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# --- the project every case starts from ------------------------------------------------------


def camvid(root: Path) -> None:
    for i in range(3):
        write_image(root / f"val/img{i}.png")
        write_label(root / f"valannot/img{i}.png", label_grid([1, 2, 11]))


def project(tmp: Path, shards: Path) -> None:
    camvid(tmp / "camvid")
    shutil.copytree(shards, tmp / "shards")
    write_model_file(tmp / "model.pt", tmp / "shards", val_miou=0.5)
    (tmp / "previous").mkdir()  # an earlier output of every stage writes here
    (tmp / "previous" / "marker.txt").write_text("an earlier run's output")
    params = {
        "shard": {
            "dataset": "camvid",
            "root": str(tmp / "camvid"),
            "out": str(tmp / "previous"),
            "splits": ["val"],
            "workers": 1,
        },
        "data": {"shards": str(tmp / "shards"), "crop_size": 32},
        "train": {"out": str(tmp / "previous"), "storage_path": str(tmp / "ray"), "batch_size": 2},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "evaluate": {
            "model": str(tmp / "model.pt"),
            "shards": str(tmp / "shards"),
            "out": str(tmp / "previous"),
        },
        "register": {
            "eval_metrics": str(tmp / "eval.json"),
            "out": str(tmp / "previous" / "registered.json"),
        },
    }
    (tmp / "params.yaml").write_text(json.dumps(params))


def write(path: str, data: bytes | str) -> Setup:
    def setup(tmp: Path) -> None:
        target = tmp / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data if isinstance(data, bytes) else data.encode())

    return setup


def edit_manifest(change: Callable[[dict], None]) -> Setup:
    def setup(tmp: Path) -> None:
        path = tmp / "shards" / "manifest.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return setup


def shard_file(tmp: Path, split: str = "val") -> Path:
    return sorted((tmp / "shards").glob(f"{split}-*.tar"))[0]


def truncate_shard(tmp: Path) -> None:
    path = shard_file(tmp)
    path.write_bytes(path.read_bytes()[:2000])


def tamper_shard(tmp: Path) -> None:
    path = shard_file(tmp)
    data = bytearray(path.read_bytes())
    data[900] ^= 0xFF  # the same size, other bytes
    path.write_bytes(bytes(data))


def foreign_model(tmp: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp / "model.pt")


def other_classes_model(tmp: Path) -> None:
    from pipeline.data.readers import make_reader
    from pipeline.data.shard import shard_dataset

    root = tmp / "two"
    (root / "images" / "val").mkdir(parents=True)
    (root / "masks" / "val").mkdir(parents=True)
    (root / "classes.txt").write_text("background\nthing\n")
    write_image(root / "images" / "val" / "a.png", 32, 24)
    write_label(root / "masks" / "val" / "a.png", np.zeros((24, 32), dtype=np.uint8))
    shard_dataset(make_reader("folder", root), ("val",), tmp / "two-shards")


def rgb_label(tmp: Path) -> None:
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(tmp / "camvid/valannot/img1.png")


def evaluation_of(model_uri: str) -> Setup:
    def setup(tmp: Path) -> None:
        record = {
            "model": model_uri, "model_uri": model_uri, "dataset": "synthetic", "split": "val",
            "split_sha256": "x", "protocol": "official-whole", "miou": 0.5, "pixel_acc": 0.5,
            "mean_acc": 0.5, "iou_per_class": {}, "images": 1,
        }  # fmt: skip
        (tmp / "eval.json").write_text(json.dumps(record))

    return setup


def params_text(text: str) -> Setup:
    return write("bad.yaml", text)


SHARD = ["shard", "--params", "params.yaml"]
TRAIN = ["train", "--params", "params.yaml"]
EVALUATE = ["evaluate", "--params", "params.yaml"]
REGISTER = ["register", "--params", "params.yaml"]
GUARD = ["previous", "camvid", "shards", "model.pt"]

CASES = [
    # corrupt, empty, oversized and mislabelled files (shard)
    Case(
        "truncated image",
        SHARD,
        r".*camvid/val/img1\.png: unreadable or truncated image",
        write("camvid/val/img1.png", b"\x89PNG\r\n\x1a\n\x00\x00"),
    ),
    Case(
        "zero-byte image",
        SHARD,
        r".*camvid/val/img0\.png: unreadable or truncated image",
        write("camvid/val/img0.png", b""),
    ),
    Case(
        "text file as an image",
        SHARD,
        r".*img2\.png: unreadable or truncated image",
        write("camvid/val/img2.png", "not an image"),
    ),
    Case(
        "label of another size",
        SHARD,
        r".*valannot/img2\.png: label is 8x5 but its image is 8x6",
        lambda t: write_label(t / "camvid/valannot/img2.png", label_grid([1], h=5)),
    ),
    Case(
        "RGB label",
        SHARD,
        r".*valannot/img1\.png: label must be a single-channel PNG, got mode RGB",
        rgb_label,
    ),
    Case(
        "missing label",
        SHARD,
        r".*camvid/val/img1\.png: image has no label file",
        lambda t: (t / "camvid/valannot/img1.png").unlink(),
    ),
    Case(
        "label value outside the classes",
        SHARD,
        r".*img0\.png: label value 99 is outside CamVid's 0\.\.11",
        lambda t: write_label(t / "camvid/valannot/img0.png", label_grid([1, 99])),
    ),
    Case(
        "bad sample in a process pool",
        [*SHARD, "--workers", "2"],
        r".*img1\.png: unreadable or truncated image",
        write("camvid/val/img1.png", b"GIF89a"),
    ),
    Case(
        "output equal to the dataset",
        [*SHARD, "--out", "camvid"],
        r"the output camvid overlaps the input shard.root",
    ),
    Case(
        "output inside the dataset",
        [*SHARD, "--out", "camvid/shards"],
        r"the output camvid/shards overlaps the input shard.root",
    ),
    Case(
        "dataset root missing",
        [*SHARD, "--root", "nowhere"],
        r"nowhere: dataset root does not exist",
    ),
    Case("unknown dataset", [*SHARD, "--dataset", "kitti"], r"shard.dataset 'kitti' is unknown"),
    Case(
        "empty split",
        [*SHARD, "--splits", "test"],
        r".*camvid/test: CamVid test directory does not exist",
        lambda t: None,
    ),
    # bad params at every level
    Case(
        "unknown section",
        ["train", "--params", "bad.yaml"],
        r"trian is not a params section",
        params_text("trian: {lr: 1}\n"),
    ),
    Case(
        "unknown key",
        ["train", "--params", "bad.yaml"],
        r"train.lrr is not a known param",
        params_text("train: {lrr: 1}\n"),
    ),
    Case(
        "string for a number",
        ["train", "--params", "bad.yaml"],
        r"train.lr must be a number, got 'abc'",
        params_text("train: {lr: abc}\n"),
    ),
    Case(
        "section not a mapping",
        ["train", "--params", "bad.yaml"],
        r"train must be a mapping of params, got 5",
        params_text("train: 5\n"),
    ),
    Case(
        "bad value inside a mapping",
        ["train", "--params", "bad.yaml"],
        r"train.loss_weights.out must be a number, got 'heavy'",
        params_text("train: {loss_weights: {out: heavy}}\n"),
    ),
    Case(
        "invalid YAML",
        ["train", "--params", "bad.yaml"],
        r"bad.yaml: not valid YAML",
        params_text("train: {lr: [\n"),
    ),
    Case(
        "params file missing",
        ["train", "--params", "missing.yaml"],
        r"missing.yaml: params file does not exist",
    ),
    Case(
        "--set without a value",
        [*TRAIN, "--set", "train.lr"],
        r"--set train.lr: expected section.key=value",
    ),
    Case("unknown preset", ["--preset", "kitti", "train"], r"--preset kitti: no such preset"),
    Case(
        "batch that does not split",
        [*TRAIN, "--set", "train.batch_size=3", "--set", "train.num_workers=2"],
        r"train.batch_size 3 does not split evenly over train.num_workers 2",
    ),
    Case(
        "crop larger than any image",
        [*TRAIN, "--set", "data.crop_size=512"],
        r"data.crop_size 512 is larger than any crop",
    ),
    Case(
        "option out of range",
        ["predict", "--model", "model.pt", "--out", "p", "--crop", "8", "camvid"],
        r"Invalid value for '--crop'",
    ),
    # tampered and truncated shards and manifests
    Case(
        "manifest missing",
        [*EVALUATE, "--set", "evaluate.shards=nowhere"],
        r"nowhere/manifest.json: shard manifest does not exist",
    ),
    Case(
        "manifest not JSON",
        EVALUATE,
        r".*shards/manifest.json: manifest is not valid JSON",
        write("shards/manifest.json", "{not json"),
    ),
    Case(
        "manifest without its keys",
        EVALUATE,
        r".*manifest.json: manifest key 'splits' is missing or malformed",
        edit_manifest(lambda d: d.pop("splits")),
    ),
    Case(
        "manifest of another version",
        EVALUATE,
        r".*manifest.json: manifest version 2 is not 3",
        edit_manifest(lambda d: d.update(version=2)),
    ),
    Case(
        "truncated shard",
        EVALUATE,
        r".*val-000000\.tar: shard has 2000 bytes, the manifest says \d+",
        truncate_shard,
    ),
    Case(
        "missing shard",
        EVALUATE,
        r".*val-000000\.tar: shard is missing",
        lambda t: shard_file(t).unlink(),
    ),
    Case(
        "replaced shard",
        EVALUATE,
        r".*val-000000\.tar: shard content differs from the manifest's sha256",
        tamper_shard,
    ),
    Case(
        "split not in the shards",
        [*EVALUATE, "--split", "test"],
        r".*manifest.json: has no split 'test'",
    ),
    # foreign, corrupt and mismatched models
    Case(
        "corrupt model file",
        EVALUATE,
        r".*model\.pt: not a valid DANet model file",
        write("model.pt", b"not a checkpoint"),
    ),
    Case("foreign model file", EVALUATE, r".*model\.pt: not a DANet model file", foreign_model),
    Case(
        "model file missing",
        [*EVALUATE, "--model", "gone.pt"],
        r"gone\.pt: model file does not exist",
    ),
    Case(
        "model of other classes",
        [*EVALUATE, "--set", "evaluate.shards=two-shards"],
        r".*model\.pt: the model has 11 classes .* but two-shards has 2",
        other_classes_model,
    ),
    Case(
        "unknown registry model",
        [*EVALUATE, "--model", "models:/nope@champion"],
        r"models:/nope@champion: cannot load the model",
    ),
    Case("no model to pick", [*EVALUATE, "--model", "auto"], r"evaluate.model is auto but none of"),
    Case(
        "cuda without a GPU",
        [*EVALUATE, "--set", "evaluate.device=cuda"],
        r"evaluate.device is cuda but no CUDA device is available",
    ),
    Case(
        "metrics.json not JSON",
        REGISTER,
        r".*eval\.json: not metrics written by danet evaluate",
        write("eval.json", "{oops"),
    ),
    Case(
        "metrics.json naming no model",
        REGISTER,
        r"models:/nope/1: not an MLflow model",
        evaluation_of("models:/nope/1"),
    ),
    Case("metrics.json missing", REGISTER, r".*eval\.json: evaluation metrics do not exist"),
    # unreachable or unwritable Ray, MLflow and output locations
    Case(
        "unreachable Ray",
        [*TRAIN, "--address", "127.0.0.1:9"],
        r"train.ray_address '127.0.0.1:9': cannot connect to Ray",
    ),
    Case(
        "unreachable MLflow server",
        [*TRAIN, "--set", "mlflow.tracking_uri=http://127.0.0.1:9"],
        r"mlflow.tracking_uri http://127.0.0.1:9: server unreachable",
    ),
    Case(
        "cluster with a local tracking store",
        [*TRAIN, "--address", "10.255.255.1:6379"],
        r"mlflow.tracking_uri sqlite:///.*: a local store cannot serve a Ray cluster",
    ),
    Case(
        "unwritable tracking store",
        [*TRAIN, "--set", "mlflow.tracking_uri=sqlite:///model.pt/x/mlflow.db"],
        r"mlflow.tracking_uri sqlite:///.*model\.pt/x is not a writable folder",
    ),
    Case(
        "evaluation output is a file",
        [*EVALUATE, "--out", "model.pt"],
        r"evaluate.out model\.pt: exists and is not a folder",
    ),
    Case(
        "training output is a file",
        [*TRAIN, "--set", "train.out=model.pt"],
        r"train.out model\.pt: exists and is not a folder",
    ),
    Case(
        "predict output is a file",
        ["predict", "--model", "model.pt", "--out", "model.pt", "camvid"],
        r"--out model\.pt: exists and is not a folder",
    ),
    Case(
        "register output unwritable",
        [*REGISTER, "--set", "register.out=model.pt/registered.json"],
        r".*model\.pt/registered\.json: cannot write here",
        evaluation_of("models:/nope/1"),
    ),
]


def run_case(case: Case, tmp: Path) -> str | None:
    """None when the case was handled as promised, else what went wrong."""
    if case.setup:
        case.setup(tmp)
    before = {p: digest(tmp / p) for p in GUARD + case.guarded}
    result = runner.invoke(app, case.args)
    text = result.output
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    if "Traceback" in text or (result.exception and not isinstance(result.exception, SystemExit)):
        return f"a traceback: {result.exception!r}"
    if result.exit_code != case.code:
        return f"exit code {result.exit_code}, not {case.code}: {text[-500:]}"
    if len(errors) != 1 or not re.match(case.message, errors[0][len("error: ") :]):
        return f"not one line matching {case.message!r}: {errors or text[-500:]}"
    changed = [
        p
        for p, d in before.items()
        if digest(tmp / p) != d and not (case.setup and p in ("camvid", "shards", "model.pt"))
    ]
    if changed:
        return f"changed: {changed}"
    if list(tmp.rglob(".*.tmp-*")):
        return f"half-written output left: {list(tmp.rglob('.*.tmp-*'))}"
    return None


def signal_cases(tmp: Path) -> dict[str, str | None]:
    """SIGINT during shard, SIGTERM during evaluate: the earlier output stays, nothing half-written."""
    results: dict[str, str | None] = {}
    danet = str(Path(sys.executable).parent / "danet")
    big = {
        "synthetic": {"num_samples": {"train": 400}, "width": 320, "height": 240},
        "shard": {
            "dataset": "synthetic",
            "splits": ["train"],
            "out": str(tmp / "previous"),
            "workers": 1,
        },
    }
    (tmp / "big.yaml").write_text(json.dumps(big))
    for name, command, sig in (
        ("SIGINT during shard", [danet, "shard", "--params", "big.yaml"], signal.SIGINT),
        (
            "SIGTERM during evaluate",
            [danet, "evaluate", "--params", "params.yaml", "--scales", "1,1,1,1,1,1,1,1"],
            signal.SIGTERM,
        ),
    ):
        before = digest(tmp / "previous")
        process = subprocess.Popen(
            command, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while (
            not list(tmp.glob(".previous.tmp-*"))
            and time.monotonic() < deadline
            and process.poll() is None
        ):
            time.sleep(0.05)  # the stage has started writing
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
        problems = []
        if b"Traceback" in stderr:
            problems.append("a traceback")
        if process.returncode == 0:
            problems.append("it finished before the signal")
        if digest(tmp / "previous") != before:
            problems.append("the earlier output changed")
        if list(tmp.glob(".*.tmp-*")):
            problems.append("half-written output left")
        results[name] = "; ".join(problems) or None
    return results


@pytest.mark.slow
def test_bad_inputs_and_faults(
    tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures: dict[str, str] = {}
    for i, case in enumerate(CASES):
        tmp = tmp_path / f"case{i:02d}"
        tmp.mkdir()
        project(tmp, tiny_shards)
        monkeypatch.chdir(tmp)
        if (problem := run_case(case, tmp)) is not None:
            failures[case.name] = problem
    tmp = tmp_path / "signals"
    tmp.mkdir()
    project(tmp, tiny_shards)
    monkeypatch.chdir(tmp)
    signals = signal_cases(tmp)
    failures |= {k: v for k, v in signals.items() if v is not None}
    predict_failures = predict_case(tmp_path / "predict", tiny_shards, monkeypatch)
    if predict_failures:
        failures["bad and oversized files to predict"] = predict_failures
    total = len(CASES) + len(signals) + 1
    print(f"\n{total} bad inputs and faults: {total - len(failures)} handled")
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())


def predict_case(tmp: Path, shards: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """predict: each bad file is listed on a line of its own (exit 1); the good ones are written;
    an image past PIL's decompression limit is an error for that file only."""
    tmp.mkdir()
    project(tmp, shards)
    monkeypatch.chdir(tmp)
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(images / "good.png")
    (images / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((300, 400), dtype=np.uint8)).save(images / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # huge.png: 120k pixels
    result = runner.invoke(app, ["predict", "--model", "model.pt", "--out", "predicted", "images"])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    if "Traceback" in result.output or result.exit_code != 1:
        return f"exit {result.exit_code}: {result.output[-500:]}"
    wanted = [
        r"images/huge\.png: too large to decode safely",
        r"images/notes\.txt: not a readable image",
    ]
    if len(errors) != 2 or not all(any(re.search(w, e) for e in errors) for w in wanted):
        return f"not the two file errors: {errors}"
    written = sorted(p.name for p in (tmp / "predicted").iterdir())
    return (
        None
        if written == ["good_labels.png", "good_mask.png", "good_overlay.png"]
        else f"written: {written}"
    )
