"""Segmentation losses: cross-entropy on each named output, weighted and summed.

DANet (Fu et al., CVPR 2019) trains the PAM, CAM and fused outputs each with cross-entropy; the
official code sums them with weight 1. An optional FCN auxiliary output (mmsegmentation) is
usually weighted 0.4. Two recipe pieces the references and the field use:

- **OHEM** (mmsegmentation's ``OHEMPixelSampler``): per output, keep the pixels whose probability
  of the true class is below ``max(thresh, p_k)``, with ``p_k`` the ``min_kept x batch``-th lowest
  such probability, so at least that many pixels are kept; the loss sums the kept pixels'
  cross-entropy over all pixels of the batch (mmseg's ``reduction='mean'`` with pixel weights).
- **Class weights** from the training split's pixel counts: median frequency balancing (Eigen &
  Fergus 2015, SegNet: ``median(f) / f_c`` with ``f_c`` = pixels of c / pixels of the images
  that contain c) or ENet's ``1 / ln(1.02 + p_c)`` (Paszke et al. 2016, ``p_c`` = share of c).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_WEIGHTS: dict[str, float] = {"out": 1.0, "pam": 1.0, "cam": 1.0, "aux": 0.4}


@dataclass(frozen=True)
class Ohem:
    """mmseg's OHEM pixel sampler settings."""

    thresh: float = 0.7
    min_kept: int = 100_000  # per image


@torch.no_grad()
def ohem_mask(
    logits: torch.Tensor, target: torch.Tensor, ohem: Ohem, ignore_index: int = 255
) -> torch.Tensor:
    """(B, H, W) 1.0 for the hard pixels OHEM keeps, 0.0 elsewhere (and at ignored pixels)."""
    valid = target != ignore_index
    prob = logits.float().softmax(dim=1)
    index = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    true_prob = prob.gather(1, index).squeeze(1)  # (B, H, W)
    kept = torch.zeros_like(true_prob)
    sorted_prob = true_prob[valid].sort().values
    if sorted_prob.numel() == 0:
        return kept
    min_threshold = sorted_prob[min(ohem.min_kept * target.shape[0], sorted_prob.numel() - 1)]
    threshold = max(float(min_threshold), ohem.thresh)
    kept[valid & (true_prob < threshold)] = 1.0
    return kept


def segmentation_loss(
    logits: Mapping[str, torch.Tensor],
    target: torch.Tensor,
    weights: Mapping[str, float] | None = None,
    ignore_index: int = 255,
    class_weight: torch.Tensor | None = None,
    ohem: Ohem | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of per-output cross-entropy.

    Args:
        logits: ``{"out": (B, K, H, W), ...}`` as returned by the model.
        target: (B, H, W) integer class ids, ``ignore_index`` for pixels to skip.
        weights: per-output weight; outputs without a weight count with weight 0.
        ignore_index: label value that contributes neither loss nor gradient.
        class_weight: (K,) per-class weight of the cross-entropy, or None.
        ohem: keep only the hard pixels of each output (see ``Ohem``), or None.

    Returns:
        The total loss and the unweighted loss of each output (detached), for logging.
    """
    weights = DEFAULT_WEIGHTS if weights is None else weights
    total = torch.zeros((), device=target.device)
    parts: dict[str, torch.Tensor] = {}
    for name, value in logits.items():
        value = value.float()
        if ohem is None:
            loss = mean_cross_entropy(value, target, class_weight, ignore_index)
        else:
            pixel = F.cross_entropy(
                value, target, weight=class_weight, ignore_index=ignore_index, reduction="none"
            )
            loss = (pixel * ohem_mask(value, target, ohem, ignore_index)).mean()
        parts[name] = loss.detach()
        total = total + weights.get(name, 0.0) * loss
    return total, parts


def mean_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """``F.cross_entropy``'s mean over the labelled pixels (weighted by their class's weight),
    but 0 -- not NaN -- when the batch has no labelled pixel (every label ``ignore_index``, as a
    crop of void can be): torch's mean divides 0 by 0 there, and one such batch turns every
    weight NaN. The 0 carries no gradient."""
    pixel = F.cross_entropy(
        logits, target, weight=class_weight, ignore_index=ignore_index, reduction="none"
    )  # (B, H, W), 0 at ignored pixels
    valid = target != ignore_index
    if class_weight is None:
        denominator = valid.sum().to(pixel.dtype)
    else:
        safe = torch.where(valid, target, torch.zeros_like(target))
        denominator = (class_weight[safe] * valid).sum()
    return pixel.sum() / denominator.clamp(min=torch.finfo(pixel.dtype).tiny)


def class_weights(
    kind: str, class_pixels: Sequence[int], class_image_pixels: Sequence[int] = ()
) -> torch.Tensor | None:
    """Per-class cross-entropy weights: ``none``, ``median_frequency`` or ``enet``.

    ``class_pixels``: pixels of each class in the training split; ``class_image_pixels``: pixels of
    the images that contain each class (median frequency). A class that never occurs gets 0.
    """
    if kind == "none":
        return None
    counts = torch.tensor(class_pixels, dtype=torch.float64)
    if kind == "enet":
        share = counts / counts.sum()
        out = torch.where(counts > 0, 1.0 / torch.log(1.02 + share), torch.zeros_like(share))
    elif kind == "median_frequency":
        totals = torch.tensor(class_image_pixels, dtype=torch.float64)
        freq = torch.where(totals > 0, counts / totals.clamp(min=1), torch.zeros_like(counts))
        median = freq[freq > 0].quantile(0.5)  # numpy's median: the middle two averaged
        out = torch.where(freq > 0, median / freq.clamp(min=math.ulp(1.0)), torch.zeros_like(freq))
    else:
        raise ValueError(f"class weights must be none, median_frequency or enet, got {kind!r}")
    return out.float()
