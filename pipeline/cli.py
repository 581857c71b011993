"""The ``danet`` command: one sub-command per pipeline stage (``danet --help`` lists them).

Every command reads its params the same way (pipeline/config.py): ``--params FILE`` (default
params.yaml) or ``danet --preset NAME`` (configs/<name>.yaml), then ``--set section.key=value``
overrides, then the command's own options, which are shorthands for ``--set``. A
``PipelineError`` (bad input, an unreachable service) prints one line and exits 2 (a lost
training worker: 1); any other exception is a bug and keeps its traceback. Usage errors (an
option's value) are one line too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from pipeline import logs
from pipeline.command import (
    DanetGroup,
    load,
    one_line_errors,
    parse_scales,
    split_list,
    tracking_uri,
)

app = typer.Typer(
    name="danet",
    cls=DanetGroup,
    help="DANet training pipeline: shard datasets, train with Ray, evaluate, register, predict.",
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", help="params file (default params.yaml)")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="override one param: section.key=value (repeatable), as dvc exp run -S"
    ),
]


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="a preset from configs/ by name (e.g. cityscapes)"),
    ] = None,
) -> None:
    """DANet: shard -> train -> tune -> evaluate -> register, one command per stage."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    ctx.obj = {"preset": preset}
    logs.show()


@app.command()
def shard(
    ctx: typer.Context,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    dataset: Annotated[
        str | None, typer.Option(help="reader name (cityscapes, voc, camvid, ...)")
    ] = None,
    root: Annotated[str | None, typer.Option(help="dataset root in its published layout")] = None,
    out: Annotated[
        str | None, typer.Option(help="output folder or URL (replaced atomically)")
    ] = None,
    splits: Annotated[
        str | None, typer.Option(help="comma-separated splits, e.g. train,val")
    ] = None,
    on_error: Annotated[str | None, typer.Option(help="fail (default) or skip bad samples")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="encoding processes")] = None,
) -> None:
    """Raw dataset -> WebDataset shards + manifest.json (params: shard, synthetic)."""
    import dataclasses

    from pipeline.data.readers import make_reader
    from pipeline.data.shard import shard_dataset

    with one_line_errors():
        p = load(
            ctx,
            params,
            sets,
            ("shard.out",),
            **{
                "shard.dataset": dataset,
                "shard.root": root,
                "shard.out": out,
                "shard.splits": split_list(splits),
                "shard.on_error": on_error,
                "shard.workers": workers,
            },
        )
        cfg = p.shard
        options = dataclasses.asdict(p.synthetic) if cfg.dataset == "synthetic" else {}
        reader = make_reader(cfg.dataset, cfg.root, **options)
        start = time.perf_counter()
        manifest = shard_dataset(
            reader,
            cfg.splits,
            cfg.out,
            max_count=cfg.max_count,
            max_size_mb=cfg.max_size_mb,
            image_format=cfg.image_format,
            jpeg_quality=cfg.jpeg_quality,
            workers=cfg.workers,
            on_error=cfg.on_error,
        )
    for split, info in manifest.splits.items():
        skipped = f", {len(info.skipped)} skipped" if info.skipped else ""
        typer.echo(f"{split}: {info.samples} samples in {len(info.shards)} shards{skipped}")
    typer.echo(
        f"wrote {cfg.out}/ ({manifest.dataset}, {manifest.num_classes} classes) "
        f"in {time.perf_counter() - start:.1f}s"
    )


@app.command()
def synthetic(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="folder to write (replaced atomically)")],
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    splits: Annotated[str, typer.Option(help="comma-separated splits")] = "val",
    count: Annotated[int, typer.Option(min=0, help="first N scenes of each split; 0 = all")] = 0,
) -> None:
    """Write the embedded synthetic scenes as a `folder` dataset of PNGs (params: synthetic)."""
    import dataclasses

    from pipeline.data.readers.synthetic import SyntheticReader, write_folder_dataset
    from pipeline.stores import check_outputs

    with one_line_errors():
        p = load(ctx, params, sets)
        check_outputs(p, {"--out": str(out)})
        reader = SyntheticReader(**dataclasses.asdict(p.synthetic))
        images = write_folder_dataset(reader, out, tuple(split_list(splits) or ()), count)
    typer.echo(f"{len(images)} scenes -> {out}/images/, masks in {out}/masks/, {out}/classes.txt")


@app.command()
def train(
    ctx: typer.Context,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ray cluster address (else RAY_ADDRESS or a local Ray)"),
    ] = None,
    run_name: Annotated[
        str | None, typer.Option(help="resume this run (default: derived from the config)")
    ] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="delete the run's checkpoints and train it anew")
    ] = False,
) -> None:
    """Train DANet with Ray Train on the shards; resumes a run of the same name (params: model, data, train, mlflow)."""
    from pipeline.training.driver import run_training

    with one_line_errors():
        p = load(
            ctx,
            params,
            sets,
            ("train.out", "train.storage_path"),
            **{"train.ray_address": address, "train.run_name": run_name},
        )
        summary = run_training(p.model, p.data, p.train, p.mlflow, restart=restart)
    best, final = summary.best, summary.final
    typer.echo(
        f"run {summary.run_name}: best val mIoU {best['val_miou']:.4f} at iteration "
        f"{best['iteration']:.0f}, final {final['val_miou']:.4f}"
    )


@app.command()
def tune(
    ctx: typer.Context,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="delete the search's results and run it anew")
    ] = False,
) -> None:
    """Ray Tune search over learning rate and crop size with ASHA (params: tune, model, data, train, mlflow)."""
    from pipeline.training.search import format_trials, run_search

    with one_line_errors():
        p = load(ctx, params, sets, ("tune.out", "train.storage_path"))
        summary = run_search(p.model, p.data, p.train, p.mlflow, p.tune, restart=restart)
    typer.echo(format_trials(summary))
    best = summary["best"]
    typer.echo(
        f"search {summary['search']}: best lr {best['lr']:.4g}, crop {best['crop_size']}, "
        f"val mIoU {best['best_val_miou']:.4f} -> {p.tune.out}/best_params.yaml"
    )


@app.command()
def evaluate(
    ctx: typer.Context,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="model.pt, MLflow run id, runs:/ or models:/ URI (default: evaluate.model)",
        ),
    ] = None,
    split: Annotated[str | None, typer.Option(help="split of the shards to evaluate")] = None,
    mode: Annotated[str | None, typer.Option(help="whole or slide")] = None,
    scales: Annotated[
        str | None, typer.Option(help="comma-separated scales, e.g. 0.5,0.75,1,1.25,1.5,1.75")
    ] = None,
    flip: Annotated[
        bool | None, typer.Option("--flip/--no-flip", help="add horizontally flipped predictions")
    ] = None,
    out: Annotated[str | None, typer.Option(help="report folder (replaced atomically)")] = None,
) -> None:
    """Evaluate a model on a split: mIoU, per-class IoU, confusion matrix, overlays (params: evaluate)."""
    from pipeline.evaluation.evaluate import format_table, run_evaluation

    with one_line_errors():
        p = load(
            ctx,
            params,
            sets,
            ("evaluate.out",),
            **{
                "evaluate.model": model,
                "evaluate.split": split,
                "evaluate.mode": mode,
                "evaluate.scales": parse_scales(scales),
                "evaluate.flip": flip,
                "evaluate.out": out,
            },
        )
        candidates = [str(Path(p.train.out) / "model.pt"), str(Path(p.tune.out) / "model.pt")]
        result = run_evaluation(p.evaluate, tracking_uri(p), candidates)
    typer.echo(format_table(result))
    typer.echo(
        f"{result.model} on {result.dataset} {result.split} ({result.protocol}): "
        f"mIoU {result.miou:.4f} -> {p.evaluate.out}/"
    )


@app.command()
def register(
    ctx: typer.Context,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    eval_metrics: Annotated[
        str | None, typer.Option(help="metrics.json written by danet evaluate")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="registered model name (default danet-<dataset>)")
    ] = None,
) -> None:
    """Register the evaluated model in MLflow; move the champion alias only if it wins (params: register)."""
    from pipeline.registry.register import register as do_register

    with one_line_errors():
        p = load(
            ctx,
            params,
            sets,
            ("register.out",),
            **{"register.eval_metrics": eval_metrics, "register.name": name},
        )
        result = do_register(p.register, tracking_uri(p))
    typer.echo(f"{result.name} version {result.version} -> @{result.alias}: {result.reason}")
    typer.echo(
        f"champion: {result.champion_uri} (version {result.champion_version}, "
        f"val mIoU {result.champion_val_miou:.4f})"
    )


@app.command()
def predict(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Argument(help="image files or folders")],
    model: Annotated[
        str, typer.Option("--model", help="model.pt, MLflow run id, runs:/ or models:/ URI")
    ],
    out: Annotated[Path, typer.Option("--out", help="folder for masks and overlays")],
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    slide_above: Annotated[
        int, typer.Option(min=0, help="sliding window for images with a longer side")
    ] = 1024,
    crop: Annotated[int, typer.Option(min=16, help="sliding-window crop")] = 512,
    flip: Annotated[
        bool, typer.Option("--flip/--no-flip", help="add horizontally flipped predictions")
    ] = False,
) -> None:
    """Images or folders -> colour masks (the dataset's palette), overlays and label PNGs.

    A file that is not a readable image is listed and skipped (exit 1 after the others)."""
    from pipeline.artifacts.refs import load_model
    from pipeline.devices import pick_device
    from pipeline.registry.predict import predict_files
    from pipeline.stores import check_outputs

    with one_line_errors():
        p = load(ctx, params, sets)
        check_outputs(p, {"--out": str(out)}, {"--model": model} if Path(model).exists() else {})
        loaded = load_model(model, tracking_uri(p))
        report = predict_files(loaded, inputs, out, slide_above, crop, flip, pick_device())
    for path, problem in report.failed:
        typer.echo(f"error: {path}: {problem}", err=True)
    typer.echo(f"{len(report.written) // 3} images -> {out}/ ({len(report.failed)} failed)")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def summary(
    ctx: typer.Context, params: ParamsOption = Path("params.yaml"), sets: SetOption = None
) -> None:
    """What the pipeline produced: the champion, its val mIoU, where to look, how to open MLflow."""
    from pipeline.registry.register import read_registration

    with one_line_errors():
        p = load(ctx, params, sets)
        result = read_registration(Path(p.register.out))
        uri = tracking_uri(p)
    ev = Path(p.evaluate.out)
    typer.echo(f"champion: {result.champion_uri} = {result.name} version {result.champion_version}")
    typer.echo(f"  val mIoU {result.champion_val_miou:.4f} ({result.eval_protocol})")
    typer.echo(f"  this run: version {result.version} -> @{result.alias} ({result.reason})")
    typer.echo(f"prediction overlays: {ev / 'predictions.png'}")
    typer.echo(f"confusion matrix:    {ev / 'confusion_matrix.png'}")
    typer.echo(
        f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    )
