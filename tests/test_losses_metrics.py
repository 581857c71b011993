"""Loss weighting and confusion-matrix metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from danet.losses import segmentation_loss
from danet.metrics import (
    ConfusionMatrix,
    iou_per_class,
    mean_accuracy,
    mean_iou,
    pixel_accuracy,
)


def test_loss_is_weighted_sum_and_ignores_255() -> None:
    torch.manual_seed(0)
    logits = {k: torch.randn(2, 4, 6, 6) for k in ("out", "pam", "cam", "aux")}
    target = torch.randint(0, 4, (2, 6, 6))
    target[:, :2] = 255
    total, parts = segmentation_loss(logits, target, {"out": 1, "pam": 1, "cam": 1, "aux": 0.4})
    ce = {k: F.cross_entropy(v, target, ignore_index=255) for k, v in logits.items()}
    expected = ce["out"] + ce["pam"] + ce["cam"] + 0.4 * ce["aux"]
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["aux"], ce["aux"])
    # Ignored pixels carry no gradient whatever their logits.
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    segmentation_loss({"out": x}, target[:1])[0].backward()
    assert x.grad is not None and x.grad[0, :, :2].abs().sum() == 0


def test_loss_weight_zero_and_missing_output() -> None:
    logits = {"out": torch.randn(1, 3, 4, 4), "pam": torch.randn(1, 3, 4, 4)}
    target = torch.randint(0, 3, (1, 4, 4))
    total, _ = segmentation_loss(logits, target, {"out": 1.0})  # pam unweighted -> weight 0
    torch.testing.assert_close(total, F.cross_entropy(logits["out"], target))


def test_confusion_matrix_by_hand() -> None:
    # 3 classes, 255 ignored. gt / pred pairs:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # rows gt, cols pred: gt0 -> {0:1, 1:1}; gt1 -> {1:2}; gt2 -> {2:1, 0:1}; ignored pixels dropped
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert torch.equal(cm.matrix, expected)
    assert pixel_accuracy(cm.matrix) == pytest.approx(4 / 6)
    assert mean_accuracy(cm.matrix) == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # IoU: c0 = 1 / (2 + 2 - 1) = 1/3; c1 = 2 / (3 + 2 - 2) = 2/3; c2 = 1 / (1 + 2 - 1) = 1/2
    torch.testing.assert_close(
        iou_per_class(cm.matrix), torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64)
    )
    assert mean_iou(cm.matrix) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    summary = cm.compute()
    assert summary["miou"] == pytest.approx(0.5)


def test_absent_class_is_nan_and_left_out_of_mean() -> None:
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 255]))  # classes 2, 3 never appear
    iou = iou_per_class(cm.matrix)
    assert iou[0] == 1 and iou[1] == 1 and math.isnan(iou[2]) and math.isnan(iou[3])
    assert mean_iou(cm.matrix) == 1.0


def test_update_accumulates_and_rejects_bad_labels() -> None:
    cm = ConfusionMatrix(2)
    for _ in range(3):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert cm.matrix.tolist() == [[3, 3], [0, 0]]
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(ValueError, match="differ"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))


def test_poly_schedule_is_the_papers_formula() -> None:
    """torch's PolynomialLR gives lr_0 (1 - i / max_iters)^0.9 for both parameter groups."""
    from danet import DANetConfig, build_danet
    from pipeline.training.loop import build_optimizer, poly_schedule

    model = build_danet(DANetConfig(num_classes=3, backbone="resnet18d"))
    optimizer = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4, head_lr_mult=10)
    scheduler = poly_schedule(optimizer, max_iters=50, power=0.9)
    for i in range(51):
        expected = 0.01 * (1 - i / 50) ** 0.9
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert optimizer.param_groups[1]["lr"] == pytest.approx(10 * expected, rel=1e-9, abs=1e-15)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_ohem_keeps_the_hard_pixels_as_mmseg() -> None:
    """Hand-computed: 2 classes, one image of 4 pixels (one ignored)."""
    from danet.losses import Ohem, ohem_mask

    # true-class probabilities: softmax([a, b])[t] -> 0.88, 0.27, 0.5 (and an ignored pixel)
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 5.0]], [[0.0, 1.0], [0.0, 5.0]]]])  # (1, 2, 2, 2)
    target = torch.tensor([[[0, 0], [1, 255]]])
    p = logits.softmax(1)
    probs = [p[0, 0, 0, 0], p[0, 0, 0, 1], p[0, 1, 1, 0]]
    assert [round(float(v), 2) for v in probs] == [0.88, 0.27, 0.5]
    # thresh 0.7, min_kept 1: threshold = max(sorted[1] = 0.5, 0.7) = 0.7 -> keep 0.27 and 0.5
    assert ohem_mask(logits, target, Ohem(0.7, 1)).tolist() == [[[0.0, 1.0], [1.0, 0.0]]]
    # thresh 0.3, min_kept 1: max(0.5, 0.3) = 0.5 -> only 0.27 (strictly below)
    assert ohem_mask(logits, target, Ohem(0.3, 1)).tolist() == [[[0.0, 1.0], [0.0, 0.0]]]
    # min_kept 5 > 3 valid pixels: the threshold is the largest probability -> all but it
    assert ohem_mask(logits, target, Ohem(0.3, 5)).tolist() == [[[0.0, 1.0], [1.0, 0.0]]]
    total, _ = segmentation_loss({"out": logits}, target, {"out": 1.0}, ohem=Ohem(0.7, 1))
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    torch.testing.assert_close(total, (ce[0, 0, 1] + ce[0, 1, 0]) / 4)  # mmseg: over all pixels


def test_class_weights_by_hand() -> None:
    from danet.losses import class_weights

    counts, image_pixels = [60, 30, 10, 0], [100, 100, 50, 0]
    # median frequency: f = 0.6, 0.3, 0.2 (class 3 never seen); median 0.3 -> 0.5, 1, 1.5, 0
    weights = class_weights("median_frequency", counts, image_pixels)
    assert weights is not None
    assert weights.tolist() == pytest.approx([0.5, 1.0, 1.5, 0.0])
    enet = class_weights("enet", counts)
    assert enet is not None
    assert enet.tolist() == pytest.approx(
        [1 / math.log(1.02 + p) for p in (0.6, 0.3, 0.1)] + [0.0], rel=1e-6
    )
    assert class_weights("none", counts) is None
    weighted, _ = segmentation_loss(
        {"out": torch.randn(2, 4, 3, 3)},
        torch.randint(0, 3, (2, 3, 3)),
        {"out": 1.0},
        class_weight=weights,
    )
    assert torch.isfinite(weighted)
