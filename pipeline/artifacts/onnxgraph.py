"""The torch -> ONNX translation of a DANet inference module (``Segmenter``): one input ``image``
(N, 3, H, W) float32 RGB in [0, 1], N, H and W dynamic, normalisation inside the graph; one output
``logits`` (N, K, H, W) at input size.

The position attention (PAM) has two exported forms (``attention``):

- ``fused``: one ``com.microsoft.MultiHeadAttention`` node (a single head: query and key of
  width C/8, value of width C, scale 1), which ONNX Runtime runs with its flash kernel on CPU and
  its fused kernels on CUDA: the N x N map is never held, so a 1024x2048 image (N = 32768, a 4 GiB
  map) runs in a few hundred MiB. ONNX Runtime only (the op is its contrib op).
- ``standard``: MatMul -> Softmax -> MatMul in the default domain, which every runtime
  (TensorRT, OpenVINO, ...) runs and which holds the map (4 GiB per image at 1024x2048).

ONNX's own ``Attention`` op (opset 23) was measured too: ONNX Runtime 1.23 materialises it per
head on CPU (2950 MiB, 3.5 s for N = 8192 against 1053 MiB, 0.6 s for the MatMul form), so it
saves nothing yet (BENCHMARKS.md, issue 20).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from danet.attention import PositionAttention, dense_position_attention

Attention = Literal["fused", "standard"]
ATTENTIONS = ("fused", "standard")
INPUT, OUTPUT = "image", "logits"
MIN_SIDE = 16  # the smallest image side the graph accepts (stride 8 -> 2 x 2 features)


def fused_position_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out = V softmax(Q^T K)^T; q, k: (B, C', N), v: (B, C, N), as one ONNX Runtime
    ``MultiHeadAttention`` node (a placeholder outside ``torch.onnx.export``: zeros)."""
    b, c, n = v.shape
    out = torch.onnx.ops.symbolic(
        "com.microsoft::MultiHeadAttention",
        # its 3-D inputs are (batch, sequence, hidden): one head, query/key C' wide, value C
        (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
        {"num_heads": 1, "scale": 1.0},  # DANet's energy is unscaled (Eq. 1)
        dtype=v.dtype,
        shape=(b, n, c),
        version=1,
    )
    return out.transpose(1, 2)  # (B, C, N)


class _ExportedPAM(nn.Module):
    """A ``PositionAttention`` with its weights, whose attention is the fused op or the dense
    MatMul form: the traced graph never depends on the image size (``"auto"`` would)."""

    def __init__(self, pam: PositionAttention, attention: Attention) -> None:
        super().__init__()
        self.query, self.key, self.value, self.gamma = pam.query, pam.key, pam.value, pam.gamma
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = (m(x).flatten(2) for m in (self.query, self.key, self.value))
        if self.attention == "fused":
            out = fused_position_attention(q, k, v)
        else:
            out = dense_position_attention(q, k, v)
        return self.gamma * out.reshape(b, c, h, w) + x


def exportable(module: nn.Module, attention: Attention) -> nn.Module:
    """A copy of ``module`` (eval mode) with every PAM in its exported form."""
    module = copy.deepcopy(module).eval()
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PositionAttention):
                setattr(parent, name, _ExportedPAM(child, attention))
    return module


def export_onnx(module: nn.Module, path: Path, attention: Attention, opset: int = 18) -> None:
    """Write ``module`` (RGB in [0, 1] -> logits) as an ONNX graph at ``path``."""
    from torch.export import Dim

    model = exportable(module, attention)
    example = torch.rand(2, 3, 64, 64)  # batch 2: a batch of 1 would be specialised
    dims = {0: Dim("batch", min=1), 2: Dim("height", min=MIN_SIDE), 3: Dim("width", min=MIN_SIDE)}
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        opset_version=opset,
        dynamic_shapes=({**dims},),
        optimize=True,
        verbose=False,
    )
    assert program is not None
    program.save(str(path))


PROBE = (1, 3, 96, 128)  # the probe image's shape: stride 8 -> 12 x 16 features


def probe_image(shape: tuple[int, ...] = PROBE, seed: int = 0) -> np.ndarray:
    """A smooth, image-like (N, 3, H, W) float32 array in [0, 1]: blurred noise, not white noise,
    so that the model's activations are in their usual range."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((shape[0], shape[1], shape[2] // 8 + 1, shape[3] // 8 + 1))
    image = torch.nn.functional.interpolate(
        torch.from_numpy(coarse).float(), size=shape[2:], mode="bilinear", align_corners=False
    )
    return image.clamp(0, 1).numpy()
