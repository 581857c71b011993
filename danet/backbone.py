"""Dilated ResNet backbone returning (c3, c4) at output stride 8 or 16.

DANet (Fu et al., CVPR 2019, Sec. 3.1 and 4.1) removes the down-sampling of the last two ResNet
stages and dilates them instead, so the attention modules see a feature map of 1/8 the input size.
The paper's multi-grid ("MG", Table 3) sets the last stage's three blocks to dilations (4, 8, 16).

timm builds the network: `features_only` + `output_stride` give the dilated stages. The stems and
downsampling differ between the variants, and released weights fit only their own one:

- ``resnet50``/``resnet101``: the 7x7 stem of the paper's code (junfu1115/DANet v0.5.0) and
  torchvision; a strided 1x1 conv downsamples.
- ``resnet50c``/``resnet101c``: a deep stem of three 3x3 convs (32, 32, 64 channels), strided 1x1
  downsampling: mmsegmentation's ResNetV1c, the backbone of its DANet configs.
- ``resnet50s``/``resnet101s``: the deep stem at 64, 64, 128 channels, strided 1x1 downsampling: the
  official code's ``deep_stem`` from v1.0.0 on.
- ``resnet*d``: the deep stem at 32, 32, 64 and average-pool downsampling (timm's ResNet-D, which
  also averages 2x2 in the dilated stages; mmsegmentation's V1d and the official resnet50d do not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import timm
import torch
from torch import nn

SUPPORTED_BACKBONES = (
    "resnet18d",
    "resnet34d",
    "resnet50d",
    "resnet101d",
    "resnet50",
    "resnet101",
    "resnet50c",
    "resnet101c",
    "resnet50s",
    "resnet101s",
)


class DilatedResNet(nn.Module):
    """A timm ResNet cut after its last stage, returning the c3 and c4 feature maps.

    Args:
        name: timm model name, one of ``SUPPORTED_BACKBONES``.
        output_stride: 8 (DANet) or 16; stages past it are dilated instead of strided.
        multi_grid: absolute dilation of each block of the last stage, e.g. ``(4, 8, 16)`` (the
            paper's MG at output stride 8); ``None`` keeps timm's uniform dilation.
        norm_layer: normalisation layer type, e.g. ``nn.BatchNorm2d``.
        pretrained: load ImageNet weights through timm (needs network access or the HF cache).
        pretrained_path: a local timm/torchvision-style state-dict file to load instead.
    """

    def __init__(
        self,
        name: str = "resnet50d",
        output_stride: int = 8,
        multi_grid: Sequence[int] | None = None,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        pretrained: bool = False,
        pretrained_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if name not in SUPPORTED_BACKBONES:
            raise KeyError(
                f"unknown backbone {name!r}; choose one of {', '.join(SUPPORTED_BACKBONES)}"
            )
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        kwargs: dict = {}
        if pretrained_path is not None:
            path = Path(pretrained_path)
            if not path.is_file():
                raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        self.body = timm.create_model(
            name,
            pretrained=pretrained or pretrained_path is not None,
            features_only=True,
            out_indices=(3, 4),  # layer3 (c3) and layer4 (c4)
            output_stride=output_stride,
            norm_layer=norm_layer,
            **kwargs,
        )
        c3, c4 = cast(Any, self.body).feature_info.channels()
        self.channels: tuple[int, int] = (int(c3), int(c4))
        if multi_grid is not None:
            set_stage_dilations(self.body.get_submodule("layer4"), multi_grid)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a timm/torchvision ResNet state dict (its ``fc`` is ignored); every weight the
        body has must be there with its shape."""
        body = self.body.state_dict()
        missing = [k for k in body if k not in state or state[k].shape != body[k].shape]
        if missing:
            raise ValueError(
                f"the weights do not fit this backbone: {missing[0]} and {len(missing) - 1} more"
            )
        self.body.load_state_dict({k: state[k] for k in body})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c3, c4 = self.body(x)
        return c3, c4


def set_stage_dilations(stage: nn.Module, dilations: Sequence[int]) -> None:
    """Give block i of a ResNet stage the dilation ``dilations[i]`` on its 3x3 convolutions."""
    blocks = list(stage.children())
    if len(dilations) != len(blocks):
        raise ValueError(
            f"multi_grid has {len(dilations)} rates but the stage has {len(blocks)} blocks"
        )
    for block, rate in zip(blocks, dilations, strict=True):
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                conv.dilation = (rate, rate)
                conv.padding = (rate, rate)


def stage_dilations(stage: nn.Module) -> list[int]:
    """The dilation of the last 3x3 convolution of each block in a stage (for tests and logs)."""
    rates = []
    for block in stage.children():
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        rates.append(int(convs[-1].dilation[0]))
    return rates
