"""The ``danet`` command: one sub-command per pipeline stage (``danet --help`` lists them)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="danet",
    help="DANet training pipeline: shard datasets, train with Ray, evaluate, register, predict.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="params file to read")


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input -> ``error: <file or param>: <problem>`` on stderr and exit code 2."""
    from pipeline.config import ConfigError
    from pipeline.datasets import DataError

    try:
        yield
    except (ConfigError, DataError, KeyError, FileNotFoundError, ConnectionError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from None


def overrides(**values: Any) -> dict[str, Any]:
    """CLI options that were given (not None)."""
    return {k: v for k, v in values.items() if v is not None}


@app.command()
def shard(
    params: Path = PARAMS_OPTION,
    dataset: str | None = typer.Option(None, help="reader name (cityscapes, voc, camvid, ...)"),
    root: str | None = typer.Option(None, help="dataset root in its published layout"),
    out: str | None = typer.Option(None, help="output directory (replaced atomically)"),
    splits: str | None = typer.Option(None, help="comma-separated splits, e.g. train,val"),
    on_error: str | None = typer.Option(None, help="fail (default) or skip bad samples"),
    workers: int | None = typer.Option(None, help="encoding processes"),
) -> None:
    """Raw dataset -> WebDataset shards + manifest.json (params: shard, synthetic)."""
    from pipeline.config import ShardParams, SyntheticParams, from_mapping, read_params
    from pipeline.datasets import make_reader
    from pipeline.shard import shard_dataset

    with one_line_errors():
        raw = read_params(params) if params.exists() else {}
        section = {**raw.get("shard", {}), **overrides(dataset=dataset, root=root, out=out,
                   on_error=on_error, workers=workers)}  # fmt: skip
        if splits is not None:
            section["splits"] = [s for s in splits.split(",") if s]
        cfg = from_mapping(ShardParams, section, "shard")
        options: dict[str, Any] = {}
        if cfg.dataset == "synthetic":
            options = dataclasses.asdict(
                from_mapping(SyntheticParams, raw.get("synthetic", {}), "synthetic")
            )
        reader = make_reader(cfg.dataset, cfg.root, **options)
        start = time.perf_counter()
        manifest = shard_dataset(
            reader, cfg.splits, Path(cfg.out), cfg.max_count, cfg.max_size_mb, cfg.image_format,
            cfg.jpeg_quality, cfg.workers, cfg.on_error,
        )  # fmt: skip
    for split, info in manifest["splits"].items():
        skipped = f", {len(info['skipped'])} skipped" if info["skipped"] else ""
        typer.echo(f"{split}: {info['samples']} samples in {len(info['shards'])} shards{skipped}")
    typer.echo(
        f"wrote {cfg.out}/ ({manifest['dataset']}, {len(manifest['classes'])} classes) "
        f"in {time.perf_counter() - start:.1f}s"
    )


@app.command()
def synthetic(
    out: Annotated[Path, typer.Option("--out", help="folder to write (replaced atomically)")],
    params: Path = PARAMS_OPTION,
    splits: str = typer.Option("val", help="comma-separated splits"),
    count: int = typer.Option(0, min=0, help="first N scenes of each split; 0 = all"),
) -> None:
    """Write the embedded synthetic scenes as a `folder` dataset of PNGs (params: synthetic)."""
    from pipeline.config import SyntheticParams, from_mapping, read_params
    from pipeline.datasets.synthetic import SyntheticReader, write_folder_dataset

    with one_line_errors():
        raw = read_params(params) if params.exists() else {}
        cfg = from_mapping(SyntheticParams, raw.get("synthetic", {}), "synthetic")
        reader = SyntheticReader(**dataclasses.asdict(cfg))
        images = write_folder_dataset(reader, out, tuple(s for s in splits.split(",") if s), count)
    typer.echo(f"{len(images)} scenes -> {out}/images/, masks in {out}/masks/, {out}/classes.txt")


@app.command()
def train(
    params: Path = PARAMS_OPTION,
    address: str | None = typer.Option(
        None, "--address", help="Ray cluster address (else RAY_ADDRESS or a local Ray)"
    ),
    run_name: str | None = typer.Option(
        None, help="resume this run (default: derived from the config)"
    ),
) -> None:
    """Train DANet with Ray Train on the shards; resumes a run of the same name (params: model, data, train, mlflow)."""
    from pipeline.config import (
        DataParams,
        MlflowParams,
        ModelParams,
        TrainParams,
        from_mapping,
        read_params,
    )
    from pipeline.train import run_training

    with one_line_errors():
        raw = read_params(params)
        train_section = {
            **raw.get("train", {}),
            **overrides(ray_address=address, run_name=run_name),
        }
        try:
            metrics = run_training(
                from_mapping(ModelParams, raw.get("model", {}), "model"),
                from_mapping(DataParams, raw.get("data", {}), "data"),
                from_mapping(TrainParams, train_section, "train"),
                from_mapping(MlflowParams, raw.get("mlflow", {}), "mlflow"),
            )
        except Exception as err:
            if type(err).__name__ != "TrainingFailedError":
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            typer.echo(
                f"error: training failed after train.max_failures retries: {first}", err=True
            )
            raise typer.Exit(1) from None
    best, final = metrics["best"], metrics["final"]
    typer.echo(f"run {metrics['run_name']}: best val mIoU {best['val_miou']:.4f} at iteration {best['iteration']}, "
               f"final {final['val_miou']:.4f}")  # fmt: skip


def _sections(params: Path, **sections: type) -> dict[str, Any]:
    """Read ``params`` once and build each named section's dataclass."""
    from pipeline.config import from_mapping, read_params

    raw = read_params(params)
    return {name: from_mapping(cls, raw.get(name, {}), name) for name, cls in sections.items()}


def _tracking_uri(params: Path) -> str:
    from pipeline.config import MlflowParams, from_mapping, read_params
    from pipeline.tracking import resolve_tracking_uri

    raw = read_params(params) if params.exists() else {}
    return resolve_tracking_uri(
        from_mapping(MlflowParams, raw.get("mlflow", {}), "mlflow").tracking_uri
    )


@app.command()
def tune(params: Path = PARAMS_OPTION) -> None:
    """Ray Tune search over learning rate and crop size with ASHA (params: tune, model, data, train, mlflow)."""
    from pipeline.config import DataParams, MlflowParams, ModelParams, TrainParams
    from pipeline.tune import TuneParams, format_trials, run_search

    with one_line_errors():
        s = _sections(params, model=ModelParams, data=DataParams, train=TrainParams,
                      mlflow=MlflowParams, tune=TuneParams)  # fmt: skip
        summary = run_search(s["model"], s["data"], s["train"], s["mlflow"], s["tune"])
    typer.echo(format_trials(summary))
    best = summary["best"]
    typer.echo(
        f"search {summary['search']}: best lr {best['lr']:.4g}, crop {best['crop_size']}, "
        f"val mIoU {best['best_val_miou']:.4f} -> {s['tune'].out}/best_params.yaml"
    )


@app.command()
def evaluate(
    params: Path = PARAMS_OPTION,
    model: str | None = typer.Option(
        None,
        "--model",
        help="model.pt, MLflow run id, runs:/ or models:/ URI (default: evaluate.model)",
    ),
    split: str | None = typer.Option(None, help="split of the shards to evaluate"),
    mode: str | None = typer.Option(None, help="whole or slide"),
    scales: str | None = typer.Option(
        None, help="comma-separated scales, e.g. 0.5,0.75,1,1.25,1.5,1.75"
    ),
    flip: bool | None = typer.Option(
        None, "--flip/--no-flip", help="add horizontally flipped logits"
    ),
    out: str | None = typer.Option(None, help="report folder (replaced atomically)"),
) -> None:
    """Evaluate a model on a split: mIoU, per-class IoU, confusion matrix, overlays (params: evaluate)."""
    from pipeline.config import from_mapping, read_params
    from pipeline.evaluate import EvaluateParams, format_table, run_evaluation

    with one_line_errors():
        raw = read_params(params)
        section = {**raw.get("evaluate", {}),
                   **overrides(model=model, split=split, mode=mode, flip=flip, out=out)}  # fmt: skip
        if scales is not None:
            try:
                section["scales"] = [float(v) for v in scales.split(",") if v]
            except ValueError:
                raise typer.BadParameter(f"--scales must be numbers, got {scales!r}") from None
        cfg = from_mapping(EvaluateParams, section, "evaluate")
        candidates = [
            str(Path(raw.get(stage, {}).get("out", default)) / "model.pt")
            for stage, default in (("train", "outputs/train"), ("tune", "outputs/tune"))
        ]
        metrics = run_evaluation(cfg, _tracking_uri(params), candidates)
    typer.echo(format_table(metrics))
    typer.echo(
        f"{metrics['model']} on {metrics['dataset']} {metrics['split']} ({metrics['protocol']}): "
        f"mIoU {metrics['miou']:.4f} -> {cfg.out}/"
    )


@app.command()
def register(
    params: Path = PARAMS_OPTION,
    eval_metrics: str | None = typer.Option(None, help="metrics.json written by danet evaluate"),
    name: str | None = typer.Option(None, help="registered model name (default danet-<dataset>)"),
) -> None:
    """Register the evaluated model in MLflow; move the champion alias only if it wins (params: register)."""
    from pipeline.config import from_mapping, read_params
    from pipeline.registry import RegisterParams
    from pipeline.registry import register as do_register

    with one_line_errors():
        raw = read_params(params)
        section = {**raw.get("register", {}), **overrides(eval_metrics=eval_metrics, name=name)}
        result = do_register(
            from_mapping(RegisterParams, section, "register"), _tracking_uri(params)
        )
    typer.echo(
        f"{result['name']} version {result['version']} -> @{result['alias']}: {result['reason']}"
    )
    typer.echo(f"champion: {result['champion_uri']} (version {result['champion_version']}, "
               f"val mIoU {result['champion_val_miou']:.4f})")  # fmt: skip


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="image files or folders")],
    model: Annotated[
        str, typer.Option("--model", help="model.pt, MLflow run id, runs:/ or models:/ URI")
    ],
    out: Annotated[Path, typer.Option("--out", help="folder for masks and overlays")],
    params: Path = PARAMS_OPTION,
    slide_above: int = typer.Option(1024, help="sliding window for images with a longer side"),
    crop: int = typer.Option(512, help="sliding-window crop"),
    flip: bool = typer.Option(False, "--flip/--no-flip", help="add horizontally flipped logits"),
) -> None:
    """Images or folders -> colour masks (the dataset's palette), overlays and label PNGs."""
    import torch

    from pipeline.modelref import load_model
    from pipeline.predict import predict_files

    with one_line_errors():
        loaded = load_model(model, _tracking_uri(params))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = predict_files(loaded, inputs, out, slide_above, crop, flip, device)
    for path, problem in report.failed:
        typer.echo(f"error: {path}: {problem}", err=True)
    typer.echo(f"{len(report.written) // 3} images -> {out}/ ({len(report.failed)} failed)")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def summary(params: Path = PARAMS_OPTION) -> None:
    """What the pipeline produced: the champion, its val mIoU, where to look, how to open MLflow."""
    import json

    from pipeline.config import from_mapping, read_params
    from pipeline.evaluate import EvaluateParams
    from pipeline.registry import RegisterParams

    with one_line_errors():
        raw = read_params(params)
        reg = from_mapping(RegisterParams, raw.get("register", {}), "register")
        ev = from_mapping(EvaluateParams, raw.get("evaluate", {}), "evaluate")
        registered = Path(reg.out)
        if not registered.is_file():
            raise FileNotFoundError(f"{registered}: nothing registered yet (run dvc repro)")
        result = json.loads(registered.read_text())
        uri = _tracking_uri(params)
    typer.echo(f"champion: {result['champion_uri']} = {result['name']} version "
               f"{result['champion_version']}")  # fmt: skip
    typer.echo(f"  val mIoU {result['champion_val_miou']:.4f} ({result['eval_protocol']})")
    typer.echo(
        f"  this run: version {result['version']} -> @{result['alias']} ({result['reason']})"
    )
    typer.echo(f"prediction overlays: {Path(ev.out) / 'predictions.png'}")
    typer.echo(f"confusion matrix:    {Path(ev.out) / 'confusion_matrix.png'}")
    typer.echo(
        f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    )


@app.command()
def smoke(
    backbone: str = typer.Option("resnet18d", help="timm ResNet name"),
    num_classes: int = typer.Option(11, min=1),
    size: int = typer.Option(128, min=32, help="square input size"),
    steps: int = typer.Option(3, min=1, help="training steps on one random batch"),
) -> None:
    """Build DANet, run a few training steps on a random batch and one inference pass."""
    import torch

    from danet import DANetConfig, build_danet, segmentation_loss

    torch.manual_seed(0)
    try:
        config = DANetConfig(num_classes=num_classes, backbone=backbone)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    model = build_danet(config)
    n_params = sum(p.numel() for p in model.parameters())
    typer.echo(f"DANet-{backbone}: {n_params / 1e6:.2f} M parameters, {num_classes} classes")
    x = torch.randn(2, 3, size, size)
    y = torch.randint(0, num_classes, (2, size, size))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(steps):
        start = time.perf_counter()
        loss, parts = segmentation_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        detail = " ".join(f"{k}={v:.3f}" for k, v in parts.items())
        typer.echo(
            f"step {step + 1}/{steps}: loss {loss.item():.3f} ({detail}) "
            f"{time.perf_counter() - start:.2f}s"
        )
    model.eval()
    with torch.no_grad():
        out = model(x)
    typer.echo(f"eval outputs: {', '.join(f'{k} {tuple(v.shape)}' for k, v in out.items())}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
