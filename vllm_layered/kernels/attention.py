"""Block-diagonal attention over packed variable-length sequences, and the backend dispatcher.

Q, K, V: [S_total, H, D]; sequence b owns rows cu_seqlens[b]:cu_seqlens[b + 1] (its text tokens, then
its image tokens) and attends only to itself. No padding, no mask tensor.

Backends:
- "triton": `varlen_attention`, a flash-attention forward (online softmax, fp32 accumulation) whose
  programs each own one (query block, head, sequence) and loop over that sequence's keys only.
- "sdpa": torch SDPA per run of equal-length sequences, with no mask so that cuDNN/flash can be chosen;
  "sdpa:cudnn", "sdpa:flash", "sdpa:efficient", "sdpa:math" pin SDPA's kernel.
- "flex": FlexAttention with a block-diagonal BlockMask (compiled on CUDA).
- "auto": "sdpa" on the CPU; on CUDA the backend recorded by `set_attention_backend` for the device and
  shape bucket (from measurements), overridden by the env var VLLM_LAYERED_ATTENTION; "sdpa" otherwise.
"""

import contextlib
import functools
import math
import numbers
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vllm_layered.kernels.triton_utils import (
    check_one_device,
    interpreting,
    last_dim_contiguous,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "HEAD_DIMS",
    "attention",
    "attention_shape_bucket",
    "check_seq_bounds",
    "clear_attention_backends",
    "flex_attention_available",
    "flex_varlen_attention",
    "resolve_attention_backend",
    "sdpa_varlen_attention",
    "set_attention_backend",
    "softmax_scale",
    "varlen_attention",
    "varlen_attention_ref",
]

ENV_VAR = "VLLM_LAYERED_ATTENTION"
HEAD_DIMS = (32, 64, 128)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_LOG2E = 1.4426950408889634
_SDPA_KERNELS = ("cudnn", "flash", "efficient", "math")
BACKENDS = ("triton", "sdpa", "flex", *(f"sdpa:{kernel}" for kernel in _SDPA_KERNELS))


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  #
    K_seq, V_seq, stride_ks, stride_vs,  #
    lo, hi, seqlen, qk_scale,  #
    offs_n, offs_d,  #
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    # K_seq, V_seq point at this sequence's first token, this head. Keys lo..hi; MASKED: hi may
    # exceed seqlen (the last, partial block), so out-of-range keys are not read and get p = 0.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = K_seq + cols[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = V_seq + cols[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=cols[None, :] < seqlen, other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, k, input_precision=PRECISION)
        if MASKED:
            qk = tl.where(cols[None, :] < seqlen, qk, float("-inf"))
        # online softmax in base 2: qk_scale = softmax scale * log2(e)
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=cols[:, None] < seqlen, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


def keep(conf) -> bool:
    """Prune autotune configs: one small tile under the interpreter; on GPUs 8 warps only for 128 x 128."""
    block_m, block_n = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    if interpreting():  # every program runs in Python: fewer, smaller tiles and no tuning
        return (block_m, block_n, conf.num_stages, conf.num_warps) == (16, 16, 1, 4)
    if block_m == 16 or block_n == 16 or conf.num_stages == 1:
        return False
    return not (block_m * block_n < 128 * 128 and conf.num_warps == 8)


_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
    for bm in (16, 64, 128)
    for bn in (16, 32, 64, 128)
    for s in (1, 2, 3, 4)
    for w in (4, 8)
]


@triton.autotune(configs=[c for c in _CONFIGS if keep(c)], key=["HEAD_DIM"])
@triton.jit
def _varlen_attn_fwd_kernel(
    Q, K, V, Out, CU_SEQLENS, qk_scale,  #
    stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_os, stride_oh,  #
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (query blocks of the longest sequence, heads, sequences); q, k, v, o: [S_total, H, D]
    start_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + off_b)
    seqlen = (tl.load(CU_SEQLENS + off_b + 1) - seq_start).to(tl.int32)
    if start_m * BLOCK_M >= seqlen:
        return
    seq_start = seq_start.to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m[:, None] < seqlen
    # q stays in registers for the whole key loop
    q_ptrs = Q + seq_start * stride_qs + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask, other=0.0)
    K_seq = K + seq_start * stride_ks + off_h * stride_kh
    V_seq = V + seq_start * stride_vs + off_h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end = (seqlen // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_seq, V_seq, stride_ks, stride_vs,  #
        0, full_end, seqlen, qk_scale, offs_n, offs_d,  #
        BLOCK_N, False, PRECISION,
    )
    if full_end < seqlen:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_seq, V_seq, stride_ks, stride_vs,  #
            full_end, seqlen, seqlen, qk_scale, offs_n, offs_d,  #
            BLOCK_N, True, PRECISION,
        )
    acc = acc / l_i[:, None]
    o_ptrs = Out + seq_start * stride_os + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_mask)


# ----------------------------------------------------------------------------------------------------
# Wrappers and references
# ----------------------------------------------------------------------------------------------------

def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [S_total, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a float16/bfloat16/float32 dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in _INDEX_DTYPES:
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [B + 1], got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    check_one_device("q", q, k, v, cu_seqlens)


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: ``scale``, checked, or 1 / sqrt(head_dim) when None."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return float(scale)


def _seq_bounds(cu_seqlens: torch.Tensor, total: int, bounds: Sequence[int] | None = None) -> list[int]:
    """cu_seqlens on the host, checked. Reading it from the device syncs: callers that know the bounds
    on the host (the transformer builds them there) pass them as ``bounds``."""
    return check_seq_bounds(cu_seqlens.tolist() if bounds is None else bounds, total)


def check_seq_bounds(bounds: Sequence[int], total: int) -> list[int]:
    """Host sequence bounds (cu_seqlens as integers), checked: they rise from 0 to S_total."""
    bounds = list(bounds)
    if not bounds or bounds[0] != 0 or bounds[-1] != total or any(b > e for b, e in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to S_total = {total}, got {bounds}")
    return bounds


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton flash attention over packed sequences; returns [S_total, H, D] in q's dtype.

    max_seqlen must be >= the longest sequence (rows of longer ones would not be computed); like
    cu_seqlens' contents it is not checked, so the call never syncs with the device.
    Strided q/k/v (e.g. views of one fused QKV buffer) are read in place if D is contiguous.
    """
    require_triton("varlen_attention")
    _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    total, num_heads, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {head_dim}")
    qk_scale = softmax_scale(scale, head_dim) * _LOG2E
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    cu_seqlens = cu_seqlens.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError("out must be like q and contiguous over D")
    num_seqs = cu_seqlens.numel() - 1
    if total == 0 or num_seqs == 0 or max_seqlen == 0:
        return out

    def grid(meta):
        return triton.cdiv(max_seqlen, meta["BLOCK_M"]), num_heads, num_seqs

    _varlen_attn_fwd_kernel[grid](
        q, k, v, out, cu_seqlens, qk_scale,  #
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),  #
        out.stride(0), out.stride(1),  #
        HEAD_DIM=head_dim,
        # fp32 inputs get exact fp32 products (tf32 would miss the fp32 tolerance); ignored for 16-bit
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference: one torch SDPA call per sequence (max_seqlen is accepted for the same signature)."""
    _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    scale = softmax_scale(scale, q.shape[-1])
    out = torch.empty_like(q)
    bounds = _seq_bounds(cu_seqlens, q.shape[0])
    for start, end in zip(bounds[:-1], bounds[1:]):
        seq = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out[start:end] = F.scaled_dot_product_attention(*seq, scale=scale)[0].transpose(0, 1)
    return out


def sdpa_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    sdpa_kernel: str | None = None,
    bounds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Torch SDPA, one call per run of consecutive equal-length sequences (CFG pairs become one batched
    call), no mask. sdpa_kernel pins SDPA's implementation: "cudnn", "flash", "efficient" or "math"."""
    _check_inputs(q, k, v, cu_seqlens, q.shape[0])
    scale = softmax_scale(scale, q.shape[-1])
    total, num_heads, head_dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    bounds = _seq_bounds(cu_seqlens, total, bounds)
    with _sdpa_context(sdpa_kernel):
        start = 0
        while start < len(bounds) - 1:
            length = bounds[start + 1] - bounds[start]
            stop = start + 1
            while stop < len(bounds) - 1 and bounds[stop + 1] - bounds[stop] == length:
                stop += 1
            rows = slice(bounds[start], bounds[stop])
            if length:
                shape = (stop - start, length, num_heads, head_dim)  # [G, L, H, D] -> SDPA's [G, H, L, D]
                seq = [t[rows].reshape(shape).transpose(1, 2) for t in (q, k, v)]
                o = F.scaled_dot_product_attention(*seq, scale=scale)
                out[rows].view(shape).copy_(o.transpose(1, 2))
            start = stop
    return out


def _sdpa_context(kernel: str | None):
    if kernel is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    choices = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if kernel not in choices:
        raise ValueError(f"unknown SDPA kernel {kernel!r}; choose from {sorted(choices)}")
    return sdpa_kernel([choices[kernel]])


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=8)
def _flex_block_mask(bounds: tuple[int, ...], device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    total = bounds[-1]
    lengths = torch.tensor([e - b for b, e in zip(bounds[:-1], bounds[1:])], device=device)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=total)

    def same_sequence(b, h, q_idx, kv_idx):
        return seg[q_idx] == seg[kv_idx]

    return create_block_mask(same_sequence, None, None, total, total, device=device)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """FlexAttention over the whole packed batch with a block-diagonal BlockMask (cached per layout)."""
    _check_inputs(q, k, v, cu_seqlens, q.shape[0])
    if not flex_attention_available():
        raise RuntimeError("this torch build has no FlexAttention; use backend 'sdpa' or 'triton'")
    from torch.nn.attention.flex_attention import flex_attention

    scale = softmax_scale(scale, q.shape[-1])
    bounds = tuple(_seq_bounds(cu_seqlens, q.shape[0]))
    if q.shape[0] == 0:
        return torch.empty_like(q)
    block_mask = _flex_block_mask(bounds, q.device)
    fn = _compiled_flex_attention() if q.is_cuda else flex_attention
    o = fn(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=block_mask, scale=scale)
    return o[0].transpose(0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------------

# (device name or "*", shape bucket or None) -> backend; filled from measurements at start-up.
_measured_backends: dict[tuple[str, tuple[int, int, int] | None], str] = {}


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {('auto', *BACKENDS)}")
    return backend


def attention_shape_bucket(num_heads: int, head_dim: int, max_seqlen: int) -> tuple[int, int, int]:
    """(heads, head dim, max_seqlen rounded up to a power of two): the key measurements are stored under."""
    return num_heads, head_dim, next_power_of_2(max_seqlen)


def set_attention_backend(
    backend: str, *, device_name: str | None = None, bucket: tuple[int, int, int] | None = None
) -> None:
    """Record the backend that measured fastest, for one CUDA device name (as torch.cuda.get_device_name
    reports it; None = any device) and one shape bucket (None = any shape). Set at start-up."""
    _measured_backends[(device_name or "*", bucket)] = _check_backend(backend)


def clear_attention_backends() -> None:
    _measured_backends.clear()


def resolve_attention_backend(
    device: torch.device | str, num_heads: int, head_dim: int, max_seqlen: int
) -> str:
    """The backend "auto" stands for: env var, then the most specific measurement, then "sdpa"."""
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa"
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced and forced != "auto":
        return _check_backend(forced)
    name = torch.cuda.get_device_name(device)
    bucket = attention_shape_bucket(num_heads, head_dim, max_seqlen)
    for key in ((name, bucket), (name, None), ("*", bucket), ("*", None)):
        if key in _measured_backends:
            return _measured_backends[key]
    return "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    backend: str = "auto",
    scale: float | None = None,
    bounds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Block-diagonal attention over packed sequences [S_total, H, D] with the chosen backend.

    ``bounds``: cu_seqlens as host integers, if the caller has them (saves a device sync)."""
    if backend == "auto":
        _check_inputs(q, k, v, cu_seqlens, max_seqlen)
        backend = resolve_attention_backend(q.device, q.shape[1], q.shape[2], max_seqlen)
    backend = _check_backend(backend)
    if backend == "triton":
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    if backend == "flex":
        return flex_varlen_attention(q, k, v, cu_seqlens, scale=scale)
    _, _, kernel = backend.partition(":")
    return sdpa_varlen_attention(q, k, v, cu_seqlens, scale=scale, sdpa_kernel=kernel or None, bounds=bounds)
