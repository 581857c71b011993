"""``danet explain``: pictures of what a model's attentions look at, per image (danet/explain.py).

Per image two PNGs, each written atomically: ``<stem>_pam.png``, the image with its query pixels
numbered, then each query's position attention as a heat map over the image (a colour bar of
the weights); ``<stem>_cam.png``, for each class at a query, the channel most affine to it after
the channel attention, over the image, and the class x channel affinity matrix (a legend of the
classes, a colour bar in standard deviations). Unreadable files are reported and skipped; two
inputs whose pictures would share a name (a/x.png and b/x.png) are refused before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from danet.explain import explain
from danet.head import DANetHead
from danet.inference import to_input
from danet.model import Segmenter
from pipeline.artifacts.refs import LoadedModel
from pipeline.config import ConfigError, Params
from pipeline.outputs import atomic_file, check_output, check_own
from pipeline.pictures import ATTENTION_FIGURES
from pipeline.use.predict import PredictReport, check_distinct, expand_inputs, read_image


def parse_points(text: str) -> list[tuple[int, int]]:
    """``"x,y;x,y"`` -> [(x, y), ...]; a malformed list is one ConfigError."""
    points = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            x, y = (int(v) for v in part.split(","))
        except ValueError:
            raise ConfigError(
                f"--points: {part!r} is not x,y (pixels), e.g. 40,30;100,60"
            ) from None
        points.append((x, y))
    return points


def figure_names(stem: str) -> tuple[str, ...]:
    """The pictures of one image of ``stem``: ``<stem>_pam.png``, ``<stem>_cam.png``."""
    return tuple(f"{stem}_{kind}.png" for kind in ATTENTION_FIGURES)


def save(fig: plt.Figure, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def explain_files(
    model: LoadedModel,
    inputs: Sequence[str | Path],
    out: Path,
    points: Sequence[tuple[int, int]] = (),
    device: torch.device | None = None,
) -> PredictReport:
    """The two pictures for every image of ``inputs`` into ``out``; bad files are collected."""
    if not isinstance(model.module, Segmenter):
        raise ConfigError(
            f"{model.ref}: explain needs the PyTorch weights (model.pt, a run, a registered "
            "version), not an ONNX file"
        )
    if not isinstance(model.module.model.head, DANetHead):
        raise ConfigError(f"{model.ref}: its head is not DANet's (model.head fcn): no attention")
    check_output(out, "--out")
    check_own(out, "--out", "explain", tuple(f"*_{kind}.png" for kind in ATTENTION_FIGURES))
    files = list(expand_inputs(inputs))
    check_distinct([(f.stem, str(f)) for f in files], figure_names)
    device = device or torch.device("cpu")
    out.mkdir(parents=True, exist_ok=True)
    report = PredictReport()
    for path in files:
        try:
            image = read_image(path)
        except ValueError as err:
            report.failed.append((path, str(err)))
            continue
        x = to_input(image).to(device)
        try:
            e = explain(model.module.to(device), x, points)
        except ValueError as err:
            report.failed.append((path, str(err)))
            continue
        names = figure_names(path.stem)
        for figure, name in zip(ATTENTION_FIGURES.values(), names, strict=True):
            target = out / name
            save(figure(image, e, model.classes), target)
            report.written.append(target)
        report.images += 1
    return report


def explain_from_params(
    p: Params, model: str, inputs: Sequence[Path], out: str, points: str, tracking_uri: str
) -> PredictReport:
    """``danet explain``: the pictures never land on a store; on predict.device."""
    from pipeline.artifacts.refs import load_model
    from pipeline.devices import pick_device
    from pipeline.stores import check_outputs

    check_outputs(p, {"--out": out})
    queries = parse_points(points)
    device = pick_device(p.predict.device, "predict.device")
    return explain_files(load_model(model, tracking_uri), inputs, Path(out), queries, device)
