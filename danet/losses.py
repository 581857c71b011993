"""Segmentation losses: cross-entropy on each named output, weighted and summed.

DANet (Fu et al., CVPR 2019) trains the PAM, CAM and fused outputs each with cross-entropy; the
official code sums them with weight 1. An optional FCN auxiliary output (mmsegmentation) is
usually weighted 0.4.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

DEFAULT_WEIGHTS: dict[str, float] = {"out": 1.0, "pam": 1.0, "cam": 1.0, "aux": 0.4}


def segmentation_loss(
    logits: Mapping[str, torch.Tensor],
    target: torch.Tensor,
    weights: Mapping[str, float] | None = None,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of per-output cross-entropy.

    Args:
        logits: ``{"out": (B, K, H, W), ...}`` as returned by the model.
        target: (B, H, W) integer class ids, ``ignore_index`` for pixels to skip.
        weights: per-output weight; outputs without a weight count with weight 0.
        ignore_index: label value that contributes neither loss nor gradient.

    Returns:
        The total loss and the unweighted loss of each output (detached), for logging.
    """
    weights = DEFAULT_WEIGHTS if weights is None else weights
    total = torch.zeros((), device=target.device)
    parts: dict[str, torch.Tensor] = {}
    for name, value in logits.items():
        loss = F.cross_entropy(value.float(), target, ignore_index=ignore_index)
        parts[name] = loss.detach()
        total = total + weights.get(name, 0.0) * loss
    return total, parts
