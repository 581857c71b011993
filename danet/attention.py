"""Position and channel attention modules of DANet (Fu et al., CVPR 2019, Sec. 3.2 and 3.3).

PositionAttention (PAM, Eq. 1-2): for a feature map A of C x H x W with N = H*W,
    B = query(A), C' = key(A)  (C/8 channels), D = value(A) (C channels)
    S = softmax_j(B^T C')                      -- N x N, no 1/sqrt(d) scaling
    E = gamma * (D S^T) + A                   -- gamma initialised to 0

ChannelAttention (CAM, Eq. 3-4): with X = A reshaped to C x N,
    energy = X X^T                             -- C x C
    S = softmax(max_j(energy) - energy)        -- see the note in ChannelAttention
    E = gamma * (S X) + A

The dense PAM holds the N x N map: 4 GiB in float32 for one 1024x2048 image at stride 8
(N = 32768). The efficient implementation goes through ``F.scaled_dot_product_attention`` and never
materialises it (flash / memory-efficient kernels on GPU, the flash kernel on CPU).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

AttentionImpl = Literal["dense", "efficient", "auto"]
FUSED_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
]

# On CPU the dense bmm form is faster (the fused kernel repeats Q K^T per value head, about twice
# the FLOPs; bench/attention.py, BENCHMARKS.md), so "auto" keeps it there until the N x N map of the
# batch would pass this size, and then saves the memory instead.
CPU_DENSE_MAX_MAP_BYTES = 1 << 30


def wide(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: half-precision tensors widened, fp32 and fp64 kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class PositionAttention(nn.Module):
    """Position attention module (PAM).

    Args:
        in_channels: C, channels of the input and output.
        key_channels: channels of the query and key projections; the paper uses C // 8.
        impl: ``"dense"`` (bmm, holds the N x N map), ``"efficient"`` (fused SDPA, does not), or
            ``"auto"`` (efficient on CUDA; on CPU dense while the batch's N x N map stays under
            ``CPU_DENSE_MAX_MAP_BYTES``).
    """

    def __init__(
        self, in_channels: int, key_channels: int | None = None, impl: AttentionImpl = "auto"
    ) -> None:
        super().__init__()
        key_channels = key_channels or max(in_channels // 8, 1)
        if impl not in ("dense", "efficient", "auto"):
            raise ValueError(f"impl must be 'dense', 'efficient' or 'auto', got {impl!r}")
        self.key_channels = key_channels
        self.impl: AttentionImpl = impl
        self.query = nn.Conv2d(in_channels, key_channels, kernel_size=1)
        self.key = nn.Conv2d(in_channels, key_channels, kernel_size=1)
        self.value = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def resolved_impl(self, x: torch.Tensor) -> Literal["dense", "efficient"]:
        if self.impl != "auto":
            return self.impl
        if x.is_cuda:
            return "efficient"
        n = x.shape[-2] * x.shape[-1]
        map_bytes = x.shape[0] * n * n * x.element_size()
        return "dense" if map_bytes <= CPU_DENSE_MAX_MAP_BYTES else "efficient"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2)  # (B, C', N)
        k = self.key(x).flatten(2)  # (B, C', N)
        v = self.value(x).flatten(2)  # (B, C, N)
        if self.resolved_impl(x) == "dense":
            out = dense_position_attention(q, k, v)
        else:
            out = efficient_position_attention(q, k, v)
        return self.gamma * out.view(b, c, h, w) + x


def dense_position_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out = V softmax(Q^T K)^T, holding the N x N map. q, k: (B, C', N); v: (B, C, N).

    The energy and its softmax run in fp32 whatever the autocast dtype (a bf16 energy of
    magnitude 10^2-10^3 has a spacing of 1-8, which moves the softmax); the weighted sum of
    values then runs in the input's dtype.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        energy = torch.bmm(wide(q).transpose(1, 2), wide(k))  # (B, N, N): <q_i, k_j>
        attention = energy.softmax(dim=-1)  # (B, N, N), rows sum to 1 over keys j
    return torch.bmm(v, attention.to(v.dtype).transpose(1, 2))  # (B, C, N)


def efficient_position_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same result as ``dense_position_attention`` without materialising the N x N map.

    Two exact forms, the faster one per device and dtype (bench/attention.py, BENCHMARKS.md):
    fp32 on CUDA runs one head with the full value width through the memory-efficient kernel;
    otherwise (bf16/fp16 on CUDA: the flash kernel; and the CPU) the value channels are split into
    heads of the key width. The fused kernels accumulate the energy and its softmax in fp32.
    """
    if q.is_cuda and q.dtype == torch.float32:
        return _single_head_attention(q, k, v)
    return _per_head_attention(q, k, v)


def _single_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One head: query/key of width C', value of width C (memory-efficient kernel, CUDA)."""
    q_h = q.transpose(1, 2).unsqueeze(1).contiguous()  # (B, 1, N, C')
    k_h = k.transpose(1, 2).unsqueeze(1).contiguous()  # (B, 1, N, C')
    v_h = v.transpose(1, 2).unsqueeze(1).contiguous()  # (B, 1, N, C)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        out = F.scaled_dot_product_attention(q_h, k_h, v_h, scale=1.0)  # (B, 1, N, C)
    return out[:, 0].transpose(1, 2)  # (B, C, N)


def _per_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The fused kernels' common form: one head width for query, key and value.

    The C value channels are split into C / C' heads of width C' (the last padded with zeros when
    C' does not divide C), and query and key are repeated per head. All three must be contiguous
    with a unit last stride (``repeat`` copies; an ``expand`` or transposed view sends SDPA to its
    math kernel, which builds the N x N map per head), and the math kernel is excluded so that a
    fallback is an error, not a silent 8x memory blow-up.
    """
    b, ck, n = q.shape
    c = v.shape[1]
    heads = -(-c // ck)  # ceil(C / C')
    if heads * ck != c:
        v = F.pad(v, (0, 0, 0, heads * ck - c))  # (B, heads*C', N)
    q_h = q.transpose(1, 2).unsqueeze(1).repeat(1, heads, 1, 1)  # (B, heads, N, C')
    k_h = k.transpose(1, 2).unsqueeze(1).repeat(1, heads, 1, 1)  # (B, heads, N, C')
    v_h = v.view(b, heads, ck, n).transpose(2, 3).contiguous()  # (B, heads, N, C')
    with sdpa_kernel(FUSED_BACKENDS):  # never the math kernel: it would build the N x N map
        out = F.scaled_dot_product_attention(q_h, k_h, v_h, scale=1.0)  # (B, heads, N, C')
    out = out.transpose(2, 3).reshape(b, heads * ck, n)  # (B, heads*C', N)
    return out[:, :c]  # (B, C, N)


class ChannelAttention(nn.Module):
    """Channel attention module (CAM); it has no projections, only ``gamma``.

    Note: the paper's Eq. 3 writes softmax(X X^T); the official code (junfu1115/DANet,
    ``CAM_Module``) applies the softmax to ``max(energy) - energy``. That is
    softmax(-energy) -- it favours the *least* similar channels -- and the subtraction of the
    row max keeps it numerically stable. The trained models of the paper come from the code, and
    the developers' guide makes the paper and the official code the spec, so we follow the code.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.flatten(2)  # (B, C, N)
        # fp32 even under autocast: on post-ReLU features the energy is of order 10^3-10^4, where
        # bf16's spacing is 16-32, and the max-minus-energy softmax is near-hard. C x C: cheap.
        with torch.autocast(device_type=x.device.type, enabled=False):
            f32 = wide(flat)
            energy = torch.bmm(f32, f32.transpose(1, 2))  # (B, C, C)
            energy_new = energy.amax(dim=-1, keepdim=True) - energy  # (B, C, C)
            attention = energy_new.softmax(dim=-1)  # (B, C, C)
            out = torch.bmm(attention, f32)  # (B, C, N)
        return self.gamma * out.view(b, c, h, w).to(x.dtype) + x
