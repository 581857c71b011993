"""PAM and CAM against the paper's formulas, identity at init, dense == efficient."""

from __future__ import annotations

import pytest
import torch

from danet.attention import (
    ChannelAttention,
    PositionAttention,
    dense_position_attention,
    efficient_position_attention,
)
from tests.conftest import DEVICES


def _randomize_gamma(module: PositionAttention | ChannelAttention, value: float = 0.7) -> None:
    with torch.no_grad():
        module.gamma.fill_(value)


@pytest.mark.parametrize("impl", ["dense", "efficient", "auto"])
def test_pam_is_identity_at_init(impl: str) -> None:
    torch.manual_seed(0)
    pam = PositionAttention(32, impl=impl)  # type: ignore[arg-type]
    x = torch.randn(2, 32, 5, 7)
    assert pam.gamma.item() == 0.0
    assert pam.key_channels == 4  # C / 8
    torch.testing.assert_close(pam(x), x, rtol=0, atol=0)


def test_cam_is_identity_at_init() -> None:
    cam = ChannelAttention()
    x = torch.randn(2, 16, 5, 7)
    assert cam.gamma.item() == 0.0
    torch.testing.assert_close(cam(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["dense", "efficient"])
def test_pam_matches_paper_formula(impl: str) -> None:
    """Eq. 1-2: s_ji = softmax_i(B_i . C_j) without 1/sqrt(d); E_j = gamma sum_i s_ji D_i + A_j."""
    torch.manual_seed(1)
    pam = PositionAttention(16, impl=impl).double()  # type: ignore[arg-type]
    _randomize_gamma(pam)
    x = torch.randn(1, 16, 3, 4, dtype=torch.float64)
    n = 12
    a = x[0].reshape(16, n)  # (C, N)
    b = pam.query.weight[:, :, 0, 0] @ a + pam.query.bias[:, None]  # (C', N)
    c = pam.key.weight[:, :, 0, 0] @ a + pam.key.bias[:, None]  # (C', N)
    d = pam.value.weight[:, :, 0, 0] @ a + pam.value.bias[:, None]  # (C, N)
    expected = torch.empty(16, n, dtype=torch.float64)
    for j in range(n):  # output position j attends over all positions i
        s = torch.softmax(torch.stack([b[:, j] @ c[:, i] for i in range(n)]), dim=0)
        expected[:, j] = 0.7 * sum(s[i] * d[:, i] for i in range(n)) + a[:, j]
    torch.testing.assert_close(pam(x)[0].reshape(16, n), expected)


def test_cam_matches_official_formula() -> None:
    """Eq. 3-4 in the official code's form: softmax(max(XX^T) - XX^T), E = gamma (S X) + A."""
    torch.manual_seed(2)
    cam = ChannelAttention().double()
    _randomize_gamma(cam, 0.3)
    x = torch.randn(1, 6, 3, 4, dtype=torch.float64)
    a = x[0].reshape(6, 12)
    energy = a @ a.T
    expected = torch.empty_like(a)
    for j in range(6):
        row = energy[j].max() - energy[j]
        s = torch.exp(row) / torch.exp(row).sum()
        expected[j] = 0.3 * (s[:, None] * a).sum(0) + a[j]
    torch.testing.assert_close(cam(x)[0].reshape(6, 12), expected)


@pytest.mark.parametrize(("c", "ck", "n"), [(64, 8, 100), (48, 6, 37), (40, 16, 50)])
def test_dense_equals_efficient_forward_and_backward(c: int, ck: int, n: int) -> None:
    """Also when C' does not divide C (40 / 16: the value heads are zero-padded)."""
    torch.manual_seed(3)
    q = torch.randn(2, ck, n, requires_grad=True)
    k = torch.randn(2, ck, n, requires_grad=True)
    v = torch.randn(2, c, n, requires_grad=True)
    grad = torch.randn(2, c, n)
    dense = dense_position_attention(q, k, v)
    (gq, gk, gv) = torch.autograd.grad(dense, (q, k, v), grad)
    eff = efficient_position_attention(q, k, v)
    (eq, ek, ev) = torch.autograd.grad(eff, (q, k, v), grad)
    torch.testing.assert_close(eff, dense, rtol=1e-4, atol=1e-5)
    for a, b in ((eq, gq), (ek, gk), (ev, gv)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*(kernel not used|require the last dimension).*:UserWarning")
def test_efficient_never_falls_back_to_math_kernel() -> None:
    """The math kernel is excluded: a layout SDPA's fused kernels refuse must raise, not blow up."""
    from torch.nn.attention import sdpa_kernel

    from danet.attention import FUSED_BACKENDS

    q = torch.randn(1, 1, 64, 8)
    v_strided = torch.randn(1, 1, 8, 64).transpose(2, 3)  # last-dim stride != 1
    with pytest.raises(RuntimeError), sdpa_kernel(FUSED_BACKENDS):
        torch.nn.functional.scaled_dot_product_attention(q, q, v_strided, scale=1.0)
    # ... while our own call passes on the same sizes.
    efficient_position_attention(
        torch.randn(1, 8, 64), torch.randn(1, 8, 64), torch.randn(1, 64, 64)
    )


def test_module_dense_equals_efficient_with_parameter_gradients() -> None:
    torch.manual_seed(4)
    dense = PositionAttention(32, impl="dense")
    eff = PositionAttention(32, impl="efficient")
    eff.load_state_dict(dense.state_dict())
    for m in (dense, eff):
        _randomize_gamma(m, 0.5)
    x = torch.randn(2, 32, 9, 11)
    dense(x).square().sum().backward()
    eff(x).square().sum().backward()
    for (name, p1), (_, p2) in zip(dense.named_parameters(), eff.named_parameters(), strict=True):
        assert p1.grad is not None and p2.grad is not None, name
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_auto_picks_by_size_on_cpu() -> None:
    pam = PositionAttention(16, impl="auto")
    assert pam.resolved_impl(torch.zeros(1, 16, 8, 8)) == "dense"
    assert pam.resolved_impl(torch.zeros(1, 16, 64, 64)) == "dense"  # 64 MiB map
    assert pam.resolved_impl(torch.zeros(2, 16, 128, 128)) == "efficient"  # 2 GiB map
    with pytest.raises(ValueError, match="impl must be"):
        PositionAttention(16, impl="flash")  # type: ignore[arg-type]


# --- numerics under autocast: energies and softmaxes in fp32 --------------------------------


def relative_error(
    module: torch.nn.Module, x: torch.Tensor, part: str = "", dtype: torch.dtype = torch.bfloat16
) -> float:
    """||autocast - fp32|| / ||fp32|| of what the module adds to its input (or of ``part``)."""

    def run() -> torch.Tensor:
        out = module(x)
        return (out[part] if part else out - x).float()

    with torch.no_grad():
        reference = run()
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            got = run()
    return float((got - reference).norm() / reference.norm())


def post_relu(channels: int, size: int, device: str) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.relu(2 * torch.randn(2, channels, size, size, device=device))


HALVES = [torch.bfloat16, torch.float16]  # train.precision bf16 and fp16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("dtype", HALVES)
def test_cam_in_bf16_autocast_equals_fp32(device: str, size: int, dtype: torch.dtype) -> None:
    """The C x C energy of post-ReLU features (10^3-10^4) is computed in fp32: before, bf16 moved
    the near-hard softmax and the output by 16-44% (and fp16's range ends at 6.5e4)."""
    cam = ChannelAttention().to(device)
    _randomize_gamma(cam, 1.0)
    assert relative_error(cam, post_relu(512, size, device), dtype=dtype) < 0.01


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["dense", "efficient"])
@pytest.mark.parametrize("dtype", HALVES)
def test_pam_in_bf16_autocast_equals_fp32(device: str, impl: str, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    pam = PositionAttention(512, 64, impl=impl).to(device)  # type: ignore[arg-type]
    _randomize_gamma(pam, 1.0)
    assert relative_error(pam, post_relu(512, 24, device), dtype=dtype) < 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_danet_head_in_bf16_autocast_equals_fp32(device: str) -> None:
    from danet.head import DANetHead

    torch.manual_seed(2)
    head = DANetHead(512, 19).to(device).eval()
    for m in head.modules():
        if isinstance(m, PositionAttention | ChannelAttention):
            _randomize_gamma(m, 1.0)
    assert relative_error(head, post_relu(512, 32, device), part="out") < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_equals_efficient_on_gpu(dtype: torch.dtype) -> None:
    """fp32 takes the single-head memory-efficient form, bf16 the per-head flash form."""
    torch.manual_seed(5)
    q, k = (torch.randn(2, 64, 1024, device="cuda") / 4 for _ in range(2))
    v = torch.randn(2, 512, 1024, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = dense_position_attention(q, k, v)  # fp32
    got = efficient_position_attention(q.to(dtype), k.to(dtype), v.to(dtype)).float()
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, reference, rtol=tolerance, atol=tolerance)
