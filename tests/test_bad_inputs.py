"""A catalogue of bad inputs and faults across every stage, as a hostile but fair user makes them.

Each case is a test of its own (``-k`` picks one): a ``danet`` command run against a prepared
project (a git repository holding a dataset, shards, a model, an MLflow store, Ray's storage and
an earlier output of every stage) must end with exit code 2 (predict: 1, after the good files)
and exactly one ``error:`` line that names the file or param and the problem -- no traceback --
with every store's digest as before (nothing lost), no half-written output, and no code run. The
families: corrupt, empty, oversized, mislabelled and non-regular files; bad params at every
level; outputs aimed at a store; tampered and truncated shards and manifests; foreign, corrupt,
diverged and code-carrying models; scores that are not numbers; unreachable, full, read-only or
corrupt Ray, MLflow and output locations; signals. The cases run in-process, each in seconds (fast
tier); the faults that need Ray or a subprocess (signals, Ray's own) are test functions of their
own, marked slow.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import (
    BILLION_LAUGHS,
    label_grid,
    takes_ctrl_c,
    use_experiment,
    write_image,
    write_label,
    write_model_file,
)

runner = CliRunner()
Setup = Callable[[Path], None]
PWNED = "pwned"  # a file that code run from a model would create


@dataclass
class Case:
    name: str
    args: list[str]
    message: str  # a regex the one error line must match (after "error: ")
    setup: Setup | None = None
    code: int = 2
    changes: tuple[str, ...] = ()  # stores the setup itself alters (excluded from "nothing lost")
    env: tuple[tuple[str, str], ...] = ()  # environment variables set for the case


def digest(path: Path) -> str:
    """A digest of a file or a folder's files (names and bytes); non-regular files by name."""
    if not path.exists() and not path.is_symlink():
        return "absent"
    files = sorted(p for p in path.rglob("*") if not p.is_dir()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        if f.is_file() and not f.is_symlink():
            h.update(f.read_bytes())
    return h.hexdigest()


# --- the project every case starts from ------------------------------------------------------

# every store of the project: none may change, whatever the case does
STORES = [
    "previous", "camvid", "shards", "model.pt", "mlruns", "ray", "notes.md", "params.yaml",
    "mine",  # a folder of the user's, given as an output by mistake (where a case writes it)
]  # fmt: skip
# an earlier output of each stage: a file of a name the stage writes (it may replace it)
EARLIER = {
    "shard": "manifest.json",
    "train": "metrics.json",
    "tune": "metrics.json",
    "eval": "metrics.json",
    "register": "marker.txt",
}


def camvid(root: Path) -> None:
    for i in range(3):
        write_image(root / f"val/img{i}.png")
        write_label(root / f"valannot/img{i}.png", label_grid([1, 2, 11]))


def project(tmp: Path, shards: Path, model: bytes) -> None:
    camvid(tmp / "camvid")
    shutil.copytree(shards, tmp / "shards")
    (tmp / "model.pt").write_bytes(model)
    for stage, name in EARLIER.items():
        (tmp / "previous" / stage).mkdir(parents=True)
        (tmp / "previous" / stage / name).write_text(f"an earlier {stage} output")
    for store in ("mlruns", "ray"):
        (tmp / store).mkdir()
        (tmp / store / "keep.txt").write_text(f"the {store} store")
    (tmp / "notes.md").write_text("a tracked file of the user's\n")
    params = {
        "shard": {
            "dataset": "camvid",
            "root": "camvid",
            "out": "previous/shard",
            "splits": ["val"],
            "workers": 1,
        },
        "data": {"shards": "shards", "crop_size": 32},
        "train": {"out": "previous/train", "storage_path": "ray", "batch_size": 2},
        "tune": {"out": "previous/tune"},
        "mlflow": {"tracking_uri": "sqlite:///mlflow.db"},
        "evaluate": {"model": "model.pt", "shards": "shards", "out": "previous/eval"},
        "register": {"eval_metrics": "eval.json", "out": "previous/register/registered.json"},
    }
    (tmp / "params.yaml").write_text(json.dumps(params))
    subprocess.run(["git", "init", "-q"], cwd=tmp, check=True)
    subprocess.run(["git", "add", "params.yaml", "notes.md"], cwd=tmp, check=True)


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


def first_val_shard(data: dict) -> dict:
    return data["splits"]["val"]["shards"][0]


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


def train_over_val(tmp: Path) -> None:
    shutil.copyfile(shard_file(tmp, "train"), shard_file(tmp, "val"))


def miscount_shard(data: dict) -> None:
    first_val_shard(data)["samples"] -= 1
    data["splits"]["val"]["samples"] -= 1


def empty_split(data: dict) -> None:
    data["splits"]["test"] = {
        "samples": 0, "shards": [], "class_pixels": [0] * 11, "ignore_pixels": 0,
        "min_size": [0, 0], "max_size": [0, 0],
    }  # fmt: skip


def foreign_onnx(path: Path) -> None:
    """A valid ONNX graph (image -> logits, an Identity) without danet export's metadata."""
    import onnx
    from onnx import TensorProto, helper

    shape: list[str | int | None] = ["N", 3, "H", "W"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["logits"])],
        "foreign",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def onnx_of_other_classes(tmp: Path) -> None:
    """A foreign graph (3 output channels) carrying danet export's metadata for 11 classes."""
    import onnx

    foreign_onnx(tmp / "m.onnx")
    graph = onnx.load(str(tmp / "m.onnx"))
    meta = {
        "classes": json.dumps([f"c{i}" for i in range(11)]),
        "palette": json.dumps([[i, i, i] for i in range(11)]),
        "dataset": "camvid", "source_ref": "model.pt", "source_sha256": "0" * 64,
    }  # fmt: skip
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(tmp / "m.onnx"))


def foreign_model(tmp: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp / "model.pt")


class Payload:
    """A pickle that runs a command when it is loaded."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {PWNED}",))


def code_carrying_model(tmp: Path) -> None:
    payload = torch.load(tmp / "model.pt", weights_only=True)
    payload["dataset"] = Payload()
    torch.save(payload, tmp / "model.pt")


def edit_model(change: Callable[[dict], None]) -> Setup:
    def setup(tmp: Path) -> None:
        payload = torch.load(tmp / "model.pt", weights_only=True)
        change(payload)
        torch.save(payload, tmp / "model.pt")

    return setup


def nan_weight(payload: dict) -> None:
    name = next(k for k, v in payload["model"].items() if v.is_floating_point())
    payload["model"][name].view(-1)[0] = float("nan")


def pytorch_flavour_model(tmp: Path) -> None:
    """A model logged with MLflow's pytorch flavour: a pickled module, registered as m/1."""
    import mlflow

    from pipeline.mlflowstore import tracking_uri

    metadata = {"classes": ["a", "b"], "palette": [[0, 0, 0], [1, 1, 1]], "dataset": "synthetic"}
    with tracking_uri(uri := f"sqlite:///{tmp / 'mlflow.db'}"):
        use_experiment(uri, "synthetic")
        with mlflow.start_run():
            info = mlflow.pytorch.log_model(
                torch.nn.Conv2d(3, 2, 1), name="model", metadata=metadata,
                serialization_format="pickle", registered_model_name="m",
                pip_requirements=["torch"],  # not inferred: ~10 s in a subprocess
            )  # fmt: skip
    assert info.model_uri


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


def label16(value: int) -> Setup:
    def setup(tmp: Path) -> None:
        values = np.resize(np.array([1, value], dtype=np.uint16), (6, 8))
        Image.fromarray(values).save(tmp / "camvid/valannot/img0.png")  # a 16-bit PNG

    return setup


def fifo(path: str) -> Setup:
    def setup(tmp: Path) -> None:
        (tmp / path).unlink()
        os.mkfifo(tmp / path)

    return setup


def users_folder(tmp: Path) -> None:
    """A folder of the user's, none of whose files a stage writes."""
    write("mine/thesis.tex", "months of work")(tmp)
    write("mine/photo.jpg", "a photo")(tmp)


def same_key(*names: str) -> Setup:
    """CamVid images (with labels) whose sample keys equal another's once made safe."""

    def setup(tmp: Path) -> None:
        for name in names:
            write_image(tmp / "camvid/val" / name)
            write_label(tmp / "camvid/valannot" / name, label_grid([1, 2, 11]))

    return setup


def device_image(tmp: Path) -> None:
    (tmp / "camvid/val/img2.png").unlink()
    os.symlink("/dev/zero", tmp / "camvid/val/img2.png")


def evaluation_of(model_uri: str, **change: object) -> Setup:
    def setup(tmp: Path) -> None:
        record = {
            "model": model_uri, "model_uri": model_uri, "dataset": "synthetic", "split": "val",
            "split_sha256": "x", "protocol": "official-whole", "miou": 0.5, "pixel_acc": 0.5,
            "mean_acc": 0.5, "iou_per_class": {"a": 0.5, "b": None}, "images": 1,
        }  # fmt: skip
        text = json.dumps({**record, **change})
        (tmp / "eval.json").write_text(text.replace('"NAN"', "NaN"))

    return setup


def both(*setups: Setup) -> Setup:
    def setup(tmp: Path) -> None:
        for s in setups:
            s(tmp)

    return setup


def corrupt_mlflow_db(tmp: Path) -> None:
    (tmp / "mlflow.db").write_bytes(b"this is not a database " * 200)


MOUNTS: list[Path] = []


def full_disk(path: str, read_only: bool = False) -> Setup:
    """``path`` becomes a tiny tmpfs, filled up (ENOSPC) or read-only (EROFS); needs root."""

    def setup(tmp: Path) -> None:
        target = tmp / path
        target.mkdir(parents=True, exist_ok=True)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(target)], capture_output=True
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        MOUNTS.append(target)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
            return
        try:
            with open(target / "filler", "wb", buffering=0) as f:  # every byte of it
                while True:
                    f.write(b"\0" * 1024)
        except OSError:
            pass

    return setup


def params_text(text: str | bytes) -> Setup:
    return write("bad.yaml", text)


SHARD = ["shard", "--params", "params.yaml"]
TRAIN = ["train", "--params", "params.yaml"]
SEARCH_JSON = json.dumps(  # a search's search.json: its winning trial trained this lr
    {"search": "s", "search_run_id": "r", "best_trial": "t1", "values": {"train.lr": 0.0123456789}}
)
TUNE = ["tune", "--params", "params.yaml"]
EVALUATE = ["evaluate", "--params", "params.yaml"]
REGISTER = ["register", "--params", "params.yaml"]
PREDICT = ["predict", "--model", "model.pt"]
EXPORT = ["export", "--model", "model.pt", "--out", "exported/model.onnx"]
OVERLAP = r"{name} {out} overlaps \S*{other}\S* .*{where}: choose another location"


def overlap(name: str, out: str, other: str, where: str = "") -> str:
    return OVERLAP.format(
        name=re.escape(name), out=re.escape(out), other=re.escape(other), where=re.escape(where)
    )


CASES = [
    # corrupt, empty, oversized, mislabelled and non-regular files (shard)
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
        "16-bit label that would wrap to a class",
        SHARD,
        r".*valannot/img0\.png: label value 257 is outside 0\.\.255: not a class id",
        label16(257),
    ),
    Case(
        "16-bit label far outside",
        SHARD,
        r".*valannot/img0\.png: label value 60000 is outside 0\.\.255",
        label16(60000),
    ),
    Case(
        "16-bit label outside CamVid's classes",
        SHARD,
        r".*img0\.png: label value 200 is outside CamVid's 0\.\.11",
        label16(200),
    ),
    Case(
        "FIFO as a label",
        SHARD,
        r".*valannot/img1\.png: not a regular file \(a FIFO",
        fifo("camvid/valannot/img1.png"),
    ),
    Case(
        "FIFO as an image",
        SHARD,
        r".*camvid/val/img0\.png: not a regular file",
        fifo("camvid/val/img0.png"),
    ),
    Case("device as an image", SHARD, r".*camvid/val/img2\.png: not a regular file", device_image),
    Case(
        "bad sample in a process pool",
        [*SHARD, "--workers", "2"],
        r".*img1\.png: unreadable or truncated image",
        write("camvid/val/img1.png", b"GIF89a"),
    ),
    Case(
        "sample keys that collide",
        SHARD,
        r".*camvid/val/v_1\.png: its sample key 'v_1' is also .*camvid/val/v\.1\.png's in split "
        r"'val' \(keys are file stems, '\.' and '/' read as '_'\): rename one of them",
        same_key("v.1.png", "v_1.png"),
    ),
    Case(
        "one stem in two formats",
        SHARD,
        r".*camvid/val/img0\.png: its sample key 'img0' is also .*camvid/val/img0\.jpg's",
        same_key("img0.jpg"),
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
    ),
    # bad params at every level
    Case(
        "unknown section",
        ["train", "--params", "bad.yaml"],
        r"trian is not a params section",
        params_text("trian: {lr: 1}\n"),
    ),
    Case(
        "NUL character in an output path",
        ["predict", "--params", "bad.yaml", "camvid/val"],
        r"predict.out holds a NUL character: 'po\\x00x' names no file",
        params_text('predict: {model: model.pt, out: "po\\0x"}\n'),
    ),
    Case(
        "lone surrogate in an output path",
        ["evaluate", "--params", "bad.yaml"],
        r"evaluate.out is not valid text \(a lone surrogate\)",
        params_text('evaluate: {out: "ev\\ud800"}\n'),
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
        "YAML alias bomb",
        ["train", "--params", "bad.yaml"],
        r"bad\.yaml: line \d+: its aliases expand to more than 100,000 values",
        params_text(BILLION_LAUGHS),
    ),
    Case(
        "YAML alias inside itself",
        ["train", "--params", "bad.yaml"],
        r"bad\.yaml: line 1: alias \*a refers to the value it is in",
        params_text("train: &a {lr: [*a]}\n"),
    ),
    Case(
        "params nested without end",
        ["train", "--params", "bad.yaml"],
        r"bad\.yaml: line 1: values nest more than 64 deep",
        params_text("train: {lr: " + "[" * 100_000 + "]" * 100_000 + "}\n"),
    ),
    Case(
        "param given twice",
        ["train", "--params", "bad.yaml"],
        r"bad\.yaml: train\.lr is given twice \(lines 2 and 4\): keep one",
        params_text("train:\n  lr: 0.1\n  batch_size: 2\n  lr: 0.2\n"),
    ),
    Case(
        "section given twice",
        ["train", "--params", "bad.yaml"],
        r"bad\.yaml: train is given twice \(lines 1 and 2\)",
        params_text("train: {lr: 0.1}\ntrain: {batch_size: 2}\n"),
    ),
    Case(
        "--set value with a key given twice",
        [*TRAIN, "--set", "train.loss_weights={out: 1, out: 2}"],
        r"--set train\.loss_weights=\{out: 1, out: 2\}: out is given twice",
    ),
    Case(
        "params file not UTF-8",
        ["train", "--params", "bad.yaml"],
        r"bad\.yaml: not UTF-8 text \(byte 21\): save it as UTF-8",
        params_text("train: {run_name: caf\xe9}\n".encode("latin-1")),
    ),
    Case(
        "unknown keys of mixed types",
        ["train", "--params", "bad.yaml"],
        r"train\.2 is not a known param",
        params_text("train: {lrr: 1, 2: 3, null: 4}\n"),
    ),
    Case(
        "unknown sections of mixed types",
        ["train", "--params", "bad.yaml"],
        r"2 is not a params section",
        params_text("trian: 1\n2: 3\n"),
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
    Case(
        "all loss weights zero",
        [*TRAIN, "--set", "train.loss_weights={out: 0, pam: 0, cam: 0, aux: 0}"],
        r"train.loss_weights: every output this model trains \(out, pam, cam\) has weight 0",
    ),
    Case(
        "FCN head with its only loss weighted 0",
        [*TRAIN, "--set", "model.head=fcn", "--set", "train.loss_weights.out=0"],
        r"train.loss_weights: every output this model trains \(out\) has weight 0",
    ),
    Case(
        "init_from missing",
        [*TRAIN, "--set", "model.init_from=nope.pt"],
        r"model.init_from nope.pt: model file does not exist",
    ),
    Case(
        "init_from not a model",
        [*TRAIN, "--set", "model.init_from=notes.md"],
        r".*notes.md: not a valid DANet model file",
    ),
    # run, search and model names are one plain segment
    Case(
        "run name .. with --restart",
        [*TRAIN, "--restart", "--set", "train.run_name=.."],
        r"train.run_name '\.\.': must be one plain name",
    ),
    Case(
        "run name with a slash",
        [*TRAIN, "--run-name", "a/b"],
        r"train.run_name 'a/b': must be one plain name",
    ),
    Case(
        "run name climbing out",
        [*TRAIN, "--set", "train.run_name=../../etc"],
        r"train.run_name '\.\./\.\./etc': must be one plain name",
    ),
    Case(
        "absolute run name",
        [*TRAIN, "--set", "train.run_name=/tmp/x"],
        r"train.run_name '/tmp/x': must be",
    ),
    Case(
        "hidden run name", [*TRAIN, "--set", "train.run_name=.x"], r"train.run_name '\.x': must be"
    ),
    # issue 35: every number has a range (pipeline/schema.py MAX_*), checked before any work
    Case(
        "infinite shard size",
        [*SHARD, "--set", "shard.max_size_mb=.inf"],
        r"shard.max_size_mb must be a finite number, got inf",
    ),
    Case("NaN lr", [*TRAIN, "--set", "train.lr=.nan"], r"train.lr must be a finite number"),
    Case(
        "huge integer as a float",
        [*TRAIN, "--set", f"train.grad_clip={10**400}"],
        r"train.grad_clip must be a finite number",
    ),
    Case(
        "huge evaluate scale",
        [*EVALUATE, "--scales", "1,1e9"],
        r"evaluate.scales\[1\] must be <= 8.0, got 1000000000.0",
    ),
    Case(
        "infinite predict scale",
        [*PREDICT, "--scales", "inf", "mine"],
        r"Invalid value for --scales: must be finite numbers separated by commas, got 'inf'",
    ),
    Case(
        "huge crop",
        [*TRAIN, "--set", "data.crop_size=100000"],
        r"data.crop_size must be <= 4096, got 100000",
    ),
    Case(
        "huge base size",
        [*EVALUATE, "--set", "evaluate.base_size=10000000"],
        r"evaluate.base_size must be <= 16384",
    ),
    Case(
        "base size x scale past memory",
        [*EVALUATE, "--set", "evaluate.base_size=8192", "--scales", "1,4"],
        r"evaluate.base_size 8192 x scale 4.0 is a 32768-pixel side",
    ),
    Case(
        "stride larger than crop",
        [
            *EVALUATE,
            "--set",
            "evaluate.stride=600",
            "--set",
            "evaluate.crop=512",
            "--mode",
            "slide",
        ],
        r"evaluate.stride 600 is larger than evaluate.crop 512: .*unpredicted",
    ),
    Case("negative seed", [*TRAIN, "--set", "train.seed=-1"], r"train.seed must be >= 0, got -1"),
    Case(
        "seed past 2^32", [*TUNE, "--set", f"tune.seed={2**64}"], r"tune.seed must be <= 4294967295"
    ),
    Case(
        "huge synthetic scenes",
        [*SHARD, "--set", "synthetic.width=1000000"],
        r"synthetic.width must be <= 16384",
    ),
    Case(
        "run name with a space",
        [*TRAIN, "--set", "train.run_name=a b"],
        r"train.run_name 'a b': must be",
    ),
    Case(
        "search name ..",
        [*TUNE, "--set", "tune.name=.."],
        r"tune.name '\.\.': must be one plain name",
    ),
    Case(
        "search name a path",
        [*TUNE, "--set", "tune.name=x/../../y"],
        r"tune.name 'x/\.\./\.\./y': must be",
    ),
    Case(
        "split name climbing out of the shards",
        [*SHARD, "--set", "shard.splits=[../other/train]"],
        r"shard\.splits\[0\] '\.\./other/train': must be one plain name",
    ),
    Case(
        "split name climbing out of synthetic's output",
        ["synthetic", "--out", "scenes", "--splits", "../../../victim"],
        r"synthetic\.splits\[0\] '\.\./\.\./\.\./victim': must be one plain name",
    ),
    Case(
        "synthetic split count keyed by a path",
        ["synthetic", "--out", "scenes", "--set", "synthetic.num_samples={../x: 2}"],
        r"synthetic\.num_samples '\.\./x': must be one plain name",
    ),
    Case(
        "validation split an absolute path",
        [*TRAIN, "--set", "data.val_split=/etc"],
        r"data\.val_split '/etc': must be one plain name",
    ),
    Case(
        "model name with a slash",
        [*REGISTER, "--name", "a/b"],
        r"register.name 'a/b': must be one plain name",
    ),
    Case(
        "model name with a colon",
        [*REGISTER, "--name", "danet:x"],
        r"register.name 'danet:x': must be",
    ),
    # outputs never land on a store (pipeline/stores.py)
    Case(
        "shard output is the dataset",
        [*SHARD, "--out", "camvid"],
        overlap("shard.out", "camvid", "shard.root"),
    ),
    Case(
        "shard output inside the dataset",
        [*SHARD, "--out", "camvid/shards"],
        overlap("shard.out", "camvid/shards", "shard.root"),
    ),
    Case(
        "shard output on Ray's storage",
        [*SHARD, "--out", "ray"],
        overlap("shard.out", "ray", "train.storage_path"),
    ),
    Case(
        "shard output on MLflow's artifacts",
        [*SHARD, "--out", "mlruns"],
        overlap("shard.out", "mlruns", "mlflow.tracking_uri"),
    ),
    Case("shard output the repository", [*SHARD, "--out", "."], r"shard.out \. overlaps "),
    Case(
        "shard output on the training output",
        [*SHARD, "--out", "previous/train"],
        overlap("shard.out", "previous/train", "train.out"),
    ),
    Case(
        "training output equal to its storage",
        [*TRAIN, "--set", "train.out=ray"],
        r"train.(out|storage_path) ray overlaps train.(out|storage_path)",
    ),
    Case(
        "training output inside its storage",
        [*TRAIN, "--set", "train.out=ray/out"],
        overlap("train.out", "ray/out", "train.storage_path"),
    ),
    Case(
        "storage inside the training output",
        [*TRAIN, "--set", "train.storage_path=previous/train/ray"],
        r"train.(out|storage_path) .* overlaps train.(out|storage_path)",
    ),
    Case(
        "storage the repository",
        [*TRAIN, "--set", "train.storage_path=."],
        r"train\.(out|storage_path) .*overlaps ",
    ),
    Case(
        "storage the shards",
        [*TRAIN, "--set", "train.storage_path=shards"],
        overlap("train.storage_path", "shards", "shard"),
    ),
    Case(
        "training output on MLflow's artifacts",
        [*TRAIN, "--set", "train.out=mlruns"],
        overlap("train.out", "mlruns", "mlflow.tracking_uri"),
    ),
    Case(
        "training output on the shards",
        [*TRAIN, "--set", "train.out=shards/out"],
        overlap("train.out", "shards/out", "shards"),
    ),
    Case(
        "training output the git folder",
        [*TRAIN, "--set", "train.out=.git"],
        overlap("train.out", ".git", "the git repository"),
    ),
    Case(
        "search output on the training output",
        [*TUNE, "--set", "tune.out=previous/train"],
        overlap("tune.out", "previous/train", "train.out"),
    ),
    Case(
        "evaluation output on MLflow's artifacts",
        [*EVALUATE, "--out", "mlruns"],
        overlap("evaluate.out", "mlruns", "mlflow.tracking_uri"),
    ),
    Case(
        "evaluation output the MLflow database",
        [*EVALUATE, "--out", "mlflow.db"],
        overlap("evaluate.out", "mlflow.db", "mlflow.tracking_uri"),
    ),
    Case(
        "evaluation output on the training output",
        [*EVALUATE, "--model", "models:/m@champion", "--out", "previous/train"],
        overlap("evaluate.out", "previous/train", "train.out"),
    ),
    Case(
        "evaluation output on the shards",
        [*EVALUATE, "--out", "shards"],
        overlap("evaluate.out", "shards", "shards"),
    ),
    Case(
        "evaluation output the repository", [*EVALUATE, "--out", "."], r"evaluate.out \. overlaps "
    ),
    Case(
        "evaluation output DVC's cache",
        [*EVALUATE, "--out", ".dvc/cache"],
        overlap("evaluate.out", ".dvc/cache", "DVC's cache"),
    ),
    Case(
        "evaluation output on the dataset",
        [*EVALUATE, "--out", "camvid"],
        overlap("evaluate.out", "camvid", "shard.root"),
    ),
    Case(
        "evaluation output on Ray's storage",
        [*EVALUATE, "--out", "ray/eval"],
        overlap("evaluate.out", "ray/eval", "train.storage_path"),
    ),
    Case(
        "evaluation output holding the registration",
        [*EVALUATE, "--out", "previous/register"],
        overlap("evaluate.out", "previous/register", "register.out"),
    ),
    Case(
        "evaluation output is the model file",
        [*EVALUATE, "--out", "model.pt"],
        overlap("evaluate.out", "model.pt", "evaluate.model"),
    ),
    Case(
        "registration onto params.yaml",
        [*REGISTER, "--set", "register.out=params.yaml"],
        r"register.out params.yaml: holds files the git repository tracks \(params.yaml\)",
        evaluation_of("models:/m/1"),
    ),
    Case(
        "registration onto a tracked file",
        [*REGISTER, "--set", "register.out=notes.md"],
        r"register.out notes.md: holds files the git repository tracks",
        evaluation_of("models:/m/1"),
    ),
    Case(
        "registration onto the manifest",
        [*REGISTER, "--set", "register.out=shards/manifest.json"],
        overlap("register.out", "shards/manifest.json", "shards"),
        evaluation_of("models:/m/1"),
    ),
    Case(
        "registration onto the training metrics",
        [*REGISTER, "--set", "register.out=previous/train/metrics.json"],
        overlap("register.out", "previous/train/metrics.json", "train.out"),
        evaluation_of("models:/m/1"),
    ),
    Case(
        "registration onto the MLflow database",
        [*REGISTER, "--set", "register.out=mlflow.db"],
        overlap("register.out", "mlflow.db", "mlflow.tracking_uri"),
        evaluation_of("models:/m/1"),
    ),
    Case(
        "register output inside a file",
        [*REGISTER, "--set", "register.out=model.pt/registered.json"],
        overlap("register.out", "model.pt/registered.json", "evaluate.model"),
        evaluation_of("models:/m/1"),
    ),
    Case(
        "predict output on the shards",
        [*PREDICT, "--out", "shards", "camvid/val"],
        overlap("predict.out", "shards", "shards"),
    ),
    Case(
        "predict output on MLflow's artifacts",
        [*PREDICT, "--out", "mlruns", "camvid/val"],
        overlap("predict.out", "mlruns", "mlflow.tracking_uri"),
    ),
    Case(
        "predict output the repository",
        [*PREDICT, "--out", ".", "camvid/val"],
        r"predict.out \. overlaps ",
    ),
    Case(
        "predict output is the model file",
        [*PREDICT, "--out", "model.pt", "camvid"],
        r"predict.out model\.pt overlaps (evaluate|predict)\.model ",
    ),
    Case(
        "predict output inside its input folder",
        [*PREDICT, "--out", "camvid/val/out", "camvid/val"],
        r"the output camvid/val/out overlaps the input folder 1|predict.out camvid/val/out overlaps shard.root",
    ),
    Case(
        "synthetic scenes onto the shards",
        ["synthetic", "--out", "shards"],
        overlap("synthetic.out", "shards", "shards"),
    ),
    Case(
        "synthetic scenes without an output folder",
        ["synthetic"],
        r"synthetic.out: give the folder to write \(--out\)",
    ),
    Case(
        "predict without a model",
        ["predict", "camvid/val"],
        r"predict.model: give the model to predict with \(--model\)",
    ),
    Case(
        "synthetic scenes onto the training output",
        ["synthetic", "--out", "previous/train"],
        overlap("synthetic.out", "previous/train", "train.out"),
    ),
    # an output folder that is not the stage's own is refused, not replaced or written into
    Case(
        "evaluation output a folder of the user's",
        [*EVALUATE, "--out", "mine"],
        r"evaluate\.out mine: holds what danet evaluate does not write \(photo\.jpg, "
        r"thesis\.tex\): not its output folder; choose a new or empty one",
        users_folder,
    ),
    Case(
        "evaluation output a folder of predictions",
        [*EVALUATE, "--out", "mine"],
        r"evaluate\.out mine: holds what danet evaluate does not write \(a_labels\.png, "
        r"a_mask\.png, a_overlay\.png\)",
        both(*(write(f"mine/a_{kind}.png", "a picture") for kind in ("mask", "overlay", "labels"))),
    ),
    Case(
        "training output a folder of the user's",
        [*TRAIN, "--set", "train.out=mine"],
        r"train\.out mine: holds what danet train does not write \(photo\.jpg, thesis\.tex\)",
        users_folder,
    ),
    Case(
        "search output a folder of the user's",
        [*TUNE, "--set", "tune.out=mine"],
        r"tune\.out mine: holds what danet tune does not write \(photo\.jpg, thesis\.tex\)",
        users_folder,
    ),
    Case(
        "predict output a folder of the user's",
        [*PREDICT, "--out", "mine", "camvid/val"],
        r"predict\.out mine: holds what danet predict does not write \(photo\.jpg, thesis\.tex\)",
        users_folder,
    ),
    Case(
        "explain output a folder of the user's",
        ["explain", "--model", "model.pt", "--out", "mine", "camvid/val"],
        r"--out mine: holds what danet explain does not write \(photo\.jpg, thesis\.tex\)",
        users_folder,
    ),
    Case(
        "explain output on MLflow's artifacts",
        ["explain", "--model", "model.pt", "--out", "mlruns", "camvid/val"],
        overlap("--out", "mlruns", "mlflow.tracking_uri"),
    ),
    Case(
        "shard output a folder of the user's",
        [*SHARD, "--out", "mine"],
        r"shard\.out mine: holds what danet shard does not write \(photo\.jpg, thesis\.tex\)",
        users_folder,
    ),
    Case(
        "synthetic scenes onto a folder of the user's",
        ["synthetic", "--out", "mine"],
        r"synthetic\.out mine: holds what danet synthetic does not write \(photo\.jpg, "
        r"thesis\.tex\)",
        users_folder,
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
        "shard without a digest",
        EVALUATE,
        r".*manifest.json: shard val-000000.tar: sha256 '' is not a sha256 digest",
        edit_manifest(lambda d: first_val_shard(d).update(sha256="")),
    ),
    Case(
        "shard digest not hex",
        EVALUATE,
        r".*manifest.json: shard val-000000.tar: sha256 'zz' is not",
        edit_manifest(lambda d: first_val_shard(d).update(sha256="zz")),
    ),
    Case(
        "shard name climbing out",
        EVALUATE,
        r".*manifest.json: shard name '\.\./x.tar' is not a plain file name",
        edit_manifest(lambda d: first_val_shard(d).update(name="../x.tar")),
    ),
    Case(
        "absolute shard name",
        EVALUATE,
        r".*manifest.json: shard name '/etc/passwd' is not a plain file name",
        edit_manifest(lambda d: first_val_shard(d).update(name="/etc/passwd")),
    ),
    Case(
        "shard name in a subfolder",
        EVALUATE,
        r".*manifest.json: shard name 'sub/val.tar' is not a plain",
        edit_manifest(lambda d: first_val_shard(d).update(name="sub/val.tar")),
    ),
    Case(
        "split count unlike its shards",
        EVALUATE,
        r".*manifest.json: a split counts 9 samples but its shards hold",
        edit_manifest(lambda d: d["splits"]["val"].update(samples=9)),
    ),
    Case(
        "shard count unlike its content",
        EVALUATE,
        r".*val-000000\.tar: shard holds 3 samples, the manifest says 2",
        edit_manifest(miscount_shard),
    ),
    Case(
        "pixel counts unlike the shards",
        EVALUATE,
        r".*manifest.json: split 'val': \d+ labelled pixels were evaluated, the manifest counts \d+",
        edit_manifest(
            lambda d: d["splits"]["val"]["class_pixels"].__setitem__(
                0, d["splits"]["val"]["class_pixels"][0] + 1
            )
        ),
    ),
    Case(
        "split without images",
        [*EVALUATE, "--split", "test"],
        r".*manifest.json: split 'test' has no images: nothing to evaluate",
        edit_manifest(empty_split),
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
        "train shard copied over the val shard",
        EVALUATE,
        r".*val-000000\.tar: shard (has \d+ bytes, the manifest says|content differs)",
        train_over_val,
    ),
    Case(
        "split not in the shards",
        [*EVALUATE, "--split", "test"],
        r".*manifest.json: has no split 'test'",
    ),
    # foreign, corrupt, mismatched, diverged and code-carrying models
    Case(
        "corrupt model file",
        EVALUATE,
        r".*model\.pt: not a valid DANet model file",
        write("model.pt", b"not a checkpoint"),
    ),
    Case("foreign model file", EVALUATE, r".*model\.pt: not a DANet model file", foreign_model),
    Case(
        "model file that runs code",
        EVALUATE,
        r".*model\.pt: not a valid DANet model file",
        code_carrying_model,
    ),
    Case(
        "model file that runs code, to predict",
        [*PREDICT, "--out", "predicted", "camvid/val"],
        r".*model\.pt: not a valid DANet model file",
        code_carrying_model,
    ),
    # danet export, and .onnx models where a model goes
    Case("export without a model", ["export", "--out", "m.onnx"], r"export\.model: give the model"),
    Case(
        "export to a file that is not .onnx",
        [*EXPORT, "--out", "notes.txt"],
        r"export\.out notes\.txt: must end in \.onnx",
    ),
    Case(
        "export onto a folder",
        [*EXPORT, "--out", "previous.onnx"],
        r"export\.out previous\.onnx: is a folder, not a file",
        lambda tmp: (tmp / "previous.onnx").mkdir(),
    ),
    Case(
        "export into the shards",
        [*EXPORT, "--out", "shards/model.onnx"],
        overlap("export.out", "shards/model.onnx", "shards"),
    ),
    Case(
        "export to an unknown format",
        [*EXPORT, "--format", "tflite"],
        r"export\.format must be one of",
    ),
    Case(
        "export with an unknown attention form",
        [*EXPORT, "--attention", "flash"],
        r"export\.attention must be one of",
    ),
    Case(
        "export a corrupt model file",
        EXPORT,
        r".*model\.pt: not a valid DANet model file",
        write("model.pt", b"not a checkpoint"),
    ),
    Case(
        "INT8 export calibrated on missing shards",
        [*EXPORT, "--quantize", "int8", "--set", "export.calibration_shards=nowhere"],
        r".*nowhere.*shard manifest does not exist",
    ),
    Case(
        "evaluate a corrupt ONNX file",
        [*EVALUATE, "--model", "m.onnx"],
        r"m\.onnx: not a valid ONNX model",
        write("m.onnx", b"\x08\x07garbage"),
    ),
    Case(
        "predict with an ONNX file danet export did not write",
        ["predict", "--model", "m.onnx", "--out", "predicted", "camvid/val"],
        r"m\.onnx: an ONNX file without 'classes' metadata \(not from danet export\)",
        lambda tmp: foreign_onnx(tmp / "m.onnx"),
    ),
    Case(
        "refit from a folder no search wrote",
        [*TRAIN, "--refit", "previous/train"],
        r"--refit previous/train: no best_params.yaml \(run danet tune first\)",
    ),
    Case(
        "search a key a trial cannot change",
        [*TUNE, "--set", 'tune.space={"model.backbone": {"choice": ["resnet50d"]}}'],
        r"tune.space.model.backbone: a search holds model.backbone fixed",
    ),
    Case(
        "search a value no trial could train with",
        [*TUNE, "--set", 'tune.space={"data.crop_size": {"choice": [32, 4096]}}'],
        r"tune.space.data.crop_size 4096: data.crop_size 4096 is larger than any crop",
    ),
    Case(
        "register with an ONNX file that does not exist",
        [*REGISTER, "--onnx", "nowhere.onnx"],
        r"nowhere\.onnx: model file does not exist",
        evaluation_of("models:/m/1"),
    ),
    Case(
        "register with a file that is not ONNX",
        [*REGISTER, "--onnx", "notes.md"],
        r"register\.onnx notes\.md: not an \.onnx file",
        evaluation_of("models:/m/1"),
    ),
    Case(
        "register with an ONNX file danet export did not write",
        [*REGISTER, "--onnx", "m.onnx"],
        r"m\.onnx: an ONNX file without 'classes' metadata",
        both(evaluation_of("models:/m/1"), lambda tmp: foreign_onnx(tmp / "m.onnx")),
    ),
    Case(
        "model with NaN weights",
        EVALUATE,
        r".*model\.pt: weight .* holds NaN or infinite values",
        edit_model(nan_weight),
    ),
    Case(
        "model with a short class table",
        EVALUATE,
        r".*model\.pt: 3 class names and 11 colours for a model of 11 classes",
        edit_model(lambda p: p.update(classes=p["classes"][:3])),
    ),
    Case(
        "pickled MLflow model",
        [*EVALUATE, "--model", "models:/m/1"],
        r"models:/m/1: not a model logged by danet train: refused",
        pytorch_flavour_model,
        changes=("mlruns",),
    ),
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
    # scores that are not numbers
    Case(
        "metrics.json not JSON",
        REGISTER,
        r".*eval\.json: not metrics written by danet evaluate",
        write("eval.json", "{oops"),
    ),
    Case(
        "NaN mIoU",
        REGISTER,
        r".*eval\.json: not metrics written by danet evaluate \(NaN is not a number",
        evaluation_of("models:/m/1", miou="NAN"),
    ),
    Case(
        "mIoU over 1",
        REGISTER,
        r".*eval\.json: miou is 1.5, not a score in \[0, 1\]",
        evaluation_of("models:/m/1", miou=1.5),
    ),
    Case(
        "mIoU null",
        REGISTER,
        r".*eval\.json: miou is None, not a score",
        evaluation_of("models:/m/1", miou=None),
    ),
    Case(
        "mIoU a string",
        REGISTER,
        r".*eval\.json: miou is '0.9', not a score",
        evaluation_of("models:/m/1", miou="0.9"),
    ),
    Case(
        "an evaluation of no image",
        REGISTER,
        r".*eval\.json: evaluates 0 images: not registered",
        evaluation_of("models:/m/1", images=0),
    ),
    Case(
        "metrics.json naming no model",
        REGISTER,
        r"models:/nope/1: not an MLflow model",
        evaluation_of("models:/nope/1"),
    ),
    Case("metrics.json missing", REGISTER, r".*eval\.json: evaluation metrics do not exist"),
    # unreachable, full, read-only or corrupt Ray, MLflow and output locations
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
        "unreachable object store",
        [*EVALUATE, "--set", "evaluate.shards=s3://danet/shards"],
        r'Could not connect to the endpoint URL: "http://127.0.0.1:9/danet/shards/manifest.json": '
        r"the object store cannot be reached",
        env=(("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),),
    ),
    Case(
        "unreachable MLflow server, to register",
        [*REGISTER, "--set", "mlflow.tracking_uri=http://127.0.0.1:9"],
        r"mlflow.tracking_uri http://127.0.0.1:9: server unreachable",
        evaluation_of("models:/m/1"),
    ),
    Case(
        "unreachable MLflow server, to predict",
        [
            "predict",
            "--model",
            "models:/m@champion",
            "--out",
            "p",
            "--set",
            "mlflow.tracking_uri=http://127.0.0.1:9",
            "camvid/val",
        ],
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
        "corrupt MLflow database, to register",
        REGISTER,
        r"mlflow.tracking_uri sqlite:///mlflow\.db: the MLflow database cannot be used \(DatabaseError: file is not a database\)",
        both(evaluation_of("models:/m/1"), corrupt_mlflow_db),
    ),
    Case(
        "corrupt MLflow database, to evaluate a registered model",
        [*EVALUATE, "--model", "models:/m@champion"],
        r"mlflow.tracking_uri sqlite:///mlflow\.db: the MLflow database cannot be used \(DatabaseError",
        corrupt_mlflow_db,
    ),
    Case(
        "full disk under the shards",
        [*SHARD, "--out", "full/shards"],
        r".*full.*: no space left on the device",
        full_disk("full"),
    ),
    Case(
        "full disk under the evaluation",
        [*EVALUATE, "--out", "full/eval"],
        r".*full.*: no space left on the device",
        full_disk("full"),
    ),
    Case(
        "full disk under the registration",
        [*REGISTER, "--set", "register.out=full/registered.json"],
        r".*full.*: no space left on the device",
        both(pytorch_flavour_model, evaluation_of("models:/m/1"), full_disk("full")),
        changes=("mlruns",),
    ),
    Case(
        "full disk under the predictions",
        [*PREDICT, "--out", "full/predicted", "camvid/val"],
        r".*full.*: no space left on the device",
        full_disk("full"),
    ),
    Case(
        "read-only evaluation folder",
        [*EVALUATE, "--out", "ro/eval"],
        r".*ro.*(read-only|cannot write)",
        full_disk("ro", read_only=True),
    ),
    Case(
        "read-only shard folder",
        [*SHARD, "--out", "ro/shards"],
        r".*ro.*(read-only|cannot write)",
        full_disk("ro", read_only=True),
    ),
    Case(
        "evaluation output is a file",
        [*EVALUATE, "--out", "notes.txt"],
        r"evaluate.out notes\.txt: exists and is not a folder",
        write("notes.txt", "a user's file"),
    ),
    Case(
        "training output is a file",
        [*TRAIN, "--set", "train.out=model.pt"],
        r"train.out model\.pt: exists and is not a folder",
    ),
    Case(
        "predict output is a file",
        [*PREDICT, "--out", "notes.txt", "camvid"],
        r"predict.out notes\.txt: exists and is not a folder",
        write("notes.txt", "a user's file"),
    ),
    # issue 35: onnx, debris, ray
    Case(
        "ONNX file whose classes are not its output channels",
        ["predict", "--model", "m.onnx", "--out", "predicted", "camvid/val"],
        r"m\.onnx: its output 'logits' has shape \['N', 3, 'H', 'W'\] but its metadata names 11 "
        r"classes",
        onnx_of_other_classes,
    ),
    Case(
        "register an ONNX file whose classes are not its output channels",
        [*REGISTER, "--onnx", "m.onnx"],
        r"m\.onnx: its output 'logits' has shape .* but its metadata names 11 classes",
        both(evaluation_of("models:/m/1"), onnx_of_other_classes),
    ),
    Case(
        "search grid of a million points",
        [
            *TUNE,
            "--set",
            "tune.space="
            + json.dumps(
                {
                    "train.lr": {"grid": [i / 1e5 for i in range(1, 1001)]},
                    "train.momentum": {"grid": [i / 1e3 for i in range(1000)]},
                }
            ),
        ],
        r"tune\.space: 2,000,000 trials \(1000 x 1000 x tune\.num_samples 2\): at most 10,000",
    ),
    Case(
        "search seed range past 2**63",
        [*TUNE, "--set", 'tune.space={"train.seed": {"randint": [0, 18446744073709551616]}}'],
        r"tune\.space\.train\.seed\.randint \[0, 18446744073709551616\]: both ends must lie",
    ),
    Case(
        "run name of a search's trials folder, with --restart",
        [*TRAIN, "--restart", "--run-name", "tune-x-trials"],
        r"train\.run_name 'tune-x-trials': .*ray/tune-x-trials is a search's trials folder",
        write("ray/tune-x-trials/tune-x-1/checkpoint_000000/state.pt", "a trial's checkpoint"),
    ),
    Case(
        "run name of a search, with --restart",
        [*TRAIN, "--restart", "--run-name", "mine"],
        r"train\.run_name 'mine': .*ray/mine is a search's folder",
        write("ray/mine/tuner.pkl", "a search's state"),
    ),
    Case(
        "search named after a training run",
        [*TUNE, "--set", "tune.name=run1"],
        r"tune\.name 'run1': .*ray/run1 is a training run's folder",
        write("ray/run1/checkpoint_000001/state.pt", "a run's checkpoint"),
    ),
    # a run's or search's folder holding what the stage does not write is a user's: never
    # deleted (--restart) nor trained into
    Case(
        "run name of a folder of the user's, with --restart",
        [*TRAIN, "--restart", "--set", "train.storage_path=mine", "--set", "train.run_name=docs"],
        r"train\.run_name 'docs': .*mine/docs holds what danet train does not write "
        r"\(thesis\.txt\): not its run folder; choose another run name$",
        both(users_folder, write("mine/docs/thesis.txt", "months of work")),
    ),
    Case(
        "run name of a folder of the user's, resumed",
        [*TRAIN, "--set", "train.storage_path=mine", "--set", "train.run_name=docs"],
        r"train\.run_name 'docs': .*mine/docs holds what danet train does not write "
        r"\(thesis\.txt\)",  # a checkpoint beside it: still a folder of the user's
        both(
            users_folder,
            write("mine/docs/thesis.txt", "months of work"),
            write("mine/docs/checkpoint_000001/state.pt", "a checkpoint"),
        ),
    ),
    Case(
        "run name of a file of the user's, with --restart",
        [*TRAIN, "--restart", "--set", "train.storage_path=mine", "--run-name", "thesis.tex"],
        r"train\.run_name 'thesis\.tex': .*mine/thesis\.tex is a file, not a run folder",
        users_folder,
    ),
    Case(
        "search name of a folder of the user's, with --restart",
        [*TUNE, "--restart", "--set", "train.storage_path=mine", "--set", "tune.name=docs"],
        r"tune\.name 'docs': .*mine/docs holds what danet tune does not write \(thesis\.txt\): "
        r"not its search folder; choose another search name$",
        both(users_folder, write("mine/docs/thesis.txt", "months of work")),
    ),
    Case(
        "search whose trials folder is the user's, with --restart",
        [*TUNE, "--restart", "--set", "train.storage_path=mine", "--set", "tune.name=docs"],
        r"tune\.name 'docs': .*mine/docs-trials holds what danet tune does not write "
        r"\(docs-1a2b3c4d/thesis\.txt, photo\.jpg\): not its trials folder",
        both(
            users_folder,
            write("mine/docs/tuner.pkl", "a search's state"),
            write("mine/docs-trials/photo.jpg", "a photo"),
            write("mine/docs-trials/docs-1a2b3c4d/thesis.txt", "months of work"),
        ),
    ),
    Case(
        "workers that need more CPUs than any node has",
        [*TRAIN, "--set", "train.cpus_per_worker=4096"],
        r"train\.cpus_per_worker 4096: no node of the Ray cluster has 4096 CPU",
    ),
    Case(
        "trials that need more CPUs than any node has",
        [*TUNE, "--set", "tune.cpus_per_trial=4096"],
        r"train\.cpus_per_worker 4096: no node of the Ray cluster has 4096 CPU .*tune\.cpus_per_trial",
    ),
    Case(
        "refit over best params the search never searched",
        [*TRAIN, "--refit", "search"],
        r"--refit search/best_params\.yaml: train\.epochs was not searched",
        both(
            write("search/best_params.yaml", "train: {lr: 0.01, epochs: 500}\n"),
            write(
                "search/search.json",
                json.dumps(
                    {
                        "search": "s",
                        "search_run_id": "r",
                        "best_trial": "t",
                        "values": {"train.lr": 0.01},
                    }
                ),
            ),
        ),
    ),
    Case(
        "refit over best params that leave out a searched key",
        [*TRAIN, "--refit", "search"],
        r"--refit search/best_params\.yaml: train\.lr is missing but the winning trial trained "
        r"0\.0123456789 \(search\.json\): restore it, or train those params with --params "
        r"instead of --refit$",
        both(write("search/best_params.yaml", ""), write("search/search.json", SEARCH_JSON)),
    ),
    Case(
        "refit over best params edited by hand",
        [*TRAIN, "--refit", "search"],
        r"--refit search/best_params\.yaml: train\.lr is 0\.5 but the winning trial trained "
        r"0\.0123456789 \(search\.json\)",
        both(
            write("search/best_params.yaml", "train: {lr: 0.5}\n"),
            write("search/search.json", SEARCH_JSON),
        ),
    ),
    Case(
        "refit over a malformed best_params.yaml",
        [*TRAIN, "--refit", "search"],
        r"--refit search/best_params\.yaml: train must be a mapping of params",
        both(
            write("search/best_params.yaml", "train: 5\n"),
            write(
                "search/search.json",
                json.dumps(
                    {
                        "search": "s",
                        "search_run_id": "r",
                        "best_trial": "t",
                        "values": {"train.lr": 0.01},
                    }
                ),
            ),
        ),
    ),
]

# issue 35: pixels, collisions, windows


def image_file(path: str, array: np.ndarray, fmt: str = "") -> Setup:
    def setup(tmp: Path) -> None:
        target = tmp / path
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(target, format=fmt or None)

    return setup


def images_at(*paths: str) -> Setup:
    """Small black images at ``paths`` (the format from each suffix)."""
    return both(*(image_file(p, np.zeros((6, 8, 3), np.uint8)) for p in paths))


def bomb() -> bytes:
    """A PNG of 8000x7000 black pixels (56 M, over the 50 M limit) in ~60 kB."""
    buffer = io.BytesIO()
    Image.new("L", (8000, 7000)).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def replace_in_shard(change: Callable[[bytes], bytes]) -> Setup:
    """The first image of the first val shard replaced by ``change(its bytes)``, the manifest's
    digest and size updated to match: only decoding the image finds it."""

    def setup(tmp: Path) -> None:
        path = shard_file(tmp)
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        out, done = io.BytesIO(), False
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in members:
                image = member.name.endswith((".png", ".jpg")) and ".seg." not in member.name
                if image and not done:
                    data, done = change(data), True
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        path.write_bytes(out.getvalue())

        def digest_of(data: dict) -> None:
            first_val_shard(data)["sha256"] = hashlib.sha256(out.getvalue()).hexdigest()
            first_val_shard(data)["bytes"] = len(out.getvalue())

        edit_manifest(digest_of)(tmp)

    return setup


FLOAT_RAMP = np.linspace(0, 255, 48, dtype=np.float32).reshape(6, 8)  # a float image, not [0, 1]
CASES.extend(
    [
        Case(
            "float image outside [0, 1]",
            SHARD,
            r".*camvid/val/img1\.png: unsupported pixels: float pixels from 0 to 255",
            image_file("camvid/val/img1.png", FLOAT_RAMP, "TIFF"),
        ),
        Case(
            "decompression bomb as a dataset image",
            SHARD,
            r".*camvid/val/img2\.png: too large to decode safely \(8000x7000 is over",
            lambda t: write("camvid/val/img2.png", bomb())(t),
        ),
        Case(
            "truncated image inside a shard",
            EVALUATE,
            r".*val-000000\.tar:\w+: bad image \(not a readable image \(truncated or corrupt",
            replace_in_shard(lambda data: data[: len(data) // 2]),
        ),
        Case(
            "decompression bomb inside a shard",
            EVALUATE,
            r".*val-000000\.tar:\w+: bad image \(8000x7000 is over the 50,000,000 pixel limit",
            replace_in_shard(lambda _: bomb()),
        ),
        Case(
            "predict inputs whose stems collide across folders",
            [*PREDICT, "--out", "predicted", "in/a/x.png", "in/b/x.png"],
            r"in/b/x\.png: would write x_mask\.png, as in/a/x\.png does: two inputs never share",
            images_at("in/a/x.png", "in/b/x.png"),
        ),
        Case(
            "predict inputs of one stem in two formats",
            [*PREDICT, "--out", "predicted", "in"],
            r"in/x\.png: would write x_mask\.png, as in/x\.jpg does",
            images_at("in/x.png", "in/x.jpg"),
        ),
        Case(
            "predict inputs whose names differ only in case",
            [*PREDICT, "--out", "predicted", "in"],
            r"in/x\.png: would write x_mask\.png, as in/X\.png does \(X_mask\.png: one file on a "
            r"case-insensitive disk\)",
            images_at("in/X.png", "in/x.png"),
        ),
        Case(
            "explain inputs whose stems collide",
            ["explain", "--model", "model.pt", "--out", "explained", "in/a", "in/b"],
            r"in/b/x\.png: would write x_pam\.png, as in/a/x\.png does",
            images_at("in/a/x.png", "in/b/x.png"),
        ),
        Case(
            "predict scale past one forward pass",
            [*PREDICT, "--out", "predicted", "--scales", "8", "--mode", "whole", "in/big.png"],
            r"in/big\.png: 600x600 at scale 8 takes a 4800x4800 forward pass: over the "
            r"16,777,216 pixels of one pass",
            image_file("in/big.png", np.zeros((600, 600, 3), np.uint8)),
            code=1,
        ),
        Case(
            "predict stride larger than crop",
            [*PREDICT, "--out", "predicted", "--set", "predict.stride=600", "in"],
            r"predict.stride 600 is larger than predict.crop 512: .*unpredicted",
            image_file("in/x.png", np.zeros((6, 8, 3), np.uint8)),
        ),
    ]
)


@pytest.fixture(scope="session")
def model_bytes(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """One DANet-R18d model file for the shards' classes, written once, copied into each case."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return write_model_file(path, tiny_shards, val_miou=0.5).read_bytes()


@pytest.fixture
def case_project(
    tmp_path: Path, tiny_shards: Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    project(tmp_path, tiny_shards, model_bytes)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    try:
        yield tmp_path
    finally:
        while MOUNTS:
            subprocess.run(["umount", "-l", str(MOUNTS.pop())], check=False)


def run_case(case: Case, tmp: Path) -> None:
    """Run one case and assert what every case promises."""
    if case.setup:
        case.setup(tmp)
    before = {p: digest(tmp / p) for p in STORES}
    signal.alarm(120)  # a case that hangs (a FIFO opened, say) fails instead of stalling CI
    try:
        result = runner.invoke(app, case.args)
    finally:
        signal.alarm(0)
    text = result.output
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in text, text[-3000:]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == case.code, f"exit code {result.exit_code}: {text[-1500:]}"
    assert len(errors) == 1, f"not one error line: {errors or text[-1500:]}"
    assert re.match(case.message, errors[0][len("error: ") :]), errors[0]
    changed = [p for p, d in before.items() if p not in case.changes and digest(tmp / p) != d]
    assert not changed, f"stores changed: {changed}"
    assert not list(tmp.rglob(".*.tmp-*")), "half-written output left"
    assert not (tmp / PWNED).exists(), "a model ran code"


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name) for c in CASES],  # in-process, a few seconds at most: fast tier
)
def test_bad_input(case: Case, case_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    for name, value in case.env:
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance keeps the endpoint it was made with
    try:
        run_case(case, case_project)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_the_catalogue_names_each_case_once() -> None:
    names = [c.name for c in CASES] + [name for name, _, _ in SIGNALS]
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)


SIGNALS = [
    ("SIGINT during shard", ["shard", "--params", "big.yaml"], signal.SIGINT),
    ("SIGTERM during evaluate", ["evaluate", "--scales", "1,1,1,1,1,1,1,1"], signal.SIGTERM),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "args", "sig"), SIGNALS, ids=[s[0] for s in SIGNALS])
def test_signal_leaves_earlier_outputs(
    name: str, args: list[str], sig: signal.Signals, case_project: Path
) -> None:
    """A signal while a stage writes: the earlier output stays, nothing half-written."""
    tmp = case_project
    danet = str(Path(sys.executable).parent / "danet")
    big = {
        "synthetic": {"num_samples": {"train": 400}, "width": 320, "height": 240},
        "shard": {
            "dataset": "synthetic",
            "splits": ["train"],
            "out": "previous/shard",
            "workers": 1,
        },
    }
    (tmp / "big.yaml").write_text(json.dumps(big))
    before = digest(tmp / "previous")
    process = subprocess.Popen(
        [danet, *args],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=takes_ctrl_c,
    )
    deadline = time.monotonic() + 60
    while (
        not list(tmp.rglob(".*.tmp-*")) and time.monotonic() < deadline and process.poll() is None
    ):
        time.sleep(0.05)  # the stage has started writing
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert b"Traceback" not in stderr, stderr.decode()[-2000:]
    assert process.returncode != 0, "it finished before the signal"
    assert digest(tmp / "previous") == before
    assert not list(tmp.rglob(".*.tmp-*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_an_import_waits_for_the_import(
    sig: signal.Signals, tmp_path: Path
) -> None:
    """A signal that lands while a module is imported stops the command once the import is
    over: raised inside a C extension's initialisation it would come out as ImportError
    ("initialization failed") with a traceback (seen in CI: SIGTERM during evaluate's
    matplotlib import)."""
    (tmp_path / "selfsignal.py").write_text(
        "import os, signal, time\n"
        f"os.kill(os.getpid(), {int(sig)})\n"
        "time.sleep(0.3)  # the handler runs here, inside the import\n"
        "DONE = True\n"
    )
    script = (
        "import sys, time\n"
        "from pipeline.cli import app\n"
        "from pipeline.command import DanetGroup\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "class Probe(DanetGroup):\n"
        "    def invoke(self, ctx):\n"
        "        import selfsignal\n"
        "        print('imported', selfsignal.DONE, flush=True)\n"
        "        time.sleep(10)\n"
        "        print('not stopped', flush=True)\n"
        "Probe(name='probe').main([])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=takes_ctrl_c,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.stdout == "imported True\n", done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == (143 if sig == signal.SIGTERM else 130), done.stderr


def test_predict_lists_bad_and_oversized_files(
    case_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """predict: each bad file is listed on a line of its own (exit 1); the good ones are written;
    an image past PIL's decompression limit is an error for that file only."""
    tmp = case_project
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(images / "good.png")
    (images / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((300, 400), dtype=np.uint8)).save(images / "huge.png")
    os.mkfifo(images / "pipe.png")
    monkeypatch.setattr("pipeline.images.MAX_PIXELS", 10_000)  # huge.png: 120k pixels
    result = runner.invoke(app, [*PREDICT, "--out", "predicted", "images", "images/pipe.png"])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in result.output and result.exit_code == 1, result.output[-1500:]
    wanted = [
        r"images/huge\.png: too large to decode safely",
        r"images/notes\.txt: not a readable image",
        r"images/pipe\.png: does not exist or is not a regular file",
    ]
    assert len(errors) == 3 and all(any(re.search(w, e) for e in errors) for w in wanted), errors
    written = sorted(p.name for p in (tmp / "predicted").iterdir())
    assert written == ["good_labels.png", "good_mask.png", "good_overlay.png"]


def test_an_experiment_in_dvcs_temporary_copy_writes_its_outputs(
    case_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dvc exp run --temp`` and queued experiments run the stages in a copy of the project
    under .dvc/tmp/exps (DVC_ROOT names the project): their outputs there are not refused, the
    cache and the project's own stores still are."""
    from pipeline.config import ConfigError, load_params
    from pipeline.stores import check_outputs

    copy = case_project / ".dvc" / "tmp" / "exps" / "standalone" / "tmp1234"
    copy.mkdir(parents=True)
    shutil.copy(case_project / "params.yaml", copy / "params.yaml")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(case_project))
    p = load_params("params.yaml")
    check_outputs(p, {"train.out": "outputs/train", "evaluate.out": "outputs/eval"})
    with pytest.raises(ConfigError, match="overlaps DVC's cache"):
        check_outputs(p, {"evaluate.out": str(case_project / ".dvc" / "cache")})
    with pytest.raises(ConfigError, match=r"overlaps train\.storage_path"):
        check_outputs(p, {"evaluate.out": str(case_project / "ray")})


# issue 35: onnx, debris, ray


def danet_subprocess(
    tmp: Path, args: list[str], env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``danet ARGS`` in the case project, as a process of its own (Ray in a process that ends)."""
    danet = str(Path(sys.executable).parent / "danet")
    return subprocess.run(
        [danet, *args],
        cwd=tmp,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_training_workers_that_cannot_start_end_the_command(case_project: Path) -> None:
    """Ray Train retries a worker group that does not start (not placed in time: no resources,
    another Ray instance competing) a bounded number of times, then the command ends in one
    line saying what to do (was: retried with "max allowed: inf" until killed)."""
    tmp = case_project
    before = {p: digest(tmp / p) for p in STORES if p != "ray"}
    # two workers that must each have a node of their own, on a one-node Ray: never placed,
    # whatever the machine's speed (a short start timeout alone passed on a fast machine)
    never = [
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "train.placement_strategy=STRICT_SPREAD",
    ]
    done = danet_subprocess(  # bounded: a command that retried without end fails the timeout
        tmp,
        [*TRAIN, *(x for item in never for x in ("--set", item))],
        env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "2"},
        timeout=240,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and re.match(
        r"error: Ray could not start the training workers \(.*; 3 tries\): free the cluster",
        errors[0],
    ), errors or done.stderr[-3000:]
    assert {p: digest(tmp / p) for p in before} == before
    assert not (tmp / "previous/train/model.pt").exists()


def test_the_next_run_cleans_a_killed_runs_temporary_files(tmp_path: Path) -> None:
    """A command SIGKILLed while it wrote leaves its temporary sibling (a 51 MB ONNX export, a
    shard folder): the next write of the same output deletes those of this host whose writer is
    dead (the pid in the name), never a live writer's."""
    from pipeline.outputs import atomic_dir, atomic_file, tmp_prefix

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is no process now
    out = tmp_path / "model.onnx"
    live = tmp_prefix(out).replace(f"-{os.getpid()}-", f"-{os.getppid()}-")
    killed = tmp_prefix(out).replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    debris = [tmp_path / f"{killed}abc.onnx", tmp_path / f"{killed}abc.onnx.float.onnx"]
    for path in [*debris, tmp_path / f"{live}xyz.onnx"]:
        path.write_bytes(b"\0" * 1024)
    other_host = tmp_path / f".model.onnx.tmp-00000000-{dead.pid}-q.onnx"
    other_host.write_bytes(b"another host's")
    with atomic_file(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and not any(p.exists() for p in debris)
    assert (tmp_path / f"{live}xyz.onnx").exists() and other_host.exists()

    shards = tmp_path / "shards"
    stale = tmp_path / (tmp_prefix(shards).replace(f"-{os.getpid()}-", f"-{dead.pid}-") + "k")
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "train-000000.tar").write_bytes(b"half a shard")
    with atomic_dir(shards) as folder:
        (folder / "manifest.json").write_text("{}")
    assert not stale.exists() and (shards / "manifest.json").is_file()

    # a killed export to another name (k1.onnx), then an export to k2.onnx: k1's debris goes too
    k1 = tmp_path / (
        tmp_prefix(tmp_path / "k1.onnx").replace(f"-{os.getpid()}-", f"-{dead.pid}-") + "z.onnx"
    )
    k1.write_bytes(b"\0" * 1024)
    with atomic_file(tmp_path / "k2.onnx") as tmp:
        tmp.write_text("k2")
    assert not k1.exists() and (tmp_path / f"{live}xyz.onnx").exists() and other_host.exists()
