"""What DANet's two attentions look at (the paper's Fig. 4), for chosen query pixels only.

Position attention: for a query pixel i of the PAM's input A (C x h x w, N = h*w), its row
``softmax_j(<query(A)_i, key(A)_j>)`` over all N positions, the weights with which that pixel
gathers the others. Only the Q chosen rows are computed (Q x N), never the N x N map, so a
1024x2048 image (N = 32768 at stride 8) costs Q x 128 KiB, not 4 GiB; in fp32, as the module.

Channel attention: it re-weights whole channels (C x C), so a channel is seen through the classes
it responds to. After the CAM, each class's affinity with each channel is how much higher the
channel is on the class's predicted pixels than off them (in the channel's standard deviations);
the paper draws the channel maps that go with a class, as ``ChannelView`` holds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from danet.attention import PositionAttention, wide
from danet.head import DANetHead
from danet.model import Segmenter


def position_rows(pam: PositionAttention, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Rows ``queries`` (flat positions, (Q,)) of the PAM's N x N attention for input ``x``
    (1, C, h, w): (Q, h, w), each summing to 1; equal to the dense module's rows."""
    _, _, h, w = x.shape
    with torch.autocast(device_type=x.device.type, enabled=False):
        q = wide(pam.query(x).flatten(2)[0][:, queries])  # (C', Q)
        k = wide(pam.key(x).flatten(2)[0])  # (C', N)
        rows = (q.transpose(0, 1) @ k).softmax(dim=-1)  # (Q, N)
    return rows.view(len(queries), h, w)


def class_channel_affinity(
    features: torch.Tensor, labels: torch.Tensor, classes: int
) -> torch.Tensor:
    """(K, C): per class and channel of ``features`` (C, h, w), mean on the class's pixels of
    ``labels`` (h, w) minus mean off them, over the channel's std; NaN for a class absent."""
    flat = wide(features).flatten(1)  # (C, N)
    std = flat.std(dim=1).clamp_min(1e-6)
    out = torch.full((classes, flat.shape[0]), float("nan"), device=flat.device)
    for k in range(classes):
        mask = (labels.flatten() == k).to(flat.device)
        if 0 < int(mask.sum()) < mask.numel():
            out[k] = (flat[:, mask].mean(1) - flat[:, ~mask].mean(1)) / std
    return out


@dataclass(frozen=True)
class ChannelView:
    classes: list[int]  # the classes shown
    channels: list[int]  # per class, its most affine channel
    maps: torch.Tensor  # (len(classes), h, w): those channels after the CAM
    affinity: torch.Tensor  # (len(classes), len(classes)): class i against class j's channel


@dataclass(frozen=True)
class Explanation:
    labels: torch.Tensor  # (H, W) predicted train ids
    points: list[tuple[int, int]]  # the query pixels (x, y) in the image
    rows: torch.Tensor  # (Q, h, w) their position attention
    channels: ChannelView


def default_points(labels: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """One query per large predicted region: for the ``count`` classes that cover most pixels,
    the class's pixel nearest its centroid, (x, y)."""
    ids, areas = labels.unique(return_counts=True)
    points = []
    for k in ids[areas.argsort(descending=True)][:count]:
        ys, xs = torch.nonzero(labels == k, as_tuple=True)
        cy, cx = ys.float().mean(), xs.float().mean()
        i = int(((ys - cy) ** 2 + (xs - cx) ** 2).argmin())
        points.append((int(xs[i]), int(ys[i])))
    return points


@torch.no_grad()
def explain(
    segmenter: Segmenter,
    image: torch.Tensor,
    points: Sequence[tuple[int, int]] = (),
    count: int = 4,
) -> Explanation:
    """The prediction of ``image`` (1, 3, H, W, RGB in [0, 1]) and what its attentions did:
    the position attention of ``points`` (x, y; default: ``default_points``) and the channel
    view of the classes at those points. One forward pass; ValueError for a model without
    DANet's head or a point outside the image."""
    head = segmenter.model.head
    if not isinstance(head, DANetHead):
        raise ValueError(f"the model's head is {type(head).__name__}, not DANet's: no attention")
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        head.pam.register_forward_hook(lambda m, i, o: seen.setdefault("pam_in", i[0])),
        head.cam.register_forward_hook(lambda m, i, o: seen.setdefault("cam_out", o)),
    ]
    try:
        logits = segmenter.eval()(image)
    finally:
        for hook in hooks:
            hook.remove()
    _, _, height, width = image.shape
    labels = logits[0].argmax(0)
    chosen = list(points) or default_points(labels, count)
    for x, y in chosen:
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"point {x},{y} is outside the {width}x{height} image")
    feat = seen["pam_in"]
    h, w = feat.shape[-2:]
    flat = torch.tensor([(y * h // height) * w + x * w // width for x, y in chosen])
    rows = position_rows(head.pam, feat, flat.to(feat.device))
    small = F.interpolate(labels[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    classes = list(dict.fromkeys(int(labels[y, x]) for x, y in chosen))
    affinity = class_channel_affinity(seen["cam_out"][0], small, logits.shape[1])
    best = [int(affinity[k].nan_to_num(float("-inf")).argmax()) for k in classes]
    view = ChannelView(
        classes=classes,
        channels=best,
        maps=wide(seen["cam_out"][0][best]),
        affinity=affinity[classes][:, best],
    )
    return Explanation(labels.cpu(), chosen, rows.cpu(), view)
