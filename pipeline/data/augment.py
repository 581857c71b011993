"""Joint image/label augmentation as the references train DANet: scale, pad, crop, flip, colour.

Every sample's augmentation is first *drawn* (``draw``: the resized size, the crop's offset,
the flip, the colour changes) from the ``numpy.random.Generator`` passed in, never the global
RNGs, then *applied* (``apply_image`` and ``apply_label``). Drawing needs only the image size (and
the resized label when ``cat_max_ratio`` < 1), so the CPU loader and the GPU path
(pipeline/data/gpu.py) apply the very same draws: the data order and augmentation are reproducible
from (seed, epoch, rank, worker) on either, and independent of the model's own randomness.

Random scale, three ways (``scale_mode``), each as a reference writes it:

- ``short_side`` -- the official DANet code (encoding/datasets/base.py ``_sync_transform``,
  v0.5.0): the short side becomes an integer drawn uniformly from
  [int(base_size x scale_min), int(base_size x scale_max)] (0.75-2.0 there), aspect kept.
- ``ratio`` -- mmsegmentation's ``RandomResize(scale, ratio_range, keep_ratio=True)``: the target
  scale (W, H) = ``scale`` x r, r ~ U(scale_min, scale_max), then the largest keep-ratio size
  that fits it (mmcv ``rescale_size``).
- ``long_side`` -- the long side becomes (base_size or the image's own) x U(scale_min, scale_max).

Then pad to the crop at the bottom/right (image 0 = black, as both references; label 255), a
random crop (``cat_max_ratio`` < 1 redraws it up to 10 times until no class covers that share of
it, as mmseg's ``RandomCrop``), a horizontal flip with probability 0.5, and optionally mmseg's
``PhotoMetricDistortion``. The geometry is torchvision.transforms.v2's functional API on
tensors, so the same code runs on a CPU uint8 image and a CUDA float one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

if TYPE_CHECKING:  # the augmentation reads params.yaml's data section as it is
    from pipeline.sections import DataParams

IGNORE_INDEX = 255
CAT_MAX_TRIES = 10
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Photometric:
    """mmseg's PhotoMetricDistortion draws; None = that change is skipped."""

    brightness: float | None  # additive, in [0, 1] units
    contrast: float | None
    contrast_first: bool
    saturation: float | None
    hue: float | None  # fraction of the hue circle


@dataclass(frozen=True)
class Draw:
    """One sample's augmentation: resize to ``size``, crop at ``(top, left)``, flip, colours."""

    size: tuple[int, int]  # (H, W) after the random scale
    top: int
    left: int
    flip: bool
    photometric: Photometric | None


def scaled_size(h: int, w: int, p: DataParams, rng: np.random.Generator) -> tuple[int, int]:
    """The (H, W) of the random scale for an image of (h, w)."""
    if p.scale_mode == "short_side":
        base = p.base_size or min(h, w)
        short = int(rng.integers(int(base * p.scale_min), int(base * p.scale_max) + 1))
        if h > w:
            return int(1.0 * h * short / w), short
        return short, int(1.0 * w * short / h)
    if p.scale_mode == "ratio":
        r = rng.uniform(p.scale_min, p.scale_max)
        target = (int(p.scale[0] * r), int(p.scale[1] * r))
        factor = min(max(target) / max(h, w), min(target) / min(h, w))
        return int(h * factor + 0.5), int(w * factor + 0.5)
    long_side = (p.base_size or max(h, w)) * rng.uniform(p.scale_min, p.scale_max)
    ratio = long_side / max(h, w)
    return max(1, round(h * ratio)), max(1, round(w * ratio))


def size_range(h: int, w: int, p: DataParams) -> tuple[tuple[int, int], tuple[int, int]]:
    """The smallest and largest (H, W) ``scaled_size`` can give an image of (h, w)."""

    class Edge:  # a Generator stand-in that always draws the low or the high end
        def __init__(self, high: bool) -> None:
            self.high = high

        def integers(self, lo: int, hi: int) -> int:
            return hi - 1 if self.high else lo

        def uniform(self, lo: float, hi: float) -> float:
            return hi if self.high else lo

    edges = [scaled_size(h, w, p, Edge(high)) for high in (False, True)]  # type: ignore[arg-type]
    return edges[0], edges[1]


def draw(
    h: int, w: int, p: DataParams, rng: np.random.Generator, label: torch.Tensor | None = None
) -> Draw:
    """Draw one sample's augmentation. ``label`` (H, W) is needed when ``cat_max_ratio`` < 1."""
    size = scaled_size(h, w, p, rng)
    crop = p.crop_size
    span_h, span_w = max(size[0], crop) - crop + 1, max(size[1], crop) - crop + 1
    top, left = int(rng.integers(0, span_h)), int(rng.integers(0, span_w))
    if p.cat_max_ratio < 1.0 and label is not None:
        resized = resize_label(label, size)
        for _ in range(CAT_MAX_TRIES - 1):
            if crop_is_varied(resized[top : top + crop, left : left + crop], p.cat_max_ratio):
                break
            top, left = int(rng.integers(0, span_h)), int(rng.integers(0, span_w))
    flip = bool(p.flip and rng.random() < 0.5)
    return Draw(size, top, left, flip, draw_photometric(rng) if p.photometric else None)


def crop_is_varied(crop: torch.Tensor, cat_max_ratio: float) -> bool:
    """mmseg's test: more than one class, and none covers ``cat_max_ratio`` of the labelled pixels."""
    _, counts = torch.unique(crop[crop != IGNORE_INDEX], return_counts=True)
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


def draw_photometric(rng: np.random.Generator) -> Photometric:
    """mmseg's PhotoMetricDistortion: each change with probability 0.5, contrast first or last."""
    brightness = rng.uniform(-32, 32) / 255 if rng.integers(2) else None
    contrast_first = bool(rng.integers(2))
    contrast = rng.uniform(0.5, 1.5) if rng.integers(2) else None
    saturation = rng.uniform(0.5, 1.5) if rng.integers(2) else None
    hue = rng.uniform(-18, 18) / 180 if rng.integers(2) else None
    return Photometric(brightness, contrast, contrast_first, saturation, hue)


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) uint8 -> ``size`` with nearest neighbour."""
    return F.resize(label[None], list(size), interpolation=v2.InterpolationMode.NEAREST)[0]


def _place(t: torch.Tensor, d: Draw, crop: int, fill: float | int) -> torch.Tensor:
    """Pad (bottom/right) to the crop, crop at the draw's offset, flip. t: (C, H, W) resized."""
    pad_h, pad_w = max(crop - t.shape[-2], 0), max(crop - t.shape[-1], 0)
    if pad_h or pad_w:
        t = F.pad(t, [0, 0, pad_w, pad_h], fill=fill)
    t = t[..., d.top : d.top + crop, d.left : d.left + crop]
    return t.flip(-1) if d.flip else t


def apply_label(label: torch.Tensor, d: Draw, crop: int) -> torch.Tensor:
    """(H, W) uint8 train ids -> (crop, crop) int64, padding = ignore."""
    return _place(resize_label(label, d.size)[None], d, crop, IGNORE_INDEX)[0].long()


def apply_image(image: torch.Tensor, d: Draw, crop: int) -> torch.Tensor:
    """(3, H, W) RGB, uint8 (CPU) or float in [0, 1] (either device) -> (3, crop, crop), same dtype."""
    image = F.resize(
        image, list(d.size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True
    )
    image = _place(image, d, crop, 0)
    return photometric(image, d.photometric) if d.photometric else image


def _affine(img: torch.Tensor, gain: float, shift: float) -> torch.Tensor:
    """gain * img + shift (shift in [0, 1] units), clipped to the image's range, dtype kept."""
    top = 255.0 if img.dtype == torch.uint8 else 1.0
    out = (img.float() * gain + shift * top).clamp(0, top)
    return out.round().to(img.dtype) if img.dtype == torch.uint8 else out


def photometric(img: torch.Tensor, p: Photometric) -> torch.Tensor:
    """mmseg's order: brightness, contrast (first or last), saturation, hue. Brightness and
    contrast are mmseg's (add, multiply); saturation is torchvision's blend with grey, hue its
    HSV shift."""

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return _affine(x, p.contrast, 0.0) if p.contrast is not None else x

    if p.brightness is not None:
        img = _affine(img, 1.0, p.brightness)
    img = contrast(img) if p.contrast_first else img
    if p.saturation is not None:
        img = F.adjust_saturation(img, p.saturation)
    if p.hue is not None:
        img = F.adjust_hue(img, p.hue)
    return img if p.contrast_first else contrast(img)


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or [0, 1] float (3, H, W) or (B, 3, H, W) -> float32 normalised."""
    return F.normalize(F.to_dtype(img, torch.float32, scale=True), list(mean), list(std))


def largest_side(h: int, w: int, p: DataParams) -> int:
    """The largest side ``scaled_size`` can give an image of (h, w)."""
    return max(size_range(h, w, p)[1])
