"""The quantization math of FP8 (e4m3) attention: the scales of Q, K, V and O, the kernels that center and quantize
V and restore O's mean, and a plain PyTorch reference of each and of the whole quantized attention.

cuDNN's FP8 attention (kernels/cudnn_fp8_attention.py) takes e4m3 Q, K, V with one dequantization factor each
(per tensor and call: real value = code * scale) and writes e4m3 O after multiplying it by ``scale_o``. Where each
scale comes from, and why none of them needs a pass over the data except V's:

- Q and K: static, per layer, from the QK RMSNorm weights (`qk_scale`). After RMSNorm every element is bounded by
  sqrt(D) * max|w|, and RoPE rotates pairs without changing their norm, so that bound holds after RoPE too: the
  scale maps it to 448 and nothing can overflow. The QK-norm + RoPE kernel writes e4m3 directly
  (qk_norm_rope's ``out_scale``); no amax pass, no bf16 copy of Q and K.
- V: dynamic, per sequence, from amax(V) over the sequence's rows (`sequence_stats`: one pass over V for amax and
  the mean below; `quantize_v` then writes e4m3 V). Per sequence rather than per packed batch so that a sequence's
  result does not depend on what it is packed with (the serving engine packs requests that the offline pipeline
  runs alone).
- V centered (what the model runs): the per-sequence mean over V's rows is subtracted before quantization and
  added back to O afterwards (`restore_mean`, which quantizes O's rows for the output projections). The softmax
  weights of a row sum to 1, so attention(V - mean) + mean = attention(V) exactly. Why: in the model V has a large
  component shared by every token (there, O's rms was 0.48-0.95 of V's), so every P v term has the same sign, and
  cuDNN's FP8 kernel loses that sum's precision as the sequence grows: on the model's own Q, K, V its output was
  11-18% off float32 attention at 9800 tokens and 23-39% at 24776, against 0.15-0.66% with V centered
  (benchmarks/attention_fp8.py section h, benchmarks/RESULTS.md). |v - mean| <= 2 amax(V), so V's scale comes
  from `V_CENTERED_BOUND` * amax(V) without a pass over the centered values; e4m3 keeps its relative precision
  under a loose scale (see below).
- O: static given V's: O = softmax(S) V is a convex combination of V's rows, so |O| <= amax(V) and
  ``scale_o = 448 / (amax(V) * O_HEADROOM)`` needs no pass over O either. The headroom covers cuDNN's FP8 recipe,
  where the probabilities P are rounded to e4m3 (relative error <= 2^-4 for normal values, a half-step of the
  subnormals below) while the row sum uses fp32 P, so the rounded weights can sum to slightly more than 1. If it
  were ever exceeded the e4m3 conversion saturates at 448 (PTX has only the saturating cvt to e4m3): never inf/NaN.
  Without centering, the attention output with these scales could feed the FP8 output projections as is (row
  scales: each row's sequence's 1 / scale_o); with it, `restore_mean` reads O once, adds the mean and writes the
  projections' e4m3 rows: one pass over O, e4m3 in and out.

e4m3 is a float format (3 mantissa bits over exponents 2^-6..2^8, subnormals to 2^-9): scaling to a bound rather
than to the exact amax keeps every value's relative precision and only moves the underflow threshold, which the
~2^18 dynamic range absorbs (see `qk_scale`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_layered.kernels.attention import check_seq_bounds, softmax_scale
from vllm_layered.kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    SCALE_EPS,
    quantize_rows_ref,
    store_quantized_row,
)
from vllm_layered.kernels.triton_utils import (
    check_one_device,
    last_dim_contiguous,
    load_row_chunks,
    next_power_of_2,
    require_triton,
    row_chunks,
    row_output,
    row_settings,
    tl,
    triton,
)

__all__ = [
    "O_HEADROOM", "QK_BOUND_MARGIN", "STATS_ROWS_PER_SPLIT", "V_CENTERED_BOUND", "Fp8AttentionScales", "QuantizedV",
    "check_attention_inputs", "fp8_attention_ref", "qk_scale", "quantize_v", "quantize_v_ref", "restore_mean",
    "restore_mean_ref", "sequence_amax", "sequence_mean", "sequence_stats", "sequence_stats_ref", "sequence_sum",
    "v_amax",
]

QK_BOUND_MARGIN = 1 + 2**-6  # the bf16 roundings of the norm (<= 2^-8 relative together) and the fp32 rotation
O_HEADROOM = 1.125  # |O| / amax(V) under e4m3 probabilities: <= 1 + 2^-4 for normal P, plus subnormal rounding
V_CENTERED_BOUND = 2.0  # max |v - mean| / amax(V): |v - mean| <= |v| + |mean| <= 2 amax(V)


@dataclass(frozen=True)
class Fp8AttentionScales:
    """The factors of one FP8 attention call, float32 tensors on the device: ``q``, ``k`` one value each (the
    layer's static scales), ``v`` and ``o_inv`` one value per sequence. Dequantized q = q8 * q (likewise k, and v
    with its sequence's value); ``o_inv`` multiplies a sequence's O before its e4m3 cast (cuDNN's scale_o), so
    O ~= o8 / o_inv."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o_inv: torch.Tensor


@dataclass(frozen=True)
class QuantizedV:
    """V quantized for FP8 attention: ``data`` [N, C] e4m3; ``scale`` [B] each sequence's dequantization factor and
    ``o_inv`` [B] the O scale that follows from it (scale_o); ``o_row_scale`` [N] = 1 / o_inv of each row's
    sequence: the per-row scales of the attention output, as `restore_mean` reads it (uncentered V: as the FP8 output
    projections would)."""

    data: torch.Tensor
    scale: torch.Tensor
    o_inv: torch.Tensor
    o_row_scale: torch.Tensor


def qk_scale(weights: Sequence[torch.Tensor], head_dim: int) -> float:
    """The static e4m3 scale of Q (or K) after RMSNorm with any of ``weights`` and RoPE: a power of two s with
    sqrt(D) * max|w| * QK_BOUND_MARGIN <= 448 s.

    Why the bound holds: RMSNorm gives y_i = x_i / sqrt(mean(x^2) + eps) * w_i, and x_i^2 <= sum(x^2) = D mean(x^2),
    so |x_i| / rms(x) <= sqrt(D) and |y_i| <= sqrt(D) |w_i|. RoPE maps each pair (a, b) to a rotation of it, whose
    components are at most sqrt(a^2 + b^2) <= sqrt(D) max|w| (as a^2 + b^2 <= max(w^2) (x_a^2 + x_b^2) / rms^2 <=
    max(w^2) D). The eager path rounds y and y * w to bf16 (<= 2^-9 relative each) before the fp32 rotation: the
    margin covers that. The kernel saturates at 448 besides, so even a violated bound could not overflow.

    What it costs: typical elements are ~|w|, sqrt(D) = 11.3 (x up to 2 for the power of two) below the bound, i.e.
    they land around 448 / 23 = 20 instead of near 448; e4m3 keeps its 3 mantissa bits down to 2^-6, so only
    elements ~1000x smaller than typical (negligible in q.k) lose precision. A dynamic amax would cost a pass over
    Q and K for nothing. A power of two makes the kernel's multiplication by 1 / s exact.
    """
    if head_dim <= 0 or not weights:
        raise ValueError(f"need a positive head dim and at least one norm weight, got {head_dim}, {len(weights)}")
    amax_w = max(float(w.detach().abs().max()) for w in weights)
    bound = max(math.sqrt(head_dim) * amax_w * QK_BOUND_MARGIN, SCALE_EPS)
    mantissa, exponent = math.frexp(bound / FP8_MAX)  # bound / 448 = mantissa * 2^exponent, mantissa in [0.5, 1)
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


def v_amax(v: torch.Tensor) -> torch.Tensor:
    """max |v| as a 0-d tensor in v's dtype (0 for an empty v): one reduction pass, no |v| temporary, no host sync."""
    return torch.linalg.vector_norm(v, ord=float("inf")) if v.numel() else v.new_zeros(())


def _local_edges(n: int, bounds: Sequence[int], row_offset: int) -> list[int]:
    """The sequences' bounds within rows row_offset..row_offset + n of the joint buffer, clamped to [0, n]."""
    return [min(max(b - row_offset, 0), n) for b in bounds]


def sequence_amax(v: torch.Tensor, bounds: Sequence[int], row_offset: int = 0) -> torch.Tensor:
    """max |v| over each sequence's rows, [B] float32: v [N, C] holds rows row_offset.. of the joint buffer whose
    sequences are bounds[b]:bounds[b + 1] (a sequence-parallel rank holds a range of them: 0 for a sequence none of
    whose rows it holds). One reduction per sequence, together one pass over v."""
    edges = _local_edges(v.shape[0], bounds, row_offset)
    return torch.stack([v_amax(v[a:b]) for a, b in zip(edges[:-1], edges[1:])]).float()


def sequence_sum(v: torch.Tensor, bounds: Sequence[int], row_offset: int = 0) -> torch.Tensor:
    """Each sequence's sum over its rows (of those v holds, as `sequence_amax`), [B, C] float32, summed in float32
    without a float32 copy of v."""
    edges = _local_edges(v.shape[0], bounds, row_offset)
    return torch.stack([torch.sum(v[a:b], dim=0, dtype=torch.float32) for a, b in zip(edges[:-1], edges[1:])])


STATS_ROWS_PER_SPLIT = 512  # rows of one sequence that one program of `sequence_stats` reduces


@triton.jit
def _local_sequence(CU_SEQLENS, seq, row_offset, n_rows):
    """Rows [start, end) of sequence ``seq`` within the n_rows a buffer holds from joint row row_offset on."""
    start = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + seq).to(tl.int64) - row_offset, 0), n_rows)
    end = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + seq + 1).to(tl.int64) - row_offset, 0), n_rows)
    return start, end


@triton.jit
def _sequence_stats_partial_kernel(
    X, CU_SEQLENS, PART_SUM, PART_MAX,  #
    stride_xm, n_rows, n_cols, row_offset, n_splits,  #
    ROWS_PER_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # x: [N, C]; part_sum: [B, n_splits, C] float32; part_max: [B, n_splits, n_col_blocks] float32. Program
    # (b, split, col block) reduces rows split * ROWS_PER_SPLIT.. of sequence b over BLOCK_C columns: the split
    # points are relative to the sequence's first row, so a sequence's partials do not depend on its neighbours.
    # Splits past a shorter sequence's end write zeros that the reduction does not read.
    seq = tl.program_id(0)
    split = tl.program_id(1)
    col_block = tl.program_id(2)
    start, end = _local_sequence(CU_SEQLENS, seq, row_offset, n_rows)
    first = start + split * ROWS_PER_SPLIT
    last = tl.minimum(first + ROWS_PER_SPLIT, end)
    cols = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    total = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    amax = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r in range(first, last, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        mask = (rows < last)[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        total += x
        amax = tl.maximum(amax, tl.abs(x))
    part = seq * n_splits + split
    tl.store(PART_SUM + part * n_cols + cols, tl.sum(total, axis=0), mask=col_mask)
    tl.store(PART_MAX + part * tl.num_programs(2) + col_block, tl.max(tl.max(amax, axis=1), axis=0))


@triton.jit
def _sequence_stats_reduce_kernel(
    PART_SUM, PART_MAX, CU_SEQLENS, MEAN, AMAX,  #
    n_rows, n_cols, row_offset, n_splits, n_col_blocks,  #
    ROWS_PER_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # One program per sequence: its splits' partials added in split order (deterministic), 0 for no rows; the sum
    # divided by the whole sequence's length (of the joint buffer, not of the rows held here).
    seq = tl.program_id(0)
    start, end = _local_sequence(CU_SEQLENS, seq, row_offset, n_rows)
    length = tl.maximum(tl.load(CU_SEQLENS + seq + 1) - tl.load(CU_SEQLENS + seq), 1).to(tl.float32)
    used = tl.cdiv(end - start, ROWS_PER_SPLIT)
    blocks = tl.arange(0, BLOCK_B)
    amax = tl.zeros([BLOCK_B], dtype=tl.float32)
    for split in range(0, used):
        part = (seq * n_splits + split).to(tl.int64)
        amax = tl.maximum(amax, tl.load(PART_MAX + part * n_col_blocks + blocks, mask=blocks < n_col_blocks,
                                        other=0.0))
    tl.store(AMAX + seq, tl.max(amax, axis=0))
    for c in range(0, n_cols, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C)
        total = tl.zeros([BLOCK_C], dtype=tl.float32)
        for split in range(0, used):
            part = (seq * n_splits + split).to(tl.int64)
            total += tl.load(PART_SUM + part * n_cols + cols, mask=cols < n_cols, other=0.0)
        tl.store(MEAN + seq * n_cols + cols, total / length, mask=cols < n_cols)


def sequence_stats(
    v: torch.Tensor, bounds: Sequence[int], cu_seqlens: torch.Tensor, row_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_amax` and the mean over each sequence's rows, in one pass over v: (amax [B], mean [B, C]) float32.
    v [N, C] holds rows row_offset.. of the joint buffer whose sequence bounds are ``bounds`` (host) and
    ``cu_seqlens`` (the same on v's device). The mean divides the sum of the rows held here by the whole sequence's
    length, so a sequence-parallel group gets the mean by all-reducing these with SUM (and amax with MAX); 0 for an
    empty sequence. Each sequence's rows are reduced in fixed splits of `STATS_ROWS_PER_SPLIT` and the splits added
    in order, so the result is deterministic and does not depend on the other sequences packed beside it."""
    require_triton("sequence_stats")
    if v.dim() != 2 or v.shape[1] == 0:
        raise ValueError(f"v must be [N, C] with C > 0, got shape {tuple(v.shape)}")
    num_seqs = len(bounds) - 1
    if num_seqs < 1 or cu_seqlens.shape != (num_seqs + 1,):
        raise ValueError(f"cu_seqlens must be [B + 1] = [{num_seqs + 1}] like bounds, got {tuple(cu_seqlens.shape)}")
    check_one_device("v", v, cu_seqlens)
    v = last_dim_contiguous(v)
    n, c = v.shape
    edges = _local_edges(n, bounds, row_offset)
    longest = max(b - a for a, b in zip(edges[:-1], edges[1:]))
    n_splits = max(triton.cdiv(longest, STATS_ROWS_PER_SPLIT), 1)
    block_c = min(256, next_power_of_2(c))
    n_col_blocks = triton.cdiv(c, block_c)
    part_sum = torch.empty((num_seqs, n_splits, c), dtype=torch.float32, device=v.device)
    part_max = torch.empty((num_seqs, n_splits, n_col_blocks), dtype=torch.float32, device=v.device)
    mean = torch.empty((num_seqs, c), dtype=torch.float32, device=v.device)
    amax = torch.empty(num_seqs, dtype=torch.float32, device=v.device)
    cu_seqlens = cu_seqlens.contiguous()
    if longest > 0:
        _sequence_stats_partial_kernel[(num_seqs, n_splits, n_col_blocks)](
            v, cu_seqlens, part_sum, part_max,  #
            v.stride(0), n, c, row_offset, n_splits,  #
            ROWS_PER_SPLIT=STATS_ROWS_PER_SPLIT, BLOCK_R=16, BLOCK_C=block_c, num_warps=4,
        )
    _sequence_stats_reduce_kernel[(num_seqs,)](
        part_sum, part_max, cu_seqlens, mean, amax,  #
        n, c, row_offset, n_splits, n_col_blocks,  #
        ROWS_PER_SPLIT=STATS_ROWS_PER_SPLIT, BLOCK_C=1024, BLOCK_B=max(next_power_of_2(n_col_blocks), 2),
        num_warps=4,
    )
    return amax, mean


def sequence_stats_ref(
    v: torch.Tensor, bounds: Sequence[int], cu_seqlens: torch.Tensor, row_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch version of `sequence_stats` (same arguments): `sequence_amax`, and `sequence_mean` of `sequence_sum`."""
    check_one_device("v", v, cu_seqlens)
    return sequence_amax(v, bounds, row_offset), sequence_mean(sequence_sum(v, bounds, row_offset), cu_seqlens)


def sequence_mean(sums: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The per-sequence means [B, C] float32 from `sequence_sum` and the joint buffer's bounds (on the device: no
    host sync); 0 for an empty sequence."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=1).to(torch.float32)
    return sums / lengths[:, None]


def _scale_vector(num_seqs: int, device: torch.device) -> torch.Tensor:
    """[B] float32 with a stride of 16 bytes: every sequence's value is a 16-byte aligned one-value tensor for cuDNN."""
    return torch.empty((num_seqs, 4), dtype=torch.float32, device=device)[:, 0]


@triton.jit
def _row_sequence(CU_SEQLENS, joint_row, num_seqs, BLOCK_S: tl.constexpr):
    """The sequence that joint row ``joint_row`` belongs to (cu_seqlens: [B + 1] bounds; rows past the last
    sequence count as the last)."""
    offs_s = tl.arange(0, BLOCK_S)
    has_seq = offs_s < num_seqs
    ends = tl.load(CU_SEQLENS + 1 + offs_s, mask=has_seq, other=0).to(tl.int64)
    return tl.minimum(tl.sum((has_seq & (ends <= joint_row)).to(tl.int32), axis=0), num_seqs - 1)


@triton.jit
def _quantize_v_kernel(
    X, Q, SEQ_AMAX, MEAN, CU_SEQLENS, V_SCALE, O_INV, O_ROW_SCALE,  #
    stride_xm, stride_qm, stride_mean, stride_scale,  #
    n_cols, row_offset, num_seqs, eps,  #
    FP8_MAX: tl.constexpr, O_HEADROOM: tl.constexpr, BOUND: tl.constexpr, CENTER: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # x: [N, C] (stride 1 over C), joint rows row_offset..; q: [N, C] e4m3; seq_amax: [B] float32; mean: [B, C]
    # float32 (read when CENTER); cu_seqlens: [B + 1] the joint buffer's sequence bounds; v_scale, o_inv: [B]
    # (stride_scale); o_row_scale: [N]. One program per row; program 0 also writes every sequence's scales.
    row = tl.program_id(0).to(tl.int64)
    seq = _row_sequence(CU_SEQLENS, row_offset + row, num_seqs, BLOCK_S)
    bound = tl.maximum(tl.load(SEQ_AMAX + seq), eps) * BOUND
    cols = tl.arange(0, BLOCK_K)
    mask = cols < n_cols
    x = tl.load(X + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if CENTER:
        x = x - tl.load(MEAN + seq * stride_mean + cols, mask=mask, other=0.0)
    q = tl.clamp(x * (FP8_MAX / bound), -FP8_MAX, FP8_MAX)
    tl.store(Q + row * stride_qm + cols, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(O_ROW_SCALE + row, bound * O_HEADROOM / FP8_MAX)
    if row == 0:
        offs_s = tl.arange(0, BLOCK_S)
        has_seq = offs_s < num_seqs
        bounds = tl.maximum(tl.load(SEQ_AMAX + offs_s, mask=has_seq, other=1.0), eps) * BOUND
        tl.store(V_SCALE + offs_s * stride_scale, bounds / FP8_MAX, mask=has_seq)
        tl.store(O_INV + offs_s * stride_scale, FP8_MAX / (bounds * O_HEADROOM), mask=has_seq)


def _check_v(
    v: torch.Tensor, seq_amax: torch.Tensor, cu_seqlens: torch.Tensor, row_offset: int, mean: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    if v.dim() != 2 or v.shape[1] == 0:
        raise ValueError(f"v must be [N, C] with C > 0, got shape {tuple(v.shape)}")
    if v.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"v must be float16, bfloat16 or float32, got {v.dtype}")
    num_seqs = seq_amax.numel()
    if seq_amax.shape != (num_seqs,) or num_seqs == 0 or seq_amax.dtype != torch.float32:
        raise ValueError(f"seq_amax must be [B] float32 with B > 0, got {seq_amax.dtype} {tuple(seq_amax.shape)}")
    if cu_seqlens.shape != (num_seqs + 1,) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be [B + 1] = [{num_seqs + 1}] int32/int64, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if mean is not None and (mean.shape != (num_seqs, v.shape[1]) or mean.dtype != torch.float32):
        raise ValueError(f"mean must be [B, C] = [{num_seqs}, {v.shape[1]}] float32, got {mean.dtype} "
                         f"{tuple(mean.shape)}")
    if row_offset < 0:
        raise ValueError(f"row_offset must be >= 0, got {row_offset}")
    if out is not None and (out.shape != v.shape or out.dtype != FP8_DTYPE):
        raise ValueError(f"out must be [N, C] = {list(v.shape)} {FP8_DTYPE}, got {out.dtype} {tuple(out.shape)}")
    check_one_device("v", v, seq_amax, cu_seqlens, *(t for t in (mean, out) if t is not None))


def quantize_v(
    v: torch.Tensor, seq_amax: torch.Tensor, cu_seqlens: torch.Tensor, row_offset: int = 0,
    mean: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> QuantizedV:
    """e4m3 V for FP8 attention, one scale per sequence (see the module docstring): v [N, C] holds joint rows
    row_offset.. of the buffer whose sequence bounds are ``cu_seqlens`` (on v's device: no host sync); a row of
    sequence b becomes clamp(v * 448 / seq_amax[b]). ``seq_amax``: `sequence_amax` (v, ...), or a sequence-parallel
    group's all-reduced value. With ``mean`` ([B, C] float32, `sequence_stats`) the row is centered first,
    clamp((v - mean[b]) * 448 / (V_CENTERED_BOUND * seq_amax[b])). The sequences' row bounds are not checked on the
    device. Strided rows are read in place. ``out``: an e4m3 [N, C] buffer for the codes (rows of H * D, e.g. a
    cudnn_fp8_attention.key_buffer's), else a new one."""
    require_triton("quantize_v")
    _check_v(v, seq_amax, cu_seqlens, row_offset, mean, out)
    v = last_dim_contiguous(v)
    m, k = v.shape
    if m == 0:  # no program would write the scales
        return quantize_v_ref(v, seq_amax, cu_seqlens, row_offset, mean, out)
    num_seqs = seq_amax.numel()
    out = QuantizedV(row_output(out, v, "C", FP8_DTYPE), _scale_vector(num_seqs, v.device),
                     _scale_vector(num_seqs, v.device), torch.empty(m, dtype=torch.float32, device=v.device))
    center = mean is not None
    mean = last_dim_contiguous(mean) if center else seq_amax  # a placeholder pointer, never read
    block_k, num_warps = row_settings(k)
    _quantize_v_kernel[(m,)](
        v, out.data, seq_amax.contiguous(), mean, cu_seqlens.contiguous(), out.scale, out.o_inv, out.o_row_scale,  #
        v.stride(0), out.data.stride(0), mean.stride(0), out.scale.stride(0),  #
        k, row_offset, num_seqs, SCALE_EPS,  #
        FP8_MAX=FP8_MAX, O_HEADROOM=O_HEADROOM, BOUND=V_CENTERED_BOUND if center else 1.0, CENTER=center,
        BLOCK_K=block_k, BLOCK_S=max(next_power_of_2(num_seqs), 2), num_warps=num_warps,
    )
    return out


def _joint_row_sequence(cu_seqlens: torch.Tensor, n: int, row_offset: int, num_seqs: int) -> torch.Tensor:
    rows = torch.arange(row_offset, row_offset + n, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), rows, right=True).clamp(max=num_seqs - 1)


def quantize_v_ref(
    v: torch.Tensor, seq_amax: torch.Tensor, cu_seqlens: torch.Tensor, row_offset: int = 0,
    mean: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> QuantizedV:
    """PyTorch version of `quantize_v` (same arguments, same arithmetic: bit for bit where division is IEEE)."""
    _check_v(v, seq_amax, cu_seqlens, row_offset, mean, out)
    bound = seq_amax.clamp(min=SCALE_EPS) * (1.0 if mean is None else V_CENTERED_BOUND)
    # tensor / tensor only: torch may turn a division by a Python float into a multiplication by its reciprocal
    fp8_max = torch.full_like(bound, FP8_MAX)
    scaled = bound * O_HEADROOM
    seq = _joint_row_sequence(cu_seqlens, v.shape[0], row_offset, bound.numel())
    x = v.float() if mean is None else v.float() - mean[seq]
    codes = (x * (fp8_max / bound)[seq, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return QuantizedV(
        codes if out is None else out.copy_(codes),
        bound / fp8_max,
        fp8_max / scaled,
        (scaled / fp8_max)[seq],
    )


@triton.jit
def _restore_mean_kernel(
    O8, ROW_SCALE, MEAN, CU_SEQLENS, Q, SCALE,  #
    stride_om, stride_mean, stride_qm,  #
    n_cols, row_offset, num_seqs, eps,  #
    FP8_MAX: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # o8: [N, C] e4m3, row scales [N]; mean: [B, C] float32; q: [N, C] e4m3; scale: [N]. One program per row, held
    # as N_CHUNKS chunks (triton_utils.row_chunks).
    row = tl.program_id(0).to(tl.int64)
    seq = _row_sequence(CU_SEQLENS, row_offset + row, num_seqs, BLOCK_S)
    o8 = load_row_chunks(O8 + row * stride_om, n_cols, CHUNK, N_CHUNKS)
    means = load_row_chunks(MEAN + seq * stride_mean, n_cols, CHUNK, N_CHUNKS)
    row_scale = tl.load(ROW_SCALE + row)
    restored = ()
    for i in tl.static_range(N_CHUNKS):
        restored = restored + (o8[i] * row_scale + means[i],)
    tl.store(SCALE + row, store_quantized_row(Q + row * stride_qm, restored, n_cols, eps, FP8_MAX, CHUNK, N_CHUNKS))


def _check_restore(o8: torch.Tensor, row_scale: torch.Tensor, mean: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if o8.dim() != 2 or o8.dtype != FP8_DTYPE:
        raise ValueError(f"o8 must be [N, C] {FP8_DTYPE}, got {o8.dtype} {tuple(o8.shape)}")
    if row_scale.shape != (o8.shape[0],) or row_scale.dtype != torch.float32:
        raise ValueError(f"row_scale must be [N] float32, got {row_scale.dtype} {tuple(row_scale.shape)}")
    if mean.dim() != 2 or mean.shape[1] != o8.shape[1] or mean.dtype != torch.float32:
        raise ValueError(f"mean must be [B, C] float32 with C = {o8.shape[1]}, got {mean.dtype} {tuple(mean.shape)}")
    if cu_seqlens.shape != (mean.shape[0] + 1,):
        raise ValueError(f"cu_seqlens must be [B + 1] = [{mean.shape[0] + 1}], got {tuple(cu_seqlens.shape)}")
    check_one_device("o8", o8, row_scale, mean, cu_seqlens)


def restore_mean(
    o8: torch.Tensor, row_scale: torch.Tensor, mean: torch.Tensor, cu_seqlens: torch.Tensor, row_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output of centered V with its sequence's mean added back, quantized per row as the FP8 output
    projections read it (fp8.quantize_rows' rule): o8 [N, C] e4m3 rows (joint rows row_offset..) with row scales
    ``row_scale``; mean [B, C]. Returns (q [N, C] e4m3, scale [N] float32). One pass: read, add, quantize."""
    require_triton("restore_mean")
    _check_restore(o8, row_scale, mean, cu_seqlens)
    o8, mean = last_dim_contiguous(o8), last_dim_contiguous(mean)
    m, k = o8.shape
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=o8.device)
    scale = torch.empty(m, dtype=torch.float32, device=o8.device)
    if m == 0:
        return q, scale
    num_seqs = mean.shape[0]
    chunk, n_chunks, num_warps = row_chunks(k)
    _restore_mean_kernel[(m,)](
        o8, row_scale.contiguous(), mean, cu_seqlens.contiguous(), q, scale,  #
        o8.stride(0), mean.stride(0), q.stride(0),  #
        k, row_offset, num_seqs, SCALE_EPS,  #
        FP8_MAX=FP8_MAX, CHUNK=chunk, N_CHUNKS=n_chunks, BLOCK_S=max(next_power_of_2(num_seqs), 2),
        num_warps=num_warps,
    )
    return q, scale


def restore_mean_ref(
    o8: torch.Tensor, row_scale: torch.Tensor, mean: torch.Tensor, cu_seqlens: torch.Tensor, row_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch version of `restore_mean` (same arguments, same arithmetic)."""
    _check_restore(o8, row_scale, mean, cu_seqlens)
    seq = _joint_row_sequence(cu_seqlens, o8.shape[0], row_offset, mean.shape[0])
    return quantize_rows_ref(o8.float() * row_scale[:, None] + mean[seq])


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: Fp8AttentionScales, num_seqs: int
) -> None:
    """The checks shared by the FP8 attention backends: e4m3 q [S_total, H, D] and k, v of one shape [S_k, H, D] with
    S_k >= S_total (rows past S_total are key padding, cudnn_fp8_attention.key_buffer), float32 scales (one value for
    q and k, one per sequence for v and o_inv), one device."""
    if q.dim() != 3 or k.shape[1:] != q.shape[1:] or k.shape[0] < q.shape[0] or v.shape != k.shape:
        raise ValueError(f"q must be [S_total, H, D] and k, v share one [S_k >= S_total, H, D] shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if any(t.dtype != FP8_DTYPE for t in (q, k, v)):
        raise ValueError(f"q, k, v must be {FP8_DTYPE}, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, count in (("q", 1), ("k", 1), ("v", num_seqs), ("o_inv", num_seqs)):
        t = getattr(scales, name)
        if t.shape != (count,) or t.dtype != torch.float32:
            raise ValueError(f"scales.{name} must be float32 of shape ({count},), got {t.dtype} {tuple(t.shape)}")
    check_one_device("q", q, k, v, scales.q, scales.k, scales.v, scales.o_inv)


def fp8_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scales: Fp8AttentionScales,
    bounds: Sequence[int],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference of FP8 attention over packed sequences: per sequence (rows bounds[b]:bounds[b + 1]) the e4m3 q, k, v
    [S_total, H, D] dequantized with its scales, softmax attention in float32, O * o_inv[b] saturated to e4m3.
    cuDNN also rounds the probabilities to e4m3; this reference does not (it is the math the scales promise)."""
    check_attention_inputs(q, k, v, scales, len(bounds) - 1)
    bounds = check_seq_bounds(bounds, q.shape[0])
    scale = softmax_scale(scale, q.shape[-1])
    out = torch.empty(q.shape, dtype=FP8_DTYPE, device=q.device)
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if start == end:
            continue
        # [1, H, L, D]: 4-D, so that SDPA may pick a fused float32 kernel (no L x L matrix at the model's lengths)
        seq = [(t[start:end].float() * s).transpose(0, 1)[None]
               for t, s in ((q, scales.q), (k, scales.k), (v, scales.v[b]))]
        o = F.scaled_dot_product_attention(*seq, scale=scale)[0].transpose(0, 1)
        out[start:end] = (o * scales.o_inv[b]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return out
