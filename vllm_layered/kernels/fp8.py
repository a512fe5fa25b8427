"""FP8 (e4m3) pieces of the quantized linears: dynamic per-row activation quantization and the scaled GEMM.

Activations are quantized per row (per token) at run time, weights per output channel once at load time, both
with the same rule:
    scale[m] = max(amax(|x[m, :]|), eps) / 448                  float32
    q[m, :]  = e4m3(clamp(x[m, :] * (1 / scale[m]), -448, 448))   round to nearest even
so dequantized values are q * scale and the largest |x| of a row lands on the largest e4m3 value.

`quantize_rows` is one Triton pass per row (load, amax, scale, cast, store); with ``gelu=True`` it first applies
GELU(tanh) and rounds to x's dtype, as the unfused path stores the activation, so the MLP's hidden activation
is read once instead of twice. `fp8_gemm` wraps ``torch._scaled_mm`` with row-wise scales (sm89+: CUTLASS or
cuBLASLt): out = (q_x @ q_w.T) * scale_x[:, None] * scale_w[None, :] + bias, written in bf16. The references
compute the same math in float32 on any device.
"""

import torch
import torch.nn.functional as F

from vllm_layered.kernels.triton_utils import (
    check_one_device,
    chunks_max_abs,
    fast_exp2,
    fast_reciprocal,
    interpreting,
    last_dim_contiguous,
    load_row_chunks,
    require_triton,
    row_chunks,
    store_row_chunks,
    tl,
    triton,
)

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "SCALE_EPS", "fp8_gemm", "fp8_gemm_ref", "quantize_rows", "quantize_rows_ref",
    "quantize_with_scale_ref", "store_quantized_row",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_EPS = 1e-12  # floor of a row's amax: an all-zero row gets a tiny scale instead of 0 / 0
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Fast accumulation only where it pays: a GEMM of few rows (the text stream) reads weights, not sums. Below this
# it would also fail: cuBLASLt 13.0 on an H200 has no kernel for fast accumulation + bias + row-wise scales at
# K=12288, N=3072 for M <= 42 (CUBLAS_STATUS_NOT_SUPPORTED; every M works without one of the three).
FAST_ACCUM_MIN_ROWS = 128


@triton.jit
def store_quantized_row(Q, xs, n_cols, eps, FP8_MAX: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
    """Quantizes one row held as float32 chunks (triton_utils.load_row_chunks) by the module docstring's rule,
    stores its e4m3 codes at ``Q`` and returns its scale. The divisions are IEEE, as in the reference. No clamp is
    needed: |x| * (1 / scale) <= 448 (1 + 2^-23)^3, which rounds to 448. Shared with the kernels that quantize their
    own output (adaln, fp8_attention.restore_mean)."""
    scale = tl.math.div_rn(tl.maximum(chunks_max_abs(xs, N_CHUNKS), eps), FP8_MAX)
    inv_scale = tl.math.div_rn(1.0, scale)
    qs = ()
    for i in tl.static_range(N_CHUNKS):
        qs = qs + (xs[i] * inv_scale,)
    store_row_chunks(Q, qs, n_cols, CHUNK, N_CHUNKS)
    return scale


@triton.jit
def _gelu_tanh(x, FAST: tl.constexpr):
    # 0.5 x (1 + tanh(u)) == x / (1 + exp(-2u)), u = sqrt(2 / pi) (x + 0.044715 x^3), written as
    # x / (1 + 2^(x (c1 + c2 x^2))) with c1 = -2 sqrt(2 / pi) log2(e), c2 = 0.044715 c1 folded: 7 instructions per
    # element with FAST, 2 of them MUFU
    return x * fast_reciprocal(1.0 + fast_exp2(x * (-2.302208198144325 + -0.1029432395800235 * (x * x)), FAST), FAST)


@triton.jit
def _quantize_rows_kernel(
    X, Q, SCALE,  #
    stride_xm, stride_qm,  #
    n_cols, eps,  #
    FP8_MAX: tl.constexpr, GELU: tl.constexpr, FAST: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
):
    # x: [M, K] (stride 1 over K); q: [M, K] e4m3; scale: [M] fp32. One program per row, held as N_CHUNKS chunks.
    row = tl.program_id(0).to(tl.int64)
    xs = load_row_chunks(X + row * stride_xm, n_cols, CHUNK, N_CHUNKS)
    if GELU:  # rounded to x's dtype like the stored activation (gelu(0) = 0 keeps masked lanes out of the amax)
        activated = ()
        for i in tl.static_range(N_CHUNKS):
            activated = activated + (_gelu_tanh(xs[i], FAST).to(X.dtype.element_ty).to(tl.float32),)
        xs = activated
    tl.store(SCALE + row, store_quantized_row(Q + row * stride_qm, xs, n_cols, eps, FP8_MAX, CHUNK, N_CHUNKS))


def _check_rows(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("x must have at least one column")


def quantize_rows(
    x: torch.Tensor, *, gelu: bool = False, eps: float = SCALE_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of x [M, K] (strided rows are read in place): (q [M, K] contiguous, scale [M]
    float32). With ``gelu``, quantizes GELU(tanh)(x) instead."""
    require_triton("quantize_rows")
    _check_rows(x)
    x = last_dim_contiguous(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    chunk, n_chunks, num_warps = row_chunks(k)
    _quantize_rows_kernel[(m,)](
        x, q, scale,  #
        x.stride(0), q.stride(0),  #
        k, eps,  #
        FP8_MAX=FP8_MAX, GELU=gelu, FAST=not interpreting(), CHUNK=chunk, N_CHUNKS=n_chunks, num_warps=num_warps,
    )
    return q, scale


def quantize_rows_ref(
    x: torch.Tensor, *, gelu: bool = False, eps: float = SCALE_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch version of `quantize_rows` (same arguments, same math); also quantizes weights [N, K] per channel."""
    _check_rows(x)
    if gelu:
        x = F.gelu(x, approximate="tanh")
    x = x.float()
    amax = x.abs().amax(dim=1).clamp(min=eps)
    # tensor / tensor: IEEE division on every device (CUDA torch multiplies by the reciprocal of a Python scalar,
    # which moves a scale by an ulp now and then, and with it e4m3 ties of x * (1 / scale))
    scale = amax / torch.full_like(amax, FP8_MAX)
    q = (x * (torch.ones_like(scale) / scale)[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_with_scale_ref(x: torch.Tensor, scale: float) -> torch.Tensor:
    """e4m3 of x with one given scale (dequantized values are q * scale): e4m3(clamp(x * (1 / scale), +-448)), the
    rule of the kernels that quantize with a static scale (qk_norm_rope's e4m3 output). A power-of-two scale makes
    the multiplication exact, so kernel and reference agree bit for bit."""
    return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _check_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
) -> None:
    if xq.dim() != 2 or wq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"xq [M, K] and wq [N, K] do not match: {tuple(xq.shape)} and {tuple(wq.shape)}")
    if xq.dtype != FP8_DTYPE or wq.dtype != FP8_DTYPE:
        raise ValueError(f"xq and wq must be {FP8_DTYPE}, got {xq.dtype} and {wq.dtype}")
    (m, _), (n, _) = xq.shape, wq.shape
    for name, scale, rows in (("x_scale", x_scale, m), ("w_scale", w_scale, n)):
        if scale.shape != (rows,) or scale.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 of shape ({rows},), got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if out is not None and (out.shape != (m, n) or out.dtype != out_dtype):
        raise ValueError(f"out must be {out_dtype} of shape {(m, n)}, got {out.dtype} {tuple(out.shape)}")
    check_one_device("xq", xq, x_scale, wq, w_scale, bias, out)


def fp8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    fast_accum: bool = False,
) -> torch.Tensor:
    """(xq @ wq.T) * x_scale[:, None] * w_scale[None, :] + bias on CUDA (sm89+), through torch._scaled_mm.

    xq: [M, K] e4m3, row-major; wq: [N, K] e4m3 (its transpose is the column-major operand _scaled_mm wants);
    K and N multiples of 16; bias in out_dtype (bf16 with a bf16 output). ``out`` may be a row slice of a larger
    contiguous buffer. ``fast_accum`` lets the tensor cores accumulate in reduced precision (faster, less exact);
    it is used from `FAST_ACCUM_MIN_ROWS` rows on.
    """
    _check_gemm(xq, x_scale, wq, w_scale, bias, out_dtype, out)
    return torch._scaled_mm(
        xq, wq.t(), scale_a=x_scale.view(-1, 1), scale_b=w_scale.view(1, -1), bias=bias,
        out_dtype=out_dtype, use_fast_accum=fast_accum and xq.shape[0] >= FAST_ACCUM_MIN_ROWS, out=out,
    )


def fp8_gemm_ref(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    fast_accum: bool = False,
) -> torch.Tensor:
    """Float32 version of `fp8_gemm` on any device (``fast_accum`` is accepted and ignored)."""
    _check_gemm(xq, x_scale, wq, w_scale, bias, out_dtype, out)
    y = (xq.float() @ wq.float().t()) * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    y = y.to(out_dtype)
    return y if out is None else out.copy_(y)
