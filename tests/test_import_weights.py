"""``danet import-weights``: the official DANet's and mmsegmentation's layouts onto our model.

The reference layouts are rebuilt here as small module definitions with their parameter names and
shapes (junfu1115/DANet v0.5.0 and v1.0.0 ``encoding/models``; mmsegmentation's ResNetV1c,
DAHead and FCNHead), without their code or any download. Our random model is exported into each
layout by loading its tensors into those modules, saved as their trainers save it, imported back,
and must give identical logits; broken files are refused in one line, exit 2.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from danet import DANetConfig, build_danet
from danet.model import SegmentationModel, Segmenter
from pipeline.artifacts.importweights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WeightsMismatch,
    import_weights,
    rename,
    rules,
)
from pipeline.artifacts.modelfile import load_model_file
from pipeline.cli import app

runner = CliRunner()
BN = nn.BatchNorm2d


def conv(cin: int, cout: int, k: int = 3, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)


# --- the references' names and shapes (no forward: only what their state dicts hold) ---------


class Bottleneck(nn.Module):
    """Both references' ResNet bottleneck: conv1/bn1, conv2/bn2 (3x3), conv3/bn3, downsample."""

    def __init__(self, cin: int, planes: int, first: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv(cin, planes, 1), BN(planes)
        self.conv2, self.bn2 = conv(planes, planes), BN(planes)
        self.conv3, self.bn3 = conv(planes, planes * 4, 1), BN(planes * 4)
        if first:
            self.downsample = nn.Sequential(conv(cin, planes * 4, 1), BN(planes * 4))


def stages(owner: nn.Module, cin: int, blocks: tuple[int, ...]) -> None:
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
        layer = [Bottleneck(cin if j == 0 else planes * 4, planes, j == 0) for j in range(n)]
        owner.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        cin = planes * 4


class OfficialResNet(nn.Module):
    """encoding/dilated/resnet.py (v0.5.0: 7x7 stem, an ImageNet fc) and
    encoding/models/backbone/resnet.py (v1.0.0: deep_stem 64-64-128, fc set to None)."""

    def __init__(self, deep_stem: bool, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        if deep_stem:
            self.conv1: nn.Module = nn.Sequential(
                conv(3, 64, stride=2),
                BN(64),
                nn.ReLU(),
                conv(64, 64),
                BN(64),
                nn.ReLU(),
                conv(64, 128),
            )
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = BN(128 if deep_stem else 64)
        stages(self, 128 if deep_stem else 64, blocks)
        if not deep_stem:
            self.fc = nn.Linear(2048, 1000)


class OfficialPAM(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.query_conv, self.key_conv = nn.Conv2d(c, c // 8, 1), nn.Conv2d(c, c // 8, 1)
        self.value_conv = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.zeros(1))


class OfficialCAM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))


class OfficialDANet(nn.Module):
    """encoding/models/danet.py: ``pretrained`` and ``head`` (DANetHead)."""

    def __init__(self, nclass: int, deep_stem: bool) -> None:
        super().__init__()
        self.pretrained = OfficialResNet(deep_stem)
        self.head = nn.Module()
        inter = 512

        def cbr(cin: int) -> nn.Sequential:
            return nn.Sequential(conv(cin, inter), BN(inter), nn.ReLU())

        def cls() -> nn.Sequential:
            return nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(inter, nclass, 1))

        for name, module in [
            ("conv5a", cbr(2048)),
            ("conv5c", cbr(2048)),
            ("sa", OfficialPAM(inter)),
            ("sc", OfficialCAM()),
            ("conv51", cbr(inter)),
            ("conv52", cbr(inter)),
            ("conv6", cls()),
            ("conv7", cls()),
            ("conv8", cls()),
        ]:
            self.head.add_module(name, module)


class ConvModule(nn.Module):
    """mmcv's ConvModule with a norm: ``conv`` (no bias) and ``bn``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.bn = conv(cin, cout), BN(cout)


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))


class ResNetV1c(nn.Module):
    """mmseg/models/backbones/resnet.py ResNetV1c: ``stem`` (three 3x3 convs, 32-32-64, each with
    norm and ReLU), layer1..4."""

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            conv(3, 32, stride=2),
            BN(32),
            nn.ReLU(),
            conv(32, 32),
            BN(32),
            nn.ReLU(),
            conv(32, 64),
            BN(64),
            nn.ReLU(),
        )
        stages(self, 64, blocks)


class MMPAM(nn.Module):
    def __init__(self, c: int, channels: int) -> None:
        super().__init__()
        self.key_project, self.query_project = nn.Conv2d(c, channels, 1), nn.Conv2d(c, channels, 1)
        self.value_project = nn.Conv2d(c, c, 1)
        self.gamma = Scale()


class MMCAM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = Scale()


class DAHead(nn.Module):
    """mmseg/models/decode_heads/da_head.py with configs/_base_/models/danet_r50-d8.py's sizes."""

    def __init__(self, nclass: int, cin: int = 2048, channels: int = 512, pam: int = 64) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, nclass, 1)
        self.pam_in_conv, self.pam = ConvModule(cin, channels), MMPAM(channels, pam)
        self.pam_out_conv, self.pam_conv_seg = (
            ConvModule(channels, channels),
            nn.Conv2d(channels, nclass, 1),
        )
        self.cam_in_conv, self.cam = ConvModule(cin, channels), MMCAM()
        self.cam_out_conv, self.cam_conv_seg = (
            ConvModule(channels, channels),
            nn.Conv2d(channels, nclass, 1),
        )


class MMFCNHead(nn.Module):
    """The auxiliary FCNHead (num_convs=1, concat_input=False) on c3: 1024 -> 256."""

    def __init__(self, nclass: int) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(256, nclass, 1)
        self.convs = nn.Sequential(ConvModule(1024, 256))


class EncoderDecoder(nn.Module):
    def __init__(self, nclass: int, aux: bool = True) -> None:
        super().__init__()
        self.backbone, self.decode_head = ResNetV1c(), DAHead(nclass)
        if aux:
            self.auxiliary_head = MMFCNHead(nclass)


# --- export ours into their layout -------------------------------------------------------------


def randomize(model: SegmentationModel, seed: int = 0) -> SegmentationModel:
    """Random weights everywhere, gammas and BN statistics included (init leaves them 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                else:
                    t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return model.eval()


def export(model: SegmentationModel, source: str, reference: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights in the reference's layout: renamed, loaded into its module (every tensor of it
    must be set, except the official v0.5.0's unused fc), and taken back out as its trainer saves."""
    pairs = rules(source, deep_stem=model.backbone.body.conv1.__class__ is nn.Sequential)
    theirs = {str(rename(k, pairs, back=True)): v for k, v in model.state_dict().items()}
    result = reference.load_state_dict(theirs, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert [k for k in result.missing_keys if not k.startswith("pretrained.fc.")] == []
    return reference.state_dict()


def logits(model: SegmentationModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return Segmenter(model, IMAGENET_MEAN, IMAGENET_STD).eval()(x)


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, ["import-weights", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


# --- round trips -------------------------------------------------------------------------------

ROUND_TRIPS = [  # (source, their module, our backbone, aux, multi-grid option)
    ("official", lambda k: OfficialDANet(k, deep_stem=False), "resnet50", False, None),
    ("official", lambda k: OfficialDANet(k, deep_stem=True), "resnet50s", False, "none"),
    ("mmseg", lambda k: EncoderDecoder(k), "resnet50c", True, None),
]


@pytest.mark.slow  # ResNet-50-sized: the references have no smaller DANet (about 10 s each)
@pytest.mark.parametrize(("source", "reference", "backbone", "aux", "grid"), ROUND_TRIPS)
def test_round_trip_gives_identical_logits(
    tmp_path: Path,
    source: str,
    reference: Callable[[int], nn.Module],
    backbone: str,
    aux: bool,
    grid: str | None,
) -> None:
    multi_grid = (4, 8, 16) if source == "official" and grid is None else None
    config = DANetConfig(num_classes=19, backbone=backbone, aux=aux, multi_grid=multi_grid)
    ours = randomize(build_danet(config))
    theirs = export(ours, source, reference(19))
    file = tmp_path / "their.pth"
    extra = (
        {"meta": {"iter": 80000}}
        if source == "mmseg"
        else {"epoch": 3, "best_pred": np.float64(0.8)}
    )
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.items()}, **extra}, file)

    code, out, err = cli(
        "--from",
        source,
        file,
        "--out",
        tmp_path / "model.pt",
        *(["--multi-grid", grid] if grid else []),
    )

    assert code == 0, err
    assert f"DANet-{backbone}, 19 classes (cityscapes)" in out
    segmenter, info = load_model_file(tmp_path / "model.pt")
    assert info.config == config and info.dataset == "cityscapes" and len(info.classes) == 19
    assert info.meta["imported_from"] == source
    x = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        assert torch.equal(segmenter(x), logits(ours, x))
    imported = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    assert imported.keys() == ours.state_dict().keys()
    for name, value in ours.state_dict().items():  # BN statistics and counters included
        assert torch.equal(imported[name], value), name


# --- refusals: one line naming the first key that differs, exit 2, nothing written ------------


def layout(reference: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
    """A reference's names and shapes, every tensor a stride-0 view of one zero: a file of a few
    kB that reads as the full model (names, shapes, dtypes)."""
    with torch.device("meta"):
        shapes = reference().state_dict()
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in shapes.items()}


@pytest.fixture(scope="module")
def mmseg_state() -> dict[str, torch.Tensor]:
    return layout(lambda: EncoderDecoder(19))


def test_mmseg_meta_names_the_classes_and_dataset_overrides(tmp_path: Path) -> None:
    meta = {"CLASSES": tuple(f"c{i}" for i in range(11)), "PALETTE": [[i, i, i] for i in range(11)]}
    state = layout(lambda: EncoderDecoder(11, aux=False))
    torch.save({"state_dict": state, "meta": meta}, tmp_path / "a.pth")
    result = import_weights("mmseg", tmp_path / "a.pth", tmp_path / "a.pt")
    _, info = load_model_file(tmp_path / "a.pt")
    assert result.dataset == "imported" and info.classes[3] == "c3" and info.palette[3] == (3, 3, 3)
    assert info.config == DANetConfig(num_classes=11, backbone="resnet50c")
    import_weights("mmseg", tmp_path / "a.pth", tmp_path / "b.pt", dataset="camvid")
    assert load_model_file(tmp_path / "b.pt")[1].dataset == "camvid"


def test_official_layouts_pick_their_backbone(tmp_path: Path) -> None:
    """v0.5.0 (7x7 stem, an fc it never uses) -> resnet50 with the README's multi-grid; v1.0.0
    (deep stem 64-64-128) -> resnet50s; the fc is dropped, old files' missing BN counters filled."""
    for deep, backbone in ((False, "resnet50"), (True, "resnet50s")):
        state = layout(partial(OfficialDANet, 19, deep_stem=deep))
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        torch.save({"state_dict": state, "best_pred": np.float64(0.5)}, tmp_path / "a.pth")
        result = import_weights("official", tmp_path / "a.pth", tmp_path / "a.pt")
        assert result.config == DANetConfig(19, backbone=backbone, multi_grid=(4, 8, 16))
        assert result.dataset == "cityscapes"
        assert ("pretrained.fc.weight" in state) is not deep  # v0.5.0's fc: dropped
        assert load_model_file(tmp_path / "a.pt")[1].config == result.config


def edited(
    state: dict[str, torch.Tensor], drop: str = "", **put: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {
        **{k: v for k, v in state.items() if k != drop},
        **{k.replace("__", "."): v for k, v in put.items()},
    }


REFUSALS = [  # (name, how the state dict is changed, the error line's end)
    (
        "missing",
        lambda s: edited(s, drop="decode_head.pam.key_project.weight"),
        "key decode_head.pam.key_project.weight is missing",
    ),
    (
        "shape",
        lambda s: edited(s, decode_head__pam_out_conv__conv__weight=torch.zeros(512, 512, 1, 1)),
        "key decode_head.pam_out_conv.conv.weight has shape (512, 512, 1, 1), this model needs (512, 512, 3, 3)",
    ),
    (
        "extra",
        lambda s: edited(s, decode_head__extra__weight=torch.zeros(1)),
        "key decode_head.extra.weight: has no place in this model (--from mmseg)",
    ),
    (
        "aux with 2 convs",
        lambda s: edited(s, auxiliary_head__convs__1__conv__weight=torch.zeros(1)),
        "key auxiliary_head.convs.1.conv.weight: has no place in this model (--from mmseg)",
    ),
    (
        "nan",
        lambda s: edited(s, decode_head__conv_seg__bias=torch.full((19,), float("nan"))),
        "key decode_head.conv_seg.bias holds NaN or infinite values",
    ),
    (
        "resnet-d",
        lambda s: {
            k.replace("layer2.0.downsample.1.", "layer2.0.downsample.2.").replace(
                "layer2.0.downsample.0.", "layer2.0.downsample.1."
            ): v
            for k, v in s.items()
        },
        "a ResNet-D (average-pool downsampling)",
    ),
]


@pytest.mark.parametrize(
    ("change", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_a_file_that_does_not_fit_is_one_line(
    tmp_path: Path, mmseg_state: dict[str, torch.Tensor], change: Callable, message: str
) -> None:
    file = tmp_path / "their.pth"
    torch.save({"state_dict": change(mmseg_state)}, file)
    code, out, err = cli("--from", "mmseg", file, "--out", tmp_path / "model.pt")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {file}: "), err
    assert message in err, err
    assert not (tmp_path / "model.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["their.pth"]  # no temporary left


def test_the_wrong_layout_names_its_first_key(
    tmp_path: Path, mmseg_state: dict[str, torch.Tensor]
) -> None:
    file = tmp_path / "their.pth"
    torch.save({"state_dict": mmseg_state}, file)
    code, _, err = cli("--from", "official", file, "--out", tmp_path / "model.pt")
    assert (
        code == 2
        and err
        == f"error: {file}: key {next(iter(mmseg_state))}: has no place in this model (--from official)\n"
    )


class Pwn:
    """Unpickling this would create a folder: code run from the file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Callable, tuple[str]]:
        return (os.mkdir, (str(self.target),))


FILES = [  # (name, what the file holds, the error line's end)
    (
        "a list",
        lambda tmp: torch.save([torch.zeros(1)], tmp / "f.pth"),
        "holds a list, not a checkpoint dict",
    ),
    (
        "no tensors",
        lambda tmp: torch.save({"state_dict": {"a": 1}}, tmp / "f.pth"),
        "key a: not a tensor",
    ),
    (
        "empty",
        lambda tmp: torch.save({"state_dict": {}}, tmp / "f.pth"),
        "not a non-empty dict of tensors",
    ),
    ("not torch", lambda tmp: (tmp / "f.pth").write_text("hello"), "not a weights-only checkpoint"),
    (
        "code",
        lambda tmp: torch.save({"state_dict": Pwn(tmp / "pwned")}, tmp / "f.pth"),
        "mkdir",
    ),
    (
        "plain pickle with code",
        lambda tmp: (tmp / "f.pth").write_bytes(pickle.dumps(Pwn(tmp / "pwned"), protocol=2)),
        "not a weights-only checkpoint",
    ),
]


@pytest.mark.parametrize(("write", "message"), [f[1:] for f in FILES], ids=[f[0] for f in FILES])
def test_a_file_that_is_no_checkpoint_is_one_line(
    tmp_path: Path, write: Callable, message: str
) -> None:
    write(tmp_path)
    code, out, err = cli("--from", "official", tmp_path / "f.pth", "--out", tmp_path / "model.pt")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path / 'f.pth'}: ") and message in err, err
    assert not (tmp_path / "pwned").exists()  # nothing in it ran
    assert not (tmp_path / "model.pt").exists()


def test_bad_options_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "f.pth").write_text("x")
    cases: list[tuple[list[str | Path], str]] = [
        (["--from", "caffe"], "error: --from must be one of official, mmseg, got 'caffe'"),
        (["--from", "mmseg", "--multi-grid", "4,8"], "error: --multi-grid needs 3 rates"),
        (["--from", "mmseg", "--out", tmp_path / "f.pth"], "is the input file"),
        (["--from", "mmseg", "--out", tmp_path], "is a folder, not a file"),
    ]
    for args, message in cases:
        out: list[str | Path] = [] if "--out" in args else ["--out", tmp_path / "m.pt"]
        code, _, err = cli(*args, tmp_path / "f.pth", *out)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_class_count_without_a_dataset_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": layout(lambda: EncoderDecoder(7, aux=False))}, tmp_path / "a.pth")
    with pytest.raises(Exception, match="a model of 7 classes; name its dataset with --dataset"):
        import_weights("mmseg", tmp_path / "a.pth", tmp_path / "a.pt")
    with pytest.raises(WeightsMismatch, match="is missing"):
        state = torch.load(tmp_path / "a.pth", weights_only=True)["state_dict"]
        torch.save(
            {"state_dict": edited(state, drop="decode_head.conv_seg.weight")}, tmp_path / "b.pth"
        )
        import_weights("mmseg", tmp_path / "b.pth", tmp_path / "b.pt", dataset="camvid")
