"""``danet explain``: pictures of what a model's attentions look at, per image (danet/explain.py).

Per image two PNGs, each written atomically: ``<stem>_pam.png``, the image with its query pixels
numbered, then each query's position attention as a heat map over the image (a colour bar of
the weights); ``<stem>_cam.png``, for each class at a query, the channel most affine to it after
the channel attention, over the image, and the class x channel affinity matrix (a legend of the
classes, a colour bar in standard deviations). Unreadable files are reported and skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from danet.explain import Explanation, explain
from danet.head import DANetHead
from danet.model import Segmenter
from pipeline.artifacts.refs import LoadedModel
from pipeline.config import ConfigError
from pipeline.outputs import atomic_file, check_output
from pipeline.registry.predict import PredictReport, expand_inputs, read_image


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


def heat(ax: plt.Axes, image: np.ndarray, weights: np.ndarray, title: str) -> None:
    ax.imshow(image.mean(axis=2), cmap="gray", vmin=0, vmax=255)
    shown = ax.imshow(weights, cmap="inferno", alpha=0.6)
    plt.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def upsample(maps: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    return F.interpolate(maps[None].float(), size=shape, mode="bilinear")[0].numpy()


def position_figure(image: np.ndarray, e: Explanation, classes: Sequence[str]) -> plt.Figure:
    rows = upsample(e.rows, image.shape[:2])
    fig, axes = plt.subplots(1, len(e.points) + 1, figsize=(3.2 * (len(e.points) + 1), 3))
    axes[0].imshow(image)
    for i, (x, y) in enumerate(e.points, 1):
        axes[0].plot(x, y, "o", ms=9, mec="white", mfc="red")
        axes[0].annotate(str(i), (x, y), color="white", ha="center", va="center", fontsize=7)
    axes[0].set_title("query pixels", fontsize=9)
    axes[0].axis("off")
    for i, ((x, y), ax) in enumerate(zip(e.points, axes[1:], strict=True)):
        name = classes[int(e.labels[y, x])]
        heat(ax, image, rows[i], f"{i + 1}: ({x}, {y}) {name}")
        ax.plot(x, y, "o", ms=6, mec="white", mfc="none")
    fig.suptitle("position attention: where each query pixel gathers from", fontsize=10)
    fig.tight_layout()
    return fig


def channel_figure(image: np.ndarray, e: Explanation, classes: Sequence[str]) -> plt.Figure:
    v = e.channels
    maps = upsample(v.maps, image.shape[:2])
    fig, axes = plt.subplots(1, len(v.classes) + 1, figsize=(3.2 * (len(v.classes) + 1), 3))
    for i, (k, c) in enumerate(zip(v.classes, v.channels, strict=True)):
        heat(axes[i], image, maps[i], f"{classes[k]}: channel {c}")
    names = [classes[k] for k in v.classes]
    shown = axes[-1].imshow(v.affinity.numpy(), cmap="coolwarm", vmin=-3, vmax=3)
    axes[-1].set_xticks(range(len(names)), [f"ch {c}" for c in v.channels], rotation=90)
    axes[-1].set_yticks(range(len(names)), names)
    axes[-1].set_title("class x channel affinity (std)", fontsize=9)
    plt.colorbar(shown, ax=axes[-1], fraction=0.046, pad=0.02)
    fig.suptitle("channel attention: the channel each class lights up", fontsize=10)
    fig.tight_layout()
    return fig


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
    device = device or torch.device("cpu")
    out.mkdir(parents=True, exist_ok=True)
    report = PredictReport()
    for path in expand_inputs(inputs):
        try:
            image = read_image(path)
        except ValueError as err:
            report.failed.append((path, str(err)))
            continue
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(device)
        try:
            e = explain(model.module.to(device), x, points)
        except ValueError as err:
            report.failed.append((path, str(err)))
            continue
        for kind, figure in (("pam", position_figure), ("cam", channel_figure)):
            target = out / f"{path.stem}_{kind}.png"
            save(figure(image, e, model.classes), target)
            report.written.append(target)
        report.images += 1
    return report
