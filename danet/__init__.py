"""DANet: Dual Attention Network for Scene Segmentation (Fu et al., CVPR 2019).

Paper: https://arxiv.org/abs/1809.02983 -- official code: https://github.com/junfu1115/DANet.
Pure PyTorch, no I/O: the pipeline (pipeline/) imports this package, never the other way round.
"""

from danet.attention import ChannelAttention, PositionAttention
from danet.backbone import SUPPORTED_BACKBONES, DilatedResNet
from danet.head import DANetHead, FCNHead
from danet.losses import segmentation_loss
from danet.metrics import ConfusionMatrix
from danet.model import DANetConfig, SegmentationModel, build_danet

__all__ = [
    "SUPPORTED_BACKBONES",
    "ChannelAttention",
    "ConfusionMatrix",
    "DANetConfig",
    "DANetHead",
    "DilatedResNet",
    "FCNHead",
    "PositionAttention",
    "SegmentationModel",
    "build_danet",
    "segmentation_loss",
]
