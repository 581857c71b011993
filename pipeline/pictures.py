"""Results people look at: colour masks, overlays, prediction grids, confusion matrices, curves and
attention maps (PNG), and the per-class IoU table (CSV)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from danet.explain import Explanation

IGNORE_COLOUR = (0, 0, 0)


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 colours; 255 and unknown ids are black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return table[label.astype(np.uint8)]


def overlay(
    image: np.ndarray, label: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5
) -> np.ndarray:
    """Colour mask blended over an (H, W, 3) uint8 image."""
    colours = colorize(label, palette).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


COLUMNS = ("image", "ground truth", "prediction")


def column_titles(widths: Sequence[int], titles: Sequence[str]) -> np.ndarray:
    """A white band with each title centred over its column (a font sized to the columns)."""
    size = int(np.clip(min(widths) / 8, 10, 24))
    font = ImageFont.load_default(size=size)
    band = Image.new("RGB", (sum(widths), size + size // 2 + 4), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    left = 0
    for width, title in zip(widths, titles, strict=True):
        draw.text(
            (left + width / 2, band.height / 2), title, fill=(0, 0, 0), font=font, anchor="mm"
        )
        left += width
    return np.asarray(band)


def prediction_grid(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], palette: Sequence[Sequence[int]]
) -> np.ndarray:
    """One row per image: image | ground truth | prediction overlay (all the same size), under
    a band naming the columns."""
    lines = []
    for image, truth, pred in rows:
        lines.append(
            np.concatenate([image, colorize(truth, palette), overlay(image, pred, palette)], axis=1)
        )
    width = max(line.shape[1] for line in lines)
    lines = [
        np.pad(line, ((0, 4), (0, width - line.shape[1]), (0, 0)), constant_values=255)
        for line in lines
    ]
    first = rows[0][0].shape[1]
    titles = column_titles([first, first, width - 2 * first], COLUMNS)
    return np.concatenate([titles, *lines], axis=0)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def plot_confusion_matrix(
    cm: np.ndarray, classes: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (rows: ground truth) as a PNG heat map."""
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if len(classes) <= 30:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if norm[i, j] >= 0.01:
                    colour = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=colour,
                    )
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class _Step(Protocol):
    iteration: int
    loss: float
    lr: float


class _Eval(Protocol):
    iteration: int
    miou: float


def plot_curves(
    steps: Sequence[_Step], evals: Sequence[_Eval], path: str | Path, title: str = ""
) -> Path:
    """Training loss and learning rate per logged step, val mIoU per evaluation, as one PNG."""
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        its = [s.iteration for s in steps]
        ax_loss.plot(its, [s.loss for s in steps], label="loss (sum of outputs)")
        ax_lr = ax_loss.twinx()
        ax_lr.plot(its, [s.lr for s in steps], color="tab:gray", linestyle="--", label="lr")
        ax_lr.set_ylabel("base learning rate (the head: x train.head_lr_mult)")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(loc="upper right")
    if evals:
        ax_miou.plot([e.iteration for e in evals], [e.miou for e in evals], marker="o")
    ax_miou.set_xlabel("iteration")
    ax_miou.set_ylabel("val mIoU")
    ax_miou.set_ylim(0, 1)
    ax_miou.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_per_class_iou(path: str | Path, pairs: Iterable[tuple[str, float]]) -> Path:
    """``class,iou`` rows; a class absent from both truth and predictions (NaN) is left blank."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "iou"])
        for name, iou in pairs:
            writer.writerow([name, "" if math.isnan(iou) else f"{iou:.5f}"])
    return path


def per_class_iou_figure(pairs: Iterable[tuple[str, float]], title: str = "") -> plt.Figure:
    """Every class's IoU as one horizontal bar chart on one axis, 0 to 1, each bar labelled with
    its value (a class never seen, NaN, says n/a): small classes look small beside large ones."""
    names, values = zip(*pairs, strict=True) if pairs else ((), ())
    fig, ax = plt.subplots(figsize=(6.4, 0.32 * len(names) + 1.2))
    y = np.arange(len(names))
    shown = [0.0 if math.isnan(v) else v for v in values]
    ax.barh(y, shown, color="#3b7dd8")
    for i, v in enumerate(values):
        ax.text(min(shown[i], 0.85) + 0.01, i, "n/a" if math.isnan(v) else f"{v:.3f}", va="center")
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # the classes top to bottom in their order
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.set_title(title or "per-class IoU")
    fig.tight_layout()
    return fig


def plot_per_class_iou(
    pairs: Iterable[tuple[str, float]], path: str | Path, title: str = ""
) -> Path:
    """:func:`per_class_iou_figure` as a PNG."""
    fig = per_class_iou_figure(list(pairs), title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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


ATTENTION_FIGURES = {"pam": position_figure, "cam": channel_figure}  # danet explain's pictures


def figure_array(fig: plt.Figure) -> np.ndarray:
    """A figure as an (H, W, 3) uint8 picture (closed after)."""
    fig.canvas.draw()
    array = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]
    plt.close(fig)
    return array
