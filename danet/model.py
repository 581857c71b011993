"""The whole DANet model (Fu et al., CVPR 2019, Fig. 2), the FCN baseline, and their builder.

``build_danet(DANetConfig(...))`` returns a module whose forward gives a dict of logits at input
size: ``"out"`` always; ``"pam"`` and ``"cam"`` (DANet) and ``"aux"`` (when enabled) in training
mode only, since only the loss uses them. The loss is not part of the model: see danet/losses.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from danet.attention import AttentionImpl
from danet.backbone import SUPPORTED_BACKBONES, DilatedResNet
from danet.head import DANetHead, FCNHead

HEADS = ("danet", "fcn")


@dataclass(frozen=True)
class DANetConfig:
    """Everything that defines the architecture.

    Args:
        num_classes: output classes (ignore is not a class).
        backbone: timm ResNet name, one of ``SUPPORTED_BACKBONES``.
        head: ``"danet"`` (dual attention) or ``"fcn"`` (the paper's baseline, no attention).
        output_stride: 8 (the paper) or 16.
        multi_grid: dilations of the last stage's blocks, e.g. ``(4, 8, 16)``; None for uniform.
        aux: add an FCN auxiliary head on c3 (as mmsegmentation; weight it in the loss).
        attention_impl: PAM implementation: ``"dense"``, ``"efficient"`` or ``"auto"``.
        dropout: Dropout2d probability before each classifier.
        pretrained: ImageNet weights for the backbone through timm (needs network or HF cache).
        pretrained_path: a local backbone checkpoint to load instead (offline machines).
    """

    num_classes: int
    backbone: str = "resnet50d"
    head: Literal["danet", "fcn"] = "danet"
    output_stride: int = 8
    multi_grid: tuple[int, ...] | None = None
    aux: bool = False
    attention_impl: AttentionImpl = "auto"
    dropout: float = 0.1
    pretrained: bool = False
    pretrained_path: str | None = field(default=None)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1, got {self.num_classes}")
        if self.backbone not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"model.backbone {self.backbone!r} is unknown; choose one of "
                f"{', '.join(SUPPORTED_BACKBONES)}"
            )
        if self.head not in HEADS:
            raise ValueError(f"model.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.output_stride not in (8, 16):
            raise ValueError(f"model.output_stride must be 8 or 16, got {self.output_stride}")
        if self.attention_impl not in ("dense", "efficient", "auto"):
            raise ValueError(
                "model.attention_impl must be dense, efficient or auto, "
                f"got {self.attention_impl!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.multi_grid is not None and any(r < 1 for r in self.multi_grid):
            raise ValueError(f"model.multi_grid rates must be >= 1, got {self.multi_grid}")


class SegmentationModel(nn.Module):
    """Backbone -> head (-> aux head on c3); every output upsampled to the input size.

    Upsampling is bilinear with ``align_corners=False`` (torchvision's convention); the official
    code uses ``align_corners=True``, which shifts logits by under one stride-8 cell.
    """

    def __init__(self, backbone: DilatedResNet, head: nn.Module, aux_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        c3, c4 = self.backbone(x)
        out = self.head(c4)
        logits: dict[str, torch.Tensor] = out if isinstance(out, dict) else {"out": out}
        if self.aux_head is not None and self.training:
            logits["aux"] = self.aux_head(c3)
        return {
            name: F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            for name, t in logits.items()
        }

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the backbone (trained at 10x the base learning rate)."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]


def build_danet(
    config: DANetConfig, norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d
) -> SegmentationModel:
    """Build DANet (or the FCN baseline when ``config.head == "fcn"``) from a config.

    Args:
        config: the architecture.
        norm_layer: normalisation layer type for backbone and heads (convert to SyncBatchNorm in
            the trainer with ``nn.SyncBatchNorm.convert_sync_batchnorm``).
    """
    backbone = DilatedResNet(
        config.backbone,
        output_stride=config.output_stride,
        multi_grid=config.multi_grid,
        norm_layer=norm_layer,
        pretrained=config.pretrained,
        pretrained_path=config.pretrained_path,
    )
    c3_channels, c4_channels = backbone.channels
    head: nn.Module
    if config.head == "danet":
        head = DANetHead(
            c4_channels,
            config.num_classes,
            norm_layer=norm_layer,
            attention_impl=config.attention_impl,
            dropout=config.dropout,
        )
    else:
        head = FCNHead(
            c4_channels, config.num_classes, norm_layer=norm_layer, dropout=config.dropout
        )
    aux = (
        FCNHead(c3_channels, config.num_classes, norm_layer=norm_layer, dropout=config.dropout)
        if config.aux
        else None
    )
    return SegmentationModel(backbone, head, aux)


class Segmenter(nn.Module):
    """Inference wrapper: RGB in [0, 1] (B, 3, H, W) -> fused logits (B, K, H, W).

    Normalisation is part of the module, so a logged or served model needs no preprocessing
    beyond scaling pixels to [0, 1].
    """

    def __init__(
        self, model: SegmentationModel, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)["out"]
