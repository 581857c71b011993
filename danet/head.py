"""DANet head (Fu et al., CVPR 2019, Sec. 3.4 and Fig. 2) and the FCN head used as baseline/aux.

The layout follows the official ``DANetHead``: a 3x3 conv (C -> C/4, norm, ReLU) into each branch,
PAM in one and CAM in the other, a 3x3 conv after each, and three classifiers (Dropout2d(0.1) and a
1x1 conv) on the PAM branch, the CAM branch and on their element-wise sum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from danet.attention import AttentionImpl, ChannelAttention, PositionAttention


def conv_norm_relu(
    in_channels: int, out_channels: int, norm_layer: Callable[..., nn.Module]
) -> nn.Sequential:
    """3x3 conv without bias, then norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        norm_layer(out_channels),
        nn.ReLU(inplace=True),
    )


def classifier(in_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout2d then a 1x1 conv to class logits."""
    return nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(in_channels, num_classes, kernel_size=1))


class DANetHead(nn.Module):
    """The dual attention head with its three outputs.

    Args:
        in_channels: channels of c4 from the backbone (2048 for ResNet-50/101).
        num_classes: number of output classes.
        norm_layer: normalisation layer type.
        attention_impl: PAM implementation, see ``PositionAttention``.
        dropout: Dropout2d probability before each classifier.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        attention_impl: AttentionImpl = "auto",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        inter = in_channels // 4
        self.pam_in = conv_norm_relu(in_channels, inter, norm_layer)  # official conv5a
        self.cam_in = conv_norm_relu(in_channels, inter, norm_layer)  # official conv5c
        self.pam = PositionAttention(inter, inter // 8, impl=attention_impl)
        self.cam = ChannelAttention()
        self.pam_out = conv_norm_relu(inter, inter, norm_layer)  # official conv51
        self.cam_out = conv_norm_relu(inter, inter, norm_layer)  # official conv52
        self.pam_cls = classifier(inter, num_classes, dropout)  # official conv6
        self.cam_cls = classifier(inter, num_classes, dropout)  # official conv7
        self.fused_cls = classifier(inter, num_classes, dropout)  # official conv8

    def forward(self, c4: torch.Tensor) -> dict[str, torch.Tensor]:
        pam_feat = self.pam_out(self.pam(self.pam_in(c4)))  # (B, C/4, h, w)
        cam_feat = self.cam_out(self.cam(self.cam_in(c4)))  # (B, C/4, h, w)
        out = {"out": self.fused_cls(pam_feat + cam_feat)}
        if self.training:  # the side outputs only feed the loss
            out["pam"] = self.pam_cls(pam_feat)
            out["cam"] = self.cam_cls(cam_feat)
        return out


class FCNHead(nn.Module):
    """3x3 conv (C -> C/4, norm, ReLU), Dropout2d and a 1x1 classifier (the FCN baseline / aux)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.conv = conv_norm_relu(in_channels, in_channels // 4, norm_layer)
        self.cls = classifier(in_channels // 4, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.conv(x))
