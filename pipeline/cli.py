"""The ``danet`` command: one sub-command per pipeline stage (``danet --help`` lists them). Each
parses its params (pipeline/command.py: file or preset, ``--set``, its options), calls its
stage's core function and prints what that returns: no stage logic here."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from pipeline import logs
from pipeline.command import (
    DanetGroup,
    FlipOption,
    ModelOption,
    ParamsOption,
    ScalesOption,
    SetOption,
    one_line_errors,
    opt,
    parse_scales,
    print_report,
    split_list,
    stage,
    switch,
    tracking_uri,
)

app = typer.Typer(
    name="danet",
    cls=DanetGroup,
    help="DANet training pipeline: shard datasets, train with Ray, evaluate, register, predict.",
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    preset: Annotated[str | None, opt("a preset from configs/ by name (e.g. cityscapes)")] = None,
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
    dataset: Annotated[str | None, opt("reader name (cityscapes, voc, camvid, ...)")] = None,
    root: Annotated[str | None, opt("dataset root in its published layout")] = None,
    out: Annotated[str | None, opt("output folder or URL (replaced atomically)")] = None,
    splits: Annotated[str | None, opt("comma-separated splits, e.g. train,val")] = None,
    on_error: Annotated[str | None, opt("fail (default) or skip bad samples")] = None,
    workers: Annotated[int | None, opt("encoding processes", min=1)] = None,
) -> None:
    """Raw dataset -> WebDataset shards + manifest.json (params: shard, synthetic)."""
    from pipeline.data.shard import describe, shard_from_params

    flags = {
        "shard.dataset": dataset,
        "shard.root": root,
        "shard.out": out,
        "shard.splits": split_list(splits),
        "shard.on_error": on_error,
        "shard.workers": workers,
    }
    with stage(ctx, params, sets, flags, ("shard.out",)) as p:
        start = time.perf_counter()
        manifest = shard_from_params(p.shard, p.synthetic)
    typer.echo(describe(manifest, p.shard.out, time.perf_counter() - start))


@app.command()
def synthetic(
    ctx: typer.Context,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    out: Annotated[str | None, opt("folder to write (replaced atomically)")] = None,
    splits: Annotated[str | None, opt("comma-separated splits (default val)")] = None,
    count: Annotated[int | None, opt("first N scenes of each split; 0 = all", min=0)] = None,
) -> None:
    """Write the embedded synthetic scenes as a `folder` dataset of PNGs (params: synthetic)."""
    from pipeline.data.readers.synthetic import export_folder

    flags = {"synthetic.out": out, "synthetic.splits": split_list(splits), "synthetic.count": count}
    with stage(ctx, params, sets, flags, ("synthetic.out",)) as p:
        images = export_folder(p.synthetic)
    o = p.synthetic.out
    typer.echo(f"{len(images)} scenes -> {o}/images/, masks in {o}/masks/, {o}/classes.txt")


@app.command()
def train(
    ctx: typer.Context,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    address: Annotated[str | None, opt("Ray address (else RAY_ADDRESS or a local Ray)")] = None,
    run_name: Annotated[str | None, opt("resume this run (default: from the config)")] = None,
    restart: Annotated[
        bool, switch("--restart", "delete the run's checkpoints, train anew")
    ] = False,
    refit: Annotated[Path | None, opt("a search's tune.out: train its best params in full")] = None,
) -> None:
    """Train DANet with Ray Train on the shards; resumes a run of the same name (params: model, data, train, mlflow)."""
    from pipeline.training.driver import run_training
    from pipeline.training.search_summary import read_refit

    with one_line_errors():
        overlay, tags = read_refit(refit) if refit is not None else (None, {})
    flags = {"train.ray_address": address, "train.run_name": run_name}
    with stage(ctx, params, sets, flags, ("train.out", "train.storage_path"), overlay) as p:
        summary = run_training(p.model, p.data, p.train, p.mlflow, restart=restart, tags=tags)
    typer.echo(summary.describe())


@app.command()
def tune(
    ctx: typer.Context,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    restart: Annotated[
        bool, switch("--restart", "delete the search's results, run it anew")
    ] = False,
) -> None:
    """Ray Tune search over tune.space (random or Optuna TPE, ASHA); writes best_params.yaml for --refit (params: tune, model, data, train, mlflow)."""
    from pipeline.training.search import run_search

    with stage(ctx, params, sets, writes=("tune.out", "train.storage_path")) as p:
        found = run_search(p.model, p.data, p.train, p.mlflow, p.tune, restart)
    typer.echo(found.describe(p.tune.out))


@app.command()
def evaluate(
    ctx: typer.Context,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    model: ModelOption = None,
    split: Annotated[str | None, opt("split of the shards to evaluate")] = None,
    mode: Annotated[str | None, opt("whole or slide")] = None,
    scales: ScalesOption = None,
    flip: FlipOption = None,
    out: Annotated[str | None, opt("report folder (replaced atomically)")] = None,
) -> None:
    """Evaluate a model on a split: mIoU, per-class IoU, confusion matrix, overlays (params: evaluate)."""
    from pipeline.evaluation.evaluate import candidates, describe, run_evaluation

    flags = {
        "evaluate.model": model,
        "evaluate.split": split,
        "evaluate.mode": mode,
        "evaluate.scales": parse_scales(scales),
        "evaluate.flip": flip,
        "evaluate.out": out,
    }
    with stage(ctx, params, sets, flags, ("evaluate.out",)) as p:
        result = run_evaluation(p.evaluate, tracking_uri(p), candidates(p))
    typer.echo(describe(result, p.evaluate.out))


@app.command()
def register(
    ctx: typer.Context,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    eval_metrics: Annotated[str | None, opt("metrics.json written by danet evaluate")] = None,
    name: Annotated[str | None, opt("registered model name (default danet-<dataset>)")] = None,
    onnx: Annotated[str | None, opt("ONNX files of these weights to serve too, a,b")] = None,
) -> None:
    """Register the evaluated model in MLflow; move the champion alias only if it wins (params: register)."""
    from pipeline.registry.register import register as do_register

    flags = {
        "register.eval_metrics": eval_metrics,
        "register.name": name,
        "register.onnx": split_list(onnx),
    }
    with stage(ctx, params, sets, flags, ("register.out",)) as p:
        typer.echo(do_register(p.register, tracking_uri(p)).describe())


@app.command()
def predict(
    ctx: typer.Context,
    inputs: Annotated[
        list[Path] | None, typer.Argument(help="images, folders (or --shards)")
    ] = None,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    model: ModelOption = None,
    out: Annotated[str | None, opt("folder for the predictions")] = None,
    shards: Annotated[str | None, opt("predict a split of these shards (folder or URL)")] = None,
    split: Annotated[str | None, opt("the split of --shards (default test)")] = None,
    format: Annotated[str | None, opt("masks (pictures), cityscapes (labelIds) or voc")] = None,
    mode: Annotated[str | None, opt("auto (by slide_above), whole or slide")] = None,
    scales: ScalesOption = None,
    slide_above: Annotated[int | None, opt("slide over images with a longer side", min=0)] = None,
    crop: Annotated[int | None, opt("sliding-window crop", min=16)] = None,
    flip: FlipOption = None,
) -> None:
    """Images, folders or a split of shards -> label maps, as pictures or as a benchmark server
    reads them (params: predict, evaluate's protocols); unreadable files are listed (exit 1)."""
    from pipeline.use.predict import predict_from_params

    flags = {
        "predict.model": model,
        "predict.out": out,
        "predict.shards": shards,
        "predict.split": split,
        "predict.format": format,
        "predict.mode": mode,
        "predict.scales": parse_scales(scales),
        "predict.slide_above": slide_above,
        "predict.crop": crop,
        "predict.flip": flip,
    }
    with stage(ctx, params, sets, flags, ("predict.out",)) as p:
        report = predict_from_params(p.predict, inputs or [], tracking_uri(p))
    print_report(report, p.predict.out)


@app.command()
def explain(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Argument(help="image files or folders")],
    model: Annotated[str, opt("model.pt, MLflow run id, runs:/ or models:/ URI")],
    out: Annotated[str, opt("folder for the pictures")] = "outputs/explain",
    points: Annotated[str, opt("query pixels 'x,y;x,y' (default: one per large region)")] = "",
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
) -> None:
    """Images -> pictures of the model's position and channel attention (<stem>_pam.png, _cam.png).

    Computed for the chosen query pixels only, never the N x N map (danet/explain.py)."""
    from pipeline.use.explain_images import explain_from_params

    with stage(ctx, params, sets) as p:
        report = explain_from_params(p, model, inputs, out, points, tracking_uri(p))
    print_report(report, out)


@app.command()
def export(
    ctx: typer.Context,
    params: ParamsOption = Path("params.yaml"),
    sets: SetOption = None,
    model: ModelOption = None,
    format: Annotated[str | None, opt("onnx")] = None,
    out: Annotated[str | None, opt("the .onnx file to write (replaced atomically)")] = None,
    quantize: Annotated[str | None, opt("none or int8 (calibrated on calibration_shards)")] = None,
    attention: Annotated[str | None, opt("fused (ONNX Runtime, no N x N map) or standard")] = None,
) -> None:
    """A model as an ONNX file: input image RGB [0, 1], output logits; INT8 on request (params: export)."""
    from pipeline.use.export import export_model

    flags = {
        "export.model": model,
        "export.format": format,
        "export.out": out,
        "export.quantize": quantize,
        "export.attention": attention,
    }
    with stage(ctx, params, sets, flags, ("export.out",)) as p:
        typer.echo(export_model(p.export, tracking_uri(p)).describe())


@app.command()
def summary(
    ctx: typer.Context, params: ParamsOption = Path("params.yaml"), sets: SetOption = None
) -> None:
    """What the pipeline produced: the champion, its val mIoU, where to look, how to open MLflow."""
    from pipeline.registry.register import summary as pipeline_summary

    with stage(ctx, params, sets) as p:
        typer.echo(pipeline_summary(p, tracking_uri(p)))


@app.command("import-weights")
def import_weights(
    file: Annotated[Path, typer.Argument(help="their checkpoint (.pth)")],
    source: Annotated[str, typer.Option("--from", help="official (junfu1115/DANet) or mmseg")],
    out: Annotated[Path, typer.Option(help="the model.pt to write (replaced atomically)")],
    dataset: Annotated[str | None, opt("class names: cityscapes, voc, ade20k, ...")] = None,
    multi_grid: Annotated[str | None, opt("last stage's dilations: 4,8,16 or none")] = None,
) -> None:
    """Released DANet weights (official code or mmsegmentation) -> a model.pt the stages load."""
    from pipeline.artifacts.importweights import import_weights as run

    with one_line_errors():
        typer.echo(run(source, file, out, dataset, multi_grid).describe())
