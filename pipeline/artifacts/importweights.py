"""``danet import-weights``: released DANet weights -> a ``model.pt`` the whole pipeline loads.

Two layouts are read, renamed tensor by tensor onto ``build_danet``'s names (BN running statistics
included), and checked against this model's names and shapes before anything is written:

- ``official``: junfu1115/DANet (``encoding/models``): ``pretrained.*`` is the dilated ResNet,
  ``head.*`` the ``DANetHead`` (conv5a/conv5c -> sa/sc -> conv51/conv52 -> conv6/conv7/conv8). Tag
  v0.5.0, the paper's code and its released DANet101, has the 7x7 stem (timm ``resnet101``); v1.0.0
  has ``deep_stem`` at 64-64-128 channels (timm ``resnet101s``). Its README runs the released model
  with multi-grid 4, 8, 16: the default here. Its unused ImageNet classifier ``pretrained.fc`` is
  dropped.
- ``mmseg``: mmsegmentation's ``EncoderDecoder``: ``backbone.*`` ResNetV1c (timm ``resnet101c``),
  ``decode_head.*`` ``DAHead`` (pam_in_conv -> pam -> pam_out_conv -> pam_conv_seg, the same for
  cam, conv_seg on their sum) and ``auxiliary_head.*``, the FCN head on c3 (our ``aux_head``).

Any other tensor, a missing one or a shape that differs is refused in one line naming the first
such key. ResNets with BasicBlocks or ResNet-D downsampling are refused: timm's versions of them
compute something else with the same weights (see danet/backbone.py). Files are read with
``torch.load(weights_only=True)``: a checkpoint cannot run code. The upsampling differs slightly:
the official code interpolates with ``align_corners=True``, this model (and mmseg) with False.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # numpy 2 (a file pickled by numpy 1 names numpy.core, allowed below under that name)
    from numpy._core.multiarray import scalar as SCALAR
except ImportError:  # numpy 1
    from numpy.core.multiarray import scalar as SCALAR  # type: ignore[no-redef]

from danet import DANetConfig, build_danet
from pipeline.artifacts.modelfile import ModelInfo, file_sha256, load_state, save_model_file
from pipeline.data.readers import READERS
from pipeline.errors import ConfigError, ModelError, first_line
from pipeline.outputs import atomic_file, check_file_output

SOURCES = ("official", "mmseg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # both references normalise RGB with ImageNet's statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_MULTI_GRID = (4, 8, 16)  # the official README's --multi-grid --multi-dilation 4 8 16
DATASETS = ("cityscapes", "voc", "pascal_context", "ade20k", "cocostuff", "cocostuff10k", "camvid")

_HEAD = {  # our head's names after "head." -> the official DANetHead's and mmseg DAHead's
    "pam_in.0.": ("conv5a.0.", "pam_in_conv.conv."),
    "pam_in.1.": ("conv5a.1.", "pam_in_conv.bn."),
    "cam_in.0.": ("conv5c.0.", "cam_in_conv.conv."),
    "cam_in.1.": ("conv5c.1.", "cam_in_conv.bn."),
    "pam.query.": ("sa.query_conv.", "pam.query_project."),
    "pam.key.": ("sa.key_conv.", "pam.key_project."),
    "pam.value.": ("sa.value_conv.", "pam.value_project."),
    "pam.gamma": ("sa.gamma", "pam.gamma.scale"),
    "cam.gamma": ("sc.gamma", "cam.gamma.scale"),
    "pam_out.0.": ("conv51.0.", "pam_out_conv.conv."),
    "pam_out.1.": ("conv51.1.", "pam_out_conv.bn."),
    "cam_out.0.": ("conv52.0.", "cam_out_conv.conv."),
    "cam_out.1.": ("conv52.1.", "cam_out_conv.bn."),
    "pam_cls.1.": ("conv6.1.", "pam_conv_seg."),
    "cam_cls.1.": ("conv7.1.", "cam_conv_seg."),
    "fused_cls.1.": ("conv8.1.", "conv_seg."),
}
_MMSEG_AUX = {
    "conv.0.": "convs.0.conv.",
    "conv.1.": "convs.0.bn.",
    "cls.1.": "conv_seg.",
}
_MMSEG_DEEP_STEM = {"0": "conv1.0", "1": "conv1.1", "3": "conv1.3", "4": "conv1.4", "6": "conv1.6"}
_DROPPED = {"official": ("pretrained.fc.",), "mmseg": ()}  # never read by the reference's forward
# backbone layouts that are timm models here: (stem, its first width, blocks per stage) -> name
_STEMS = {("7x7", 64): "", ("deep", 32): "c", ("deep", 64): "s"}
_DEPTHS: dict[tuple[int, ...], str] = {(3, 4, 6, 3): "50", (3, 4, 23, 3): "101"}


class WeightsMismatch(ModelError):
    """A released weights file that does not fit its layout or this model (exit 2)."""


def rules(source: str, deep_stem: bool) -> list[tuple[str, str]]:
    """(their prefix, our prefix) pairs: a key is renamed by the longest prefix that matches it,
    so the same table renames both ways."""
    if source == "official":
        pairs = [("pretrained.", "backbone.body.")]
        pairs += [(f"head.{theirs[0]}", f"head.{ours}") for ours, theirs in _HEAD.items()]
        return pairs
    pairs = [(f"decode_head.{theirs[1]}", f"head.{ours}") for ours, theirs in _HEAD.items()]
    pairs += [(f"auxiliary_head.{t}", f"aux_head.{o}") for o, t in _MMSEG_AUX.items()]
    pairs += [(f"backbone.layer{i}.", f"backbone.body.layer{i}.") for i in range(1, 5)]
    if deep_stem:
        pairs += [
            (f"backbone.stem.{t}.", f"backbone.body.{o}.") for t, o in _MMSEG_DEEP_STEM.items()
        ]
        pairs.append(("backbone.stem.7.", "backbone.body.bn1."))
    else:
        pairs += [
            ("backbone.conv1.", "backbone.body.conv1."),
            ("backbone.bn1.", "backbone.body.bn1."),
        ]
    return pairs


def rename(key: str, pairs: list[tuple[str, str]], back: bool = False) -> str | None:
    """``key`` under the longest matching prefix's other name (ours -> theirs with ``back``)."""
    best: tuple[str, str] | None = None
    for theirs, ours in pairs:
        src, dst = (ours, theirs) if back else (theirs, ours)
        matches = key == src or (src.endswith(".") and key.startswith(src))
        if matches and (best is None or len(src) > len(best[0])):
            best = (src, dst)
    return None if best is None else best[1] + key[len(best[0]) :]


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's state dict ('module.' prefixes removed) and its mmseg ``meta``.

    Weights only: the official trainer stores its best score as a numpy float, so numpy's scalar
    and dtype constructors (which build values, never run code) are allowed besides torch's own.
    """
    if not path.is_file():
        raise WeightsMismatch(path, "does not exist")
    dtypes = getattr(np, "dtypes", None)  # the dtype classes (numpy >= 1.25) numpy 2 pickles
    classes = [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes else []
    allowed: list[Any] = [SCALAR, (SCALAR, "numpy.core.multiarray.scalar"), np.dtype, *classes]
    try:
        with torch.serialization.safe_globals(allowed):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    # any error of torch's restricted unpickler (a class it refuses, bytes that are no pickle)
    except Exception as err:
        raise WeightsMismatch(
            path, f"not a weights-only checkpoint ({load_error(err)}): refused, nothing in it ran"
        ) from None
    if not isinstance(payload, dict):
        raise WeightsMismatch(path, f"holds a {type(payload).__name__}, not a checkpoint dict")
    state = payload.get("state_dict", payload)
    meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}
    if not isinstance(state, dict) or not state:
        raise WeightsMismatch(path, "its 'state_dict' is not a non-empty dict of tensors")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise WeightsMismatch(path, f"key {bad!s}: not a tensor (no 'state_dict' in the file?)")
    return {str(k).removeprefix("module."): v for k, v in state.items()}, dict(meta or {})


def load_error(err: BaseException) -> str:
    """The line of torch's refusal that names what it refused (``... GLOBAL posix.system ...``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = next((ln for ln in lines if re.search(r"GLOBAL|[Uu]nsupported|but got", ln)), None)
    return (found or first_line(err))[:200]


def backbone_name(ours: dict[str, torch.Tensor], source: str, path: Path) -> str:
    """The timm model whose layout the (renamed) backbone weights have, or a refusal saying why."""
    body = "backbone.body."
    if f"{body}layer1.0.conv3.weight" not in ours:
        raise WeightsMismatch(
            path,
            f"key {rename_back(f'{body}layer1.0.conv3.weight', source, ours)} is missing: a "
            "ResNet of BasicBlocks, whose dilated stages timm builds differently: not imported",
        )
    if any(re.fullmatch(rf"{re.escape(body)}layer\d\.0\.downsample\.2\.weight", k) for k in ours):
        raise WeightsMismatch(
            path,
            "a ResNet-D (average-pool downsampling): timm's resnet*d also averages 2x2 in the "
            "dilated stages and theirs does not, so the weights would compute something else",
        )
    stem = ours.get(f"{body}conv1.0.weight", ours.get(f"{body}conv1.weight"))
    if stem is None or stem.dim() != 4:
        raise WeightsMismatch(
            path, f"key {rename_back(f'{body}conv1.weight', source, ours)} is missing"
        )
    kind = "deep" if stem.shape[-1] == 3 and f"{body}conv1.0.weight" in ours else "7x7"
    blocks = tuple(
        1
        + max(
            (int(m[1]) for k in ours if (m := re.match(rf"{re.escape(body)}layer{i}\.(\d+)\.", k))),
            default=-1,
        )
        for i in range(1, 5)
    )
    variant, depth = _STEMS.get((kind, int(stem.shape[0]))), _DEPTHS.get(blocks)
    if variant is None or depth is None:
        raise WeightsMismatch(
            path,
            f"a ResNet with a {kind} stem of {stem.shape[0]} channels and {blocks} blocks per "
            "stage: no backbone here has that layout (ResNet-50/101 with the 7x7 stem, "
            "mmseg's V1c or the official deep stem)",
        )
    return f"resnet{depth}{variant}"


def rename_back(our_key: str, source: str, ours: dict[str, torch.Tensor]) -> str:
    """Our key in the file's layout, for messages."""
    pairs = rules(source, deep_stem="backbone.body.conv1.0.weight" in ours)
    return rename(our_key, pairs, back=True) or our_key


def to_our_names(
    state: dict[str, torch.Tensor], source: str, path: Path
) -> dict[str, torch.Tensor]:
    """Their keys renamed onto ours; a key with no place in this model is refused by name."""
    pairs = rules(source, deep_stem=any(k.startswith("backbone.stem.") for k in state))
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_DROPPED[source]):
            continue
        name = rename(key, pairs)
        if name is None:
            raise WeightsMismatch(path, f"key {key}: has no place in this model (--from {source})")
        ours[name] = value
    return ours


def check_fit(
    ours: dict[str, torch.Tensor], config: DANetConfig, source: str, path: Path
) -> dict[str, torch.Tensor]:
    """Every tensor of the model there with its shape, nothing else; BN counters that old files
    lack (``num_batches_tracked``, not read in eval mode) are filled with 0."""
    with torch.device("meta"):
        expected = build_danet(config).state_dict()
    for name, value in ours.items():
        theirs = rename_back(name, source, ours)
        if name not in expected:
            raise WeightsMismatch(path, f"key {theirs}: has no place in this model")
        if value.shape != expected[name].shape:
            raise WeightsMismatch(
                path,
                f"key {theirs} has shape {tuple(value.shape)}, this model needs "
                f"{tuple(expected[name].shape)}",
            )
        if value.is_floating_point() and not value.isfinite().all():
            raise WeightsMismatch(path, f"key {theirs} holds NaN or infinite values")
    full = {name: value.to(expected[name].dtype) for name, value in ours.items()}  # fp16 files
    for name, want in expected.items():
        if name in full:
            continue
        if name.endswith("num_batches_tracked"):
            full[name] = torch.zeros((), dtype=want.dtype)
            continue
        raise WeightsMismatch(path, f"key {rename_back(name, source, ours)} is missing")
    return full


def parse_multi_grid(text: str | None, source: str) -> tuple[int, ...] | None:
    """``--multi-grid``: ``4,8,16``, ``none``, or not given (the source's default)."""
    if text is None:
        return OFFICIAL_MULTI_GRID if source == "official" else None
    if text.strip().lower() == "none":
        return None
    try:
        rates = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--multi-grid must be rates like 4,8,16 or none, got {text!r}") from None
    if len(rates) != 3 or min(rates) < 1:
        raise ConfigError(
            f"--multi-grid needs 3 rates >= 1 (the last stage's blocks), got {text!r}"
        )
    return rates


def class_table(
    dataset: str | None, num_classes: int, meta: dict[str, Any], path: Path
) -> tuple[str, tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """The dataset name, class names and colours: ``--dataset``, else those mmseg's ``meta``
    holds, else the one dataset here with that many classes."""
    if dataset is not None and dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r} is unknown; known: {', '.join(DATASETS)}")
    table = meta.get("dataset_meta") or {}
    names = meta.get("CLASSES") or table.get("classes")
    colours = meta.get("PALETTE") or table.get("palette")
    fitting = [d for d in DATASETS if READERS[d](Path(".")).info.num_classes == num_classes]
    if dataset is None and names and colours and len(names) == len(colours) == num_classes:
        classes = tuple(str(n) for n in names)
        same = (d for d in fitting if READERS[d](Path(".")).info.classes == classes)
        rgb = tuple((int(c[0]), int(c[1]), int(c[2])) for c in colours)
        return next(same, "imported"), classes, rgb
    choice = dataset or (fitting[0] if len(fitting) == 1 else None)
    if choice is None:
        raise ConfigError(
            f"{path}: a model of {num_classes} classes; name its dataset with --dataset "
            f"({', '.join(fitting or DATASETS)})"
        )
    info = READERS[choice](Path(".")).info
    if info.num_classes != num_classes:
        raise ConfigError(
            f"--dataset {choice} has {info.num_classes} classes, the weights {num_classes}"
        )
    return info.name, info.classes, info.palette


@dataclass(frozen=True)
class Imported:
    """What ``import_weights`` wrote."""

    out: Path
    config: DANetConfig
    dataset: str
    tensors: int

    def describe(self) -> str:
        c = self.config
        return (
            f"{self.out}: DANet-{c.backbone}, {c.num_classes} classes ({self.dataset}), "
            f"multi-grid {c.multi_grid or 'none'}, aux head {'yes' if c.aux else 'no'}; "
            f"{self.tensors} tensors imported"
        )


def import_weights(
    source: str,
    path: str | Path,
    out: str | Path,
    dataset: str | None = None,
    multi_grid: str | None = None,
) -> Imported:
    """Read a released checkpoint (``source``: official or mmseg), map it onto this model and
    write ``out`` atomically as a model file ``evaluate``, ``predict``, ``export`` and
    ``model.init_from`` load."""
    if source not in SOURCES:
        raise ConfigError(f"--from must be one of {', '.join(SOURCES)}, got {source!r}")
    path, out = Path(path), Path(out)
    check_file_output(out, "--out")
    if out.resolve() == path.resolve():
        raise ConfigError(f"--out {out}: is the input file; write the model elsewhere")
    grid = parse_multi_grid(multi_grid, source)
    state, meta = read_checkpoint(path)
    ours = to_our_names(state, source, path)
    classifier = ours.get("head.fused_cls.1.weight")
    if classifier is None or classifier.dim() != 4:
        raise WeightsMismatch(
            path, f"key {rename_back('head.fused_cls.1.weight', source, ours)} is missing"
        )
    config = DANetConfig(
        num_classes=int(classifier.shape[0]),
        backbone=backbone_name(ours, source, path),
        multi_grid=grid,
        aux=any(k.startswith("aux_head.") for k in ours),
    )
    full = check_fit(ours, config, source, path)
    name, classes, palette = class_table(dataset, config.num_classes, meta, path)
    with torch.device("meta"):  # no initialisation: every tensor is replaced by the file's
        model = build_danet(config)
    model.load_state_dict(full, assign=True)
    provenance = {"imported_from": source, "imported_file": path.name}
    provenance["imported_sha256"] = file_sha256(path)
    info = ModelInfo(config, classes, palette, IMAGENET_MEAN, IMAGENET_STD, name, provenance)
    with atomic_file(out) as tmp:
        save_model_file(tmp, model.state_dict(), info)
        load_state(tmp)  # the file just written reads back as every stage reads it
    return Imported(out, config, name, len(ours))
