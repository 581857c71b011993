"""Inference protocols shared by evaluation and prediction: whole image, sliding window,
multi-scale with horizontal flip (the paper's "MS + Flip", Sec. 4.2/Table 4).

All take a ``Segmenter`` (RGB in [0, 1] -> logits) and return logits at the input size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Protocol:
    """How to turn an image into logits.

    Args:
        mode: ``"whole"`` (the image in one pass) or ``"slide"`` (crop windows).
        crop: window side for ``"slide"``.
        stride: window step; 0 = 2/3 of the crop, as the official code.
        scales: image scales, summed at full resolution (``(1.0,)`` = single scale).
        flip: also run on the mirrored image and add its (mirrored back) logits.
    """

    mode: str = "whole"
    crop: int = 512
    stride: int = 0
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"evaluate.mode must be whole or slide, got {self.mode!r}")
        if self.crop < 16 or self.stride < 0:
            raise ValueError(
                f"evaluate.crop must be >= 16 and stride >= 0, got {self.crop}, {self.stride}"
            )
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"evaluate.scales must be positive, got {self.scales}")

    @property
    def name(self) -> str:
        """A short tag that says which numbers may be compared: e.g. ``whole``, ``slide512-ms6-flip``."""
        parts = [self.mode if self.mode == "whole" else f"slide{self.crop}"]
        if tuple(self.scales) != (1.0,):
            parts.append(f"ms{len(self.scales)}")
        if self.flip:
            parts.append("flip")
        return "-".join(parts)


def slide_logits(model: nn.Module, x: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Logits of overlapping crop x crop windows, averaged where they overlap.

    An image smaller than the crop is padded (and the padding cut off again), so a crop at least
    as large as the image gives exactly the whole-image result.
    """
    b, _, h, w = x.shape
    stride = stride or max(1, math.ceil(crop * 2 / 3))
    if h <= crop and w <= crop:
        return model(x)
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    x = F.pad(x, (0, pw, 0, ph))
    hp, wp = x.shape[-2:]
    rows = range(0, max(hp - crop, 0) + stride, stride)
    cols = range(0, max(wp - crop, 0) + stride, stride)
    logits: torch.Tensor | None = None
    count = torch.zeros(1, 1, hp, wp, device=x.device)
    for top in rows:
        for left in cols:
            t, lft = min(top, hp - crop), min(left, wp - crop)
            out = model(x[:, :, t : t + crop, lft : lft + crop])  # (B, K, crop, crop)
            if logits is None:
                logits = torch.zeros(b, out.shape[1], hp, wp, device=x.device, dtype=out.dtype)
            logits[:, :, t : t + crop, lft : lft + crop] += out
            count[:, :, t : t + crop, lft : lft + crop] += 1
    assert logits is not None
    return (logits / count)[:, :, :h, :w]


def infer(model: nn.Module, x: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, K, H, W) logits under ``protocol``."""
    h, w = x.shape[-2:]
    total: torch.Tensor | None = None
    for scale in protocol.scales:
        xs = (
            x
            if scale == 1.0
            else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        )
        for flipped in (False, True) if protocol.flip else (False,):
            inp = xs.flip(-1) if flipped else xs
            if protocol.mode == "whole":
                out = model(inp)
            else:
                out = slide_logits(model, inp, protocol.crop, protocol.stride)
            if flipped:
                out = out.flip(-1)
            if out.shape[-2:] != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            total = out if total is None else total + out
    assert total is not None
    return total


def to_input(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> (1, 3, H, W) float in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(image))
    return t.permute(2, 0, 1)[None].float() / 255.0
