"""Joint image/label augmentation as the paper and the official code train DANet.

Random scale of the base size (long side = base_size x U(scale_min, scale_max); the image's own
long side when base_size is 0), pad to the crop (image with the mean, label with 255), random crop,
horizontal flip, optional photometric distortion, then normalisation with the manifest's mean/std.

The geometry is torchvision.transforms.v2's functional API on ``tv_tensors.Image`` / ``Mask`` (masks
resize with nearest neighbour). Every random draw comes from the ``numpy.random.Generator`` passed
in, never the global RNGs, so the data order and augmentation are reproducible from
(seed, epoch, rank, worker) and independent of the model's own randomness (dropout).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IGNORE_INDEX = 255


@dataclass(frozen=True)
class AugmentParams:
    crop_size: int = 96
    base_size: int = 0
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    photometric: bool = False


def to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """(H, W, 3) uint8 and (H, W) uint8 arrays -> (3, H, W) Image and (1, H, W) Mask."""
    img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    mask = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(label))[None])
    return img, mask


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 normalised."""
    return F.normalize(F.to_dtype(img, torch.float32, scale=True), list(mean), list(std))


def train_transform(
    image: np.ndarray,
    label: np.ndarray,
    params: AugmentParams,
    mean: Sequence[float],
    std: Sequence[float],
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training sample -> (3, crop, crop) float32 and (crop, crop) int64."""
    img, mask = to_tensors(image, label)
    h, w = img.shape[-2:]
    long_side = (params.base_size or max(h, w)) * rng.uniform(params.scale_min, params.scale_max)
    ratio = long_side / max(h, w)
    size = [max(1, round(h * ratio)), max(1, round(w * ratio))]
    img = F.resize(img, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    mask = F.resize(mask, size)  # masks always resize with nearest neighbour
    crop = params.crop_size
    pad_h, pad_w = max(crop - size[0], 0), max(crop - size[1], 0)
    if pad_h or pad_w:
        fill = [round(255 * m) for m in mean]
        img = F.pad(img, [0, 0, pad_w, pad_h], fill=fill)
        mask = F.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)
    top = int(rng.integers(0, img.shape[-2] - crop + 1))
    left = int(rng.integers(0, img.shape[-1] - crop + 1))
    img, mask = F.crop(img, top, left, crop, crop), F.crop(mask, top, left, crop, crop)
    if params.flip and rng.random() < 0.5:
        img, mask = F.horizontal_flip(img), F.horizontal_flip(mask)
    if params.photometric:
        img = photometric_distortion(img, rng)
    return normalize(img, mean, std), mask[0].long()


def photometric_distortion(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter, each applied with probability 0.5."""
    if rng.random() < 0.5:
        img = F.adjust_brightness(img, float(rng.uniform(0.75, 1.25)))
    if rng.random() < 0.5:
        img = F.adjust_contrast(img, float(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.5:
        img = F.adjust_saturation(img, float(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.5:
        img = F.adjust_hue(img, float(rng.uniform(-0.05, 0.05)))
    return img


def eval_transform(
    image: np.ndarray, label: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole image, no augmentation: (3, H, W) float32 and (H, W) int64."""
    img, mask = to_tensors(image, label)
    return normalize(img, mean, std), mask[0].long()
