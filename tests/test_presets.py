"""params.yaml, the presets in configs/, and the one config path: defaults, overrides, errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import SECTIONS, ConfigError, Params, load_params
from pipeline.data.readers import READERS
from pipeline.paramsfile import read_yaml
from pipeline.presets import main as presets_main
from pipeline.presets import params_yaml, preset_params_yaml

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
CLASSES = {
    "cityscapes": 19,
    "voc": 21,
    "pascal_context": 59,
    "cocostuff": 171,
    "cocostuff10k": 171,
    "ade20k": 150,
    "camvid": 11,
}
# For an image of the dataset's usual native size (H, W): the smallest and largest (H, W) the
# preset's random scale can give, as its reference computes them (by hand, see each reference).
SCALE_RANGES = {
    "cityscapes": ((1024, 2048), (768, 1536), (2048, 4096)),  # official: short side 768..2048
    "ade20k": ((480, 640), (256, 341), (1024, 1365)),  # mmseg: fit (2048, 512) x 0.5..2.0
    "voc_aug": ((375, 500), (256, 341), (1024, 1365)),
    "pascal_context": ((375, 500), (195, 260), (780, 1040)),  # fit (520, 520) x 0.5..2.0
    "cocostuff": ((480, 640), (256, 341), (1024, 1365)),
    "cocostuff10k": ((480, 640), (256, 341), (1024, 1365)),
    "camvid": ((360, 480), (270, 360), (720, 960)),  # ours: short side 270..720
}
runner = CliRunner()


def test_code_defaults_equal_params_yaml() -> None:
    """A params file may leave a key out: the code's default is params.yaml's value."""
    assert load_params(ROOT / "params.yaml") == Params()
    assert set(read_yaml(ROOT / "params.yaml")) == {f.name for f in dataclasses.fields(Params)}


def test_default_params_are_the_embedded_demo() -> None:
    p = load_params(ROOT / "params.yaml")
    assert (
        p.shard.dataset == "synthetic" and p.model.backbone == "resnet18d" and not p.train.use_gpu
    )


def test_every_paper_dataset_has_a_preset() -> None:
    assert {p.stem for p in PRESETS} >= {
        "cityscapes",
        "voc_aug",
        "pascal_context",
        "cocostuff",
        "ade20k",
        "camvid",
    }


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid(path: Path) -> None:
    p = load_params(preset=path.stem)
    assert p.shard.dataset in READERS and p.shard.root
    assert p.model.num_classes == CLASSES[p.shard.dataset]
    p.model.to_danet_config(CLASSES[p.shard.dataset])  # backbone, grid
    assert p.data.train_split in p.shard.splits and p.data.val_split in p.shard.splits
    assert p.evaluate.split == p.data.val_split
    assert p.data.crop_size in p.tune.space["data.crop_size"]["choice"]
    # the DVC paths are the default ones, so a preset runs through dvc.yaml as is
    assert (p.shard.out, p.data.shards, p.train.out) == (
        "data/shards",
        "data/shards",
        "outputs/train",
    )


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_holds_only_what_differs(path: Path) -> None:
    """A preset is an overlay: every key in it is a known param whose value differs from
    params.yaml's (a mapping such as tune.space is given whole and replaces the default's)."""
    default, loaded = Params(), load_params(preset=path.stem)
    redundant = []
    for name, values in read_yaml(path).items():
        assert name in SECTIONS and isinstance(values, dict) and values, f"{path.name}: {name}"
        known = {f.name for f in dataclasses.fields(getattr(default, name))}
        for key in values:
            assert key in known, f"{path.name}: {name}.{key} is not a known param"
            if getattr(getattr(loaded, name), key) == getattr(getattr(default, name), key):
                redundant.append(f"{name}.{key}")
    assert not redundant, f"{path.name} repeats params.yaml's values: {redundant}"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_values_name_their_source(path: Path) -> None:
    """Each value line says where it comes from: ``# paper|official|mmseg|measured|dataset|ours``."""
    unsourced = [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if line.startswith(" ")
        and not line.lstrip().startswith("#")
        and not re.search(r"\s#\s(paper|official|mmseg|measured|dataset|ours)\b", line)
    ]
    assert not unsourced, f"values without a source: {unsourced}"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_writes_a_complete_params_file(path: Path, tmp_path: Path) -> None:
    """``python -m pipeline.presets NAME > params.yaml`` (make params): every key dvc.yaml may
    list, with the preset's header; it loads to the preset's params."""
    out = tmp_path / "params.yaml"
    out.write_text(preset_params_yaml(path.stem))
    default = read_yaml(ROOT / "params.yaml")
    written = read_yaml(out)
    assert list(written) == list(default)
    for name in default:
        assert set(written[name]) == set(default[name]), name
    assert load_params(out) == load_params(preset=path.stem)
    assert path.read_text().split("\n\n", 1)[0] in out.read_text()


def test_params_yaml_written_from_the_defaults_is_params_yaml(tmp_path: Path) -> None:
    out = tmp_path / "params.yaml"
    out.write_text(params_yaml(Params()))
    assert load_params(out) == Params() == load_params(ROOT / "params.yaml")


def test_presets_module_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert presets_main(["kitti"]) == 2
    assert "error: --preset kitti: no such preset" in capsys.readouterr().err
    assert presets_main([]) == 2
    assert presets_main(["camvid"]) == 0
    assert "dataset: camvid" in capsys.readouterr().out


def test_a_partial_params_file_takes_the_defaults(tmp_path: Path) -> None:
    """``--params FILE`` with some keys (or sections) only: the rest are params.yaml's."""
    path = tmp_path / "p.yaml"
    path.write_text("train: {lr: 0.02}\n")
    expected = dataclasses.replace(Params(), train=dataclasses.replace(Params().train, lr=0.02))
    assert load_params(path) == expected


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_names_its_reference_and_draws_its_scales(path: Path) -> None:
    """The header names the reference file it follows; the loader's random scale, for an image
    of the dataset's native size, spans exactly the range that reference draws."""
    from pipeline.data.augment import size_range

    header = path.read_text().split("\n\n", 1)[0]
    assert re.search(r"\S+\.(py|md)\b", header), f"{path.name}: the header names no reference file"
    d = load_params(preset=path.stem).data  # the loader augments by the data section itself
    (h, w), low, high = SCALE_RANGES[path.stem]
    assert size_range(h, w, d) == (low, high)


def test_cityscapes_preset_is_the_papers_setting() -> None:
    p = load_params(preset="cityscapes")
    assert (p.model.backbone, p.model.multi_grid, p.model.pretrained) == (
        "resnet101",
        (4, 8, 16),
        True,
    )
    assert (p.data.crop_size, p.data.scale_mode, p.data.base_size) == (768, "short_side", 1024)
    assert (p.train.batch_size, p.train.lr, p.train.epochs * p.train.iters_per_epoch) == (
        8,
        0.003,
        240 * 371,
    )
    assert p.train.use_gpu and p.train.head_lr_mult == 10
    e = p.evaluate
    assert (e.reference, e.mode, e.crop, e.base_size, len(e.scales), e.flip) == (
        "official",
        "slide",
        1024,
        2048,
        8,
        True,
    )


def test_overrides_reach_every_level() -> None:
    p = load_params(
        ROOT / "params.yaml",
        [
            "train.lr=0.005",
            "data.crop_size=64",
            "model.multi_grid=[1, 2, 4]",
            "train.loss_weights.aux=0.2",
        ],
    )
    assert (p.train.lr, p.data.crop_size, p.model.multi_grid) == (0.005, 64, (1, 2, 4))
    assert p.train.loss_weights == {**Params().train.loss_weights, "aux": 0.2}
    assert load_params(preset="cityscapes", overrides=["train.lr=0.01"]).train.lr == 0.01


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trian.lr=1"], "trian is not a params section; known: synthetic, shard"),
        (["train.lrr=1"], "train.lrr is not a known param; known: lr, momentum"),
        (["train.lr=abc"], "train.lr must be a number, got 'abc'"),
        (["train.lr=-1"], "train.lr must be > 0, got -1.0"),
        (["train.loss_weights.out=heavy"], "train.loss_weights.out must be a number, got 'heavy'"),
        (
            ["train.loss_weights.deep=1"],
            "train.loss_weights.deep is not known; use out, pam, cam, aux",
        ),
        (["train.batch_size=2.5"], "train.batch_size must be an integer, got 2.5"),
        (["train.use_gpu=maybe"], "train.use_gpu must be true or false, got 'maybe'"),
        (["train=5"], "--set train=5: expected section.key=value"),
        (["model.multi_grid=[4, 0]"], "model.multi_grid[1] must be >= 1, got 0"),
        (
            ["data.scale_mode=huge"],
            "data.scale_mode must be one of short_side | ratio | long_side, got 'huge'",
        ),
        (["synthetic.num_samples.train=0"], "synthetic.num_samples.train must be >= 1, got 0"),
        (["train.lr"], "--set train.lr: expected section.key=value"),
        (["train.spike_factor=0.5"], "train.spike_factor must be 0 (off) or above 1, got 0.5"),
        (["train.recover_lr_factor=2"], "train.recover_lr_factor must be <= 1, got 2.0"),
        (["train.max_recoveries=-1"], "train.max_recoveries must be >= 0, got -1"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_params(ROOT / "params.yaml", overrides)
    assert str(info.value).startswith(message), str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    for text, message in (
        ("train: 5\n", "train must be a mapping of params, got 5"),
        ("- a\n", f"{bad}: must be a mapping of sections"),
        ("train: {lr: [\n", f"{bad}: not valid YAML"),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_params(bad)
    with pytest.raises(ConfigError, match="params file does not exist"):
        load_params(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="--preset kitti: no such preset; known: ade20k, camvid"):
        load_params(preset="kitti")


def test_cli_set_and_preset_on_every_command(tmp_path: Path) -> None:
    """--set and --preset go through the same loader on every command: a bad key is one line."""
    commands = ["shard", "train", "tune", "evaluate", "register", "summary", "synthetic --out x"]
    for command in commands:
        result = runner.invoke(app, [*command.split(), "--set", "train.lr=abc"])
        assert result.exit_code == 2, (command, result.output)
        assert (
            result.output.strip().splitlines()[-1] == "error: train.lr must be a number, got 'abc'"
        )
        result = runner.invoke(app, ["--preset", "kitti", *command.split()])
        assert result.exit_code == 2 and "error: --preset kitti: no such preset" in result.output
    result = runner.invoke(
        app, ["predict", "--model", "m.pt", "--out", str(tmp_path), ".", "--set", "x=1"]
    )
    assert (
        result.exit_code == 2
        and result.output.strip()
        == "error: --set x=1: expected section.key=value, e.g. train.lr=0.005"
    )


def test_cli_usage_errors_are_one_line(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["predict", "--model", "m.pt", "--out", str(tmp_path), "--crop", "8", "."]
    )
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == "error: Invalid value for '--crop': Input should be greater than or equal to 16"
    )
    result = runner.invoke(app, ["evaluate", "--scales", "1,a"])
    assert result.exit_code == 2 and result.output.strip().startswith(
        "error: Invalid value for --scales"
    )


def test_cli_preset_by_name_runs_a_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`danet --preset camvid shard` reads configs/camvid.yaml: here it fails on its data root,
    naming that param's value (the preset's), not params.yaml's synthetic dataset."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["--preset", "camvid", "shard", "--set", "shard.root=nowhere"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == "error: nowhere: dataset root does not exist"
    preset = yaml.safe_load((ROOT / "configs" / "camvid.yaml").read_text())
    assert preset["shard"]["dataset"] == "camvid"


def test_exponents_without_a_dot_are_numbers(tmp_path: Path) -> None:
    """YAML 1.2's floats, as DVC and JSON write them: ``1e-06`` (json.dumps of 1e-6) and
    ``--set train.lr=2e-2`` are numbers, not strings refused as "not a number"."""
    path = tmp_path / "p.yaml"
    path.write_text('{"train": {"warmup_ratio": 1e-06, "lr": 1E+0}}')
    params = load_params(path, ["train.weight_decay=5e-4"])
    assert params.train.warmup_ratio == 1e-6 and params.train.lr == 1.0
    assert params.train.weight_decay == 5e-4
    with pytest.raises(ConfigError, match=re.escape("train.lr must be a number, got '1e'")):
        load_params(path, ["train.lr=1e"])
