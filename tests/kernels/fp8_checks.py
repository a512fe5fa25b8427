"""Checks shared by the tests of kernels that quantize to FP8 (fp8.quantize_rows, adaln.layernorm_modulate_fp8)."""

import torch

from vllm_layered.kernels.fp8 import FP8_DTYPE

E4M3_HALF_ULP = 2.0**-4  # relative rounding error of a normal e4m3 value (3 mantissa bits)
E4M3_SUBNORMAL_STEP = 2.0**-9  # spacing of e4m3 subnormals, in units of the row's scale


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def rows_with_spread(m: int, k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Rows whose magnitudes span 6 decades (more than e4m3's range), with outliers: one scale for all rows
    would crush the small ones to zero."""
    x = torch.randn(m, k) * torch.logspace(-3, 3, m)[torch.randperm(m)][:, None]
    x[:, :: max(1, k // 7)] *= 8
    return x.to(dtype).to(device)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def assert_same_quantization(q, scale, q_ref, scale_ref, *, exact: bool) -> None:
    """Bit-exact where the arithmetic is IEEE (interpreter); on a GPU a 1-ulp difference in a division may flip
    an e4m3 rounding now and then: allow 0.1% of values one e4m3 step apart."""
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert q.shape == q_ref.shape and scale.shape == scale_ref.shape
    if exact:
        assert torch.equal(scale, scale_ref)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        return
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    differ = q.view(torch.uint8) != q_ref.view(torch.uint8)
    assert differ.float().mean().item() <= 1e-3
    assert (q.float() - q_ref.float()).abs().le(q_ref.float().abs() * 2 * E4M3_HALF_ULP + 2**-9).all()
