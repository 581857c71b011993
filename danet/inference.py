"""Inference protocols, as the references evaluate DANet: whole image or sliding window, multi-scale,
horizontal flip (the paper's "MS + Flip", Sec. 4.2 / Table 4).

Two references, each followed exactly (``Protocol.reference``):

- ``official`` -- junfu1115/DANet v0.5.0, ``encoding/models/base.py`` ``MultiEvalModule``: at
  scale s the image's long side becomes ceil(base_size x s) (base_size 0 = the image's own long
  side), resized with ``align_corners=True``. Sliding windows start at multiples of the stride
  (2/3 of the crop with one scale, 1/2 with several) and are padded with black at the borders;
  an image no larger than the crop is padded to it. Each window's score is exp(logits (+ the
  flipped logits)); overlapping windows are averaged, resized back and summed over scales.
- ``mmseg`` -- mmsegmentation: an optional keep-ratio test resize to ``test_scale`` (W, H), then
  each ratio r (mmseg 0.x ``MultiScaleFlipAug``: the keep-ratio size that fits test_scale x r;
  without a test scale, 1.x's ``scale_factor``: the image x r). Sliding windows at multiples of
  the stride, the last one shifted back inside the image, no padding (``slide_inference``); logits
  of overlapping windows averaged, resized back (``align_corners=False``), then the softmax of
  every (scale, flip) variant averaged (``SegTTAModel.merge_preds``).

``mode="whole"`` runs each (resized) image in one pass, no padding. All functions take a module
mapping (B, 3, H, W) RGB in [0, 1] to logits, and return scores at the input size; argmax them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REFERENCES = ("official", "mmseg")


@dataclass(frozen=True)
class Protocol:
    """How to turn an image into class scores.

    Args:
        reference: ``"official"`` or ``"mmseg"`` (see the module docstring).
        mode: ``"whole"`` (the image in one pass) or ``"slide"`` (crop windows).
        crop: window side for ``"slide"``.
        stride: window step; 0 = the reference's default.
        scales: image scales (official: of ``base_size``; mmseg: ratios of the test scale).
        flip: also run on the mirrored image.
        base_size: official: the long side at scale 1.0 (0 = the image's own).
        test_scale: mmseg: (W, H) of the keep-ratio test resize, or None.
    """

    reference: str = "official"
    mode: str = "whole"
    crop: int = 512
    stride: int = 0
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    base_size: int = 0
    test_scale: tuple[int, int] | None = None
    window_batch: int = 8  # windows per forward pass (speed only: the scores are the same)

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be official or mmseg, got {self.reference!r}")
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"mode must be whole or slide, got {self.mode!r}")
        if self.crop < 16 or self.stride < 0 or self.base_size < 0:
            raise ValueError("crop must be >= 16, stride and base_size >= 0")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales}")
        if self.window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {self.window_batch}")
        if self.stride > self.crop:  # windows further apart than wide: pixels between them
            raise ValueError(
                f"stride {self.stride} is larger than crop {self.crop}: the sliding windows "
                "would leave pixels between them unpredicted"
            )

    @property
    def window_stride(self) -> int:
        if self.stride:
            return self.stride
        if self.reference == "official" and len(self.scales) > 1:
            return int(self.crop * 0.5)
        return (
            int(self.crop * 2 / 3) if self.reference == "official" else math.ceil(self.crop * 2 / 3)
        )

    @property
    def name(self) -> str:
        """What makes numbers comparable, e.g. ``official-whole-flip``,
        ``official-base2048-slide1024-ms8-flip``, ``mmseg-2048x512-whole-ms6-flip``."""
        parts = [self.reference]
        if self.reference == "official" and self.base_size:
            parts.append(f"base{self.base_size}")
        if self.reference == "mmseg" and self.test_scale:
            parts.append(f"{self.test_scale[0]}x{self.test_scale[1]}")
        parts.append("whole" if self.mode == "whole" else f"slide{self.crop}s{self.window_stride}")
        if tuple(self.scales) != (1.0,):
            parts.append(f"ms{len(self.scales)}")
        if self.flip:
            parts.append("flip")
        return "-".join(parts)


def scaled_size(h: int, w: int, scale: float, p: Protocol) -> tuple[int, int]:
    """The (H, W) the image is resized to at ``scale``."""
    if p.reference == "official":
        long_size = math.ceil((p.base_size or max(h, w)) * scale)
        if h > w:
            return long_size, int(1.0 * w * long_size / h + 0.5)
        return int(1.0 * h * long_size / w + 0.5), long_size
    if p.test_scale is None:
        return int(h * scale + 0.5), int(w * scale + 0.5)
    target = (int(p.test_scale[0] * scale), int(p.test_scale[1] * scale))
    factor = min(max(target) / max(h, w), min(target) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _grid(n: int, crop: int, stride: int, official: bool) -> int:
    """How many window positions cover a side of ``n`` pixels (as the windows functions lay them)."""
    if official:
        return math.ceil((max(n, crop) - crop) / stride) + 1
    return max(n - crop + stride - 1, 0) // stride + 1


def passes(h: int, w: int, p: Protocol) -> list[tuple[int, int, int]]:
    """What ``infer`` runs the model on for an (h, w) image, before it runs: per scale (and
    flip), (forward passes, height, width of each pass) -- the work and the memory a caller
    bounds before it starts."""
    official = p.reference == "official"
    out = []
    for scale in p.scales:
        sh, sw = scaled_size(h, w, scale, p)
        if p.mode == "whole":
            out.append((1, sh, sw))
        elif official and max(sh, sw) <= p.crop:
            out.append((1, p.crop, p.crop))  # padded up to the crop
        elif official:
            stride = p.window_stride
            n = _grid(sh, p.crop, stride, True) * _grid(sw, p.crop, stride, True)
            out.append((n, p.crop, p.crop))
        else:
            n = _grid(sh, p.crop, p.window_stride, False) * _grid(
                sw, p.crop, p.window_stride, False
            )
            out.append((n, min(p.crop, sh), min(p.crop, sw)))
    flips = 2 if p.flip else 1
    return [(n * flips, ph, pw) for n, ph, pw in out]


def check_work(
    h: int, w: int, p: Protocol, max_pass: int, max_image: int, max_work: int, max_passes: int = 0
) -> None:
    """``ValueError`` (one line) unless the (h, w) image fits: each forward pass at most
    ``max_pass`` pixels, the image at every scale at most ``max_image`` (its scores are held at
    that size), all passes together at most ``max_work`` pixels and ``max_passes`` passes (0:
    unbounded)."""
    for scale, (_, ph, pw) in zip(p.scales, passes(h, w, p), strict=True):
        sh, sw = scaled_size(h, w, scale, p)
        if min(sh, sw) < 1:
            raise ValueError(f"{w}x{h} at scale {scale:g} is {sw}x{sh}: empty (larger scales)")
        if sh * sw > max_image:
            raise ValueError(
                f"{w}x{h} at scale {scale:g} is {sw}x{sh}: over the {max_image:,} pixel limit "
                "of one image (choose smaller scales or base_size)"
            )
        if ph * pw > max_pass:
            raise ValueError(
                f"{w}x{h} at scale {scale:g} takes a {pw}x{ph} forward pass: over the "
                f"{max_pass:,} pixels of one pass (use mode slide, a smaller crop or scale)"
            )
    total = sum(n * ph * pw for n, ph, pw in passes(h, w, p))
    count = sum(n for n, _, _ in passes(h, w, p))
    if max_passes and count > max_passes:
        raise ValueError(
            f"{w}x{h} takes {count:,} forward passes: over the {max_passes:,} one image may take "
            "(a larger stride or crop, fewer scales, no flip)"
        )
    if max_work and total > max_work:
        raise ValueError(
            f"{w}x{h} takes {count:,} forward passes over {total:,} pixels: over the "
            f"{max_work:,} one image may take (send it smaller, fewer scales, no flip)"
        )


def _forward(model: nn.Module, x: torch.Tensor, p: Protocol) -> torch.Tensor:
    """Per-window scores before fusion: official exp(logits (+ flipped)), mmseg raw logits."""
    out = model(x)
    if p.reference == "official":
        if p.flip:
            out = out + model(x.flip(-1)).flip(-1)
        return out.float().exp()
    return out.float()


def official_windows(model: nn.Module, x: torch.Tensor, p: Protocol) -> torch.Tensor:
    """The official grid: windows at multiples of the stride, black-padded to the crop."""
    crop, stride = p.crop, p.window_stride
    h, w = x.shape[-2:]
    if max(h, w) <= crop or p.mode == "whole":
        padded = F.pad(x, (0, max(crop - w, 0), 0, max(crop - h, 0))) if p.mode == "slide" else x
        return _forward(model, padded, p)[..., :h, :w]
    if min(h, w) < crop:
        x = F.pad(x, (0, max(crop - w, 0), 0, max(crop - h, 0)))
    ph, pw = x.shape[-2:]
    boxes = [
        (top, min(top + crop, ph), left, min(left + crop, pw))
        for top in range(0, math.ceil((ph - crop) / stride) * stride + 1, stride)
        for left in range(0, math.ceil((pw - crop) / stride) * stride + 1, stride)
    ]
    pad = [(0, crop - (x2 - x1), 0, crop - (y2 - y1)) for y1, y2, x1, x2 in boxes]
    windows = [
        F.pad(x[..., y1:y2, x1:x2], pads) for (y1, y2, x1, x2), pads in zip(boxes, pad, strict=True)
    ]
    return _accumulate(model, windows, boxes, x.shape, p)[..., :h, :w]


def _accumulate(
    model: nn.Module,
    windows: list[torch.Tensor],
    boxes: list[tuple[int, int, int, int]],
    shape: torch.Size,
    p: Protocol,
) -> torch.Tensor:
    """Run the (equal-sized) windows ``window_batch`` at a time and average the overlaps."""
    b, _, h, w = shape
    scores = counts = None
    for start in range(0, len(windows), p.window_batch):
        chunk = torch.cat(windows[start : start + p.window_batch])  # (n * B, 3, crop, crop)
        outs = _forward(model, chunk, p).split(b)
        for (y1, y2, x1, x2), out in zip(boxes[start : start + p.window_batch], outs, strict=True):
            if scores is None or counts is None:
                scores = out.new_zeros(b, out.shape[1], h, w)
                counts = out.new_zeros(1, 1, h, w)
            scores[..., y1:y2, x1:x2] += out[..., : y2 - y1, : x2 - x1]
            counts[..., y1:y2, x1:x2] += 1
    assert scores is not None and counts is not None
    return scores / counts


def mmseg_windows(model: nn.Module, x: torch.Tensor, p: Protocol) -> torch.Tensor:
    """mmseg's grid: windows at multiples of the stride, the last one shifted back, no padding."""
    if p.mode == "whole":
        return _forward(model, x, p)
    crop, stride = p.crop, p.window_stride
    h, w = x.shape[-2:]
    boxes = []
    for i in range(max(h - crop + stride - 1, 0) // stride + 1):
        for j in range(max(w - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    windows = [x[..., y1:y2, x1:x2] for y1, y2, x1, x2 in boxes]  # all one size
    return _accumulate(model, windows, boxes, x.shape, p)


def infer(model: nn.Module, x: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, K, H, W) fused scores under ``protocol``."""
    p = protocol
    h, w = x.shape[-2:]
    official = p.reference == "official"
    total: torch.Tensor | None = None
    variants = 0
    for scale in p.scales:
        size = scaled_size(h, w, scale, p)
        xs = (
            x
            if size == (h, w)
            else F.interpolate(x, size=size, mode="bilinear", align_corners=official)
        )
        for flipped in (False, True) if (p.flip and not official) else (False,):
            inp = xs.flip(-1) if flipped else xs
            out = official_windows(model, inp, p) if official else mmseg_windows(model, inp, p)
            out = out.flip(-1) if flipped else out
            if out.shape[-2:] != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=official)
            out = out if official else out.softmax(dim=1)
            total = out if total is None else total + out
            variants += 1
    assert total is not None
    return total if official else total / variants


def to_input(
    image: np.ndarray | torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float in [0, 1] on ``device``: the one conversion a
    model's input takes (the model normalises it itself, danet/model.py ``Segmenter``).

    The uint8 pixels travel, the division runs there: a true division by a tensor on every
    device, so CPU and CUDA give the same bits (CUDA multiplies by the reciprocal of a Python
    number, one bit off for half the pixel values)."""
    t = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    x = t.to(device or "cpu", non_blocking=True).permute(2, 0, 1)[None].float()
    return x / torch.full((), 255.0, device=x.device)


def protocol_for(
    size: tuple[int, int],
    mode: str = "auto",
    crop: int = 512,
    flip: bool = False,
    slide_above: int = 1024,
) -> Protocol:
    """The protocol for one image of ``size`` (H, W), its mode by ``mode_for``."""
    return Protocol(mode=mode_for(size, mode, slide_above), crop=crop, flip=flip)


def mode_for(size: tuple[int, int], mode: str, slide_above: int) -> str:
    """``auto`` -> the whole image up to ``slide_above`` pixels on the long side (0: always
    whole) and a sliding window beyond; any other mode as given."""
    if mode != "auto":
        return mode
    return "slide" if slide_above > 0 and max(size) > slide_above else "whole"


@torch.no_grad()
def label_map(
    model: nn.Module, image: np.ndarray, protocol: Protocol, device: torch.device | None = None
) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 class ids under ``protocol``: what prediction and
    serving answer."""
    scores = infer(model, to_input(image, device), protocol)
    return scores.argmax(1)[0].to(torch.uint8).cpu().numpy()
