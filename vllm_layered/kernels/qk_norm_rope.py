"""Fused per-head RMSNorm + rotary embedding on adjacent pairs, for Q and K of the MMDiT.

One program per token and group of heads: it reads those H x D values once, normalises every head over D, rotates
pairs (2k, 2k+1) by the token's angles and writes the row once, optionally to another row of a larger
buffer (`out[out_rows[i]]`), which is how text and image rows land in the joint attention buffer.

Rounding follows the eager path (diffusers' RMSNorm, then Qwen-Image's complex RoPE):
    y = x * rsqrt(mean(x^2) + eps)        fp32
    y = bf16(y) * w  (rounded)            only when w is fp16/bf16; fp32 product otherwise
    (a, b) -> (a cos - b sin, a sin + b cos)   fp32, then cast to x.dtype

With ``out_scale`` the row is written as e4m3 instead, for FP8 attention: e4m3(clamp(y * (1 / out_scale), +-448))
from the fp32 rotation (no bf16 rounding in between); dequantized values are q * out_scale. The scale is static
(kernels/fp8_attention.qk_scale explains why one derived from the norm weights can never overflow).
"""

import math

import torch

from vllm_layered.kernels.fp8 import FP8_DTYPE, FP8_MAX, quantize_with_scale_ref
from vllm_layered.kernels.triton_utils import (
    check_one_device,
    last_dim_contiguous,
    require_triton,
    row_output,
    row_settings,
    tl,
    triton,
)

__all__ = ["qk_norm_rope", "qk_norm_rope_ref"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _qk_norm_rope_kernel(
    X, W, COS, SIN, OUT, OUT_ROWS,  #
    stride_xn, stride_xh, stride_on, stride_oh, stride_cn, stride_sn,  #
    eps, inv_out_scale,  #
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,  #
    W_IS_HALF: tl.constexpr, HAS_OUT_ROWS: tl.constexpr, FP8_OUT: tl.constexpr, FP8_MAX: tl.constexpr,
):
    # x: [N, H, D] (stride 1 over D); cos, sin: [N, D // 2] fp32; out: [M, H, D] (stride 1 over D).
    # grid: (N, H // BLOCK_H); BLOCK_H divides H, so no head mask.
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)

    x = tl.load(X + row * stride_xn + offs_h[:, None] * stride_xh + offs_d[None, :]).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
    y = x * rstd[:, None]
    w = tl.load(W + offs_d)
    if W_IS_HALF:
        # diffusers rounds the normalised value to the weight dtype and multiplies in that dtype
        y = (y.to(w.dtype).to(tl.float32) * w.to(tl.float32)).to(w.dtype).to(tl.float32)
    else:
        y = y * w.to(tl.float32)

    # rotate adjacent pairs (a, b) = (y[2k], y[2k + 1]) by the token's angle k
    a, b = tl.split(tl.reshape(y, [BLOCK_H, HEAD_DIM // 2, 2]))
    offs_k = tl.arange(0, HEAD_DIM // 2)
    cos = tl.load(COS + row * stride_cn + offs_k)[None, :]
    sin = tl.load(SIN + row * stride_sn + offs_k)[None, :]
    y = tl.reshape(tl.join(a * cos - b * sin, a * sin + b * cos), [BLOCK_H, HEAD_DIM])
    if FP8_OUT:  # e4m3 with a static scale: out = y / out_scale, saturated (fp8.quantize_with_scale_ref)
        y = tl.clamp(y * inv_out_scale, -FP8_MAX, FP8_MAX)

    if HAS_OUT_ROWS:
        dst = tl.load(OUT_ROWS + row).to(tl.int64)
    else:
        dst = row
    out_ptrs = OUT + dst * stride_on + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, y.to(OUT.dtype.element_ty))


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: torch.Tensor | None,
    out_rows: torch.Tensor | None,
    out_scale: float | None,
) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [N, H, D], got shape {tuple(x.shape)}")
    n, h, d = x.shape
    if d % 2:
        raise ValueError(f"head dim must be even for rotary pairs, got {d}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if weight.shape != (d,) or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be a float tensor of shape ({d},), got {weight.dtype} {tuple(weight.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (n, d // 2):
            raise ValueError(f"{name} must be [N, D // 2] = {(n, d // 2)}, got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
    if out_rows is not None:
        if out is None:
            raise ValueError("out_rows needs out: the rows index into a caller-provided buffer")
        if out_rows.shape != (n,) or out_rows.dtype not in _INDEX_DTYPES:
            raise ValueError(f"out_rows must be int32/int64 of shape ({n},), got {out_rows.dtype} "
                             f"{tuple(out_rows.shape)}")
    if out is not None:
        if out.dim() != 3 or out.shape[1:] != (h, d):
            raise ValueError(f"out must be [M, {h}, {d}], got {tuple(out.shape)}")
        if out_rows is None and out.shape[0] != n:
            raise ValueError(f"without out_rows, out must have N = {n} rows, got {out.shape[0]}")
        out_dtype = x.dtype if out_scale is None else FP8_DTYPE
        if out.dtype != out_dtype:
            raise ValueError(f"out must be {out_dtype} (x's dtype, or e4m3 with out_scale), got {out.dtype}")
    if out_scale is not None and not (isinstance(out_scale, float) and math.isfinite(out_scale) and out_scale > 0):
        raise ValueError(f"out_scale must be a positive finite float, got {out_scale!r}")
    check_one_device("x", x, weight, cos, sin, out, out_rows)


def _heads_per_program(num_heads: int, head_dim: int) -> int:
    """The largest power of two dividing H with at most 2048 elements per program (24 heads x 128 -> 8):
    programs hold whole heads and no lane is masked."""
    block = num_heads & -num_heads
    while block > 1 and block * head_dim > 2048:
        block //= 2
    return block


def qk_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    out_scale: float | None = None,
) -> torch.Tensor:
    """RMSNorm over D then RoPE on adjacent pairs, fused; returns out (or a new [N, H, D] tensor).

    x: [N, H, D] (strided rows and heads are read in place); weight: [D]; cos, sin: [N, D // 2] fp32.
    With out_rows, row i is written to out[out_rows[i]]; the indices are not checked on the device.
    With out_scale (a float, best a power of two), out is e4m3: values y / out_scale, saturated at +-448.
    """
    require_triton("qk_norm_rope")
    _check_inputs(x, weight, cos, sin, out, out_rows, out_scale)
    n, h, d = x.shape
    if d & (d - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two head dim, got {d}")
    x = last_dim_contiguous(x)
    weight, cos, sin = weight.contiguous(), cos.contiguous(), sin.contiguous()
    out = row_output(out, x, "the head dim", dtype=None if out_scale is None else FP8_DTYPE)
    if out_rows is not None:
        out_rows = out_rows.contiguous()
    if n == 0:
        return out
    block_h = _heads_per_program(h, d)
    _, num_warps = row_settings(block_h * d)
    _qk_norm_rope_kernel[(n, h // block_h)](
        x, weight, cos, sin, out, out_rows if out_rows is not None else x,  #
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0), sin.stride(0),  #
        eps, 1.0 if out_scale is None else 1.0 / out_scale,  #
        HEAD_DIM=d, BLOCK_H=block_h,  #
        W_IS_HALF=weight.dtype in _HALF_DTYPES, HAS_OUT_ROWS=out_rows is not None,  #
        FP8_OUT=out_scale is not None, FP8_MAX=FP8_MAX,  #
        num_warps=num_warps,
    )
    return out


def qk_norm_rope_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    out_scale: float | None = None,
) -> torch.Tensor:
    """Eager PyTorch version of `qk_norm_rope` (same arguments, same rounding)."""
    _check_inputs(x, weight, cos, sin, out, out_rows, out_scale)
    n, h, d = x.shape
    y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in _HALF_DTYPES:
        y = y.to(weight.dtype)
    y = y * weight
    pairs = torch.view_as_complex(y.float().reshape(n, h, d // 2, 2))
    y = torch.view_as_real(pairs * torch.complex(cos, sin)[:, None, :]).flatten(2)
    y = y.to(x.dtype) if out_scale is None else quantize_with_scale_ref(y, out_scale)
    if out is None:
        return y
    if out_rows is None:
        out.copy_(y)
    else:
        out[out_rows.long()] = y
    return out
