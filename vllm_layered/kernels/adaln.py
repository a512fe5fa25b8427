"""AdaLN for packed batches: LayerNorm (no affine) + per-sequence modulation, and the gated residual.

With an FP8 transformer the modulation also quantizes its output for the FP8 linears that read it
(`layernorm_modulate_fp8`), so that output never goes through memory in bf16. `gated_residual_modulate` adds a
gated residual and modulates the result in one pass.

Rows of one stream ([N, C]) belong to different sequences (requests x CFG branch, at different
timesteps); `seg[i]` picks row i's shift/scale/gate out of [S, C] tables. One program per row.

Rounding follows the eager path in the activation dtype (F.layer_norm, then x * (1 + scale) + shift;
x + gate * y): statistics and arithmetic are fp32 in the kernel, every intermediate the eager path
materialises is rounded to the activation dtype at the same place.
"""

import torch
import torch.nn.functional as F

from vllm_layered.kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    SCALE_EPS,
    quantize_rows_ref,
    store_quantized_row,
)
from vllm_layered.kernels.triton_utils import (
    check_one_device,
    chunks_sum,
    last_dim_contiguous,
    load_row_chunks,
    require_triton,
    row_chunks,
    row_output,
    row_settings,
    store_row_chunks,
    tl,
    triton,
)

__all__ = [
    "gated_residual", "gated_residual_modulate", "gated_residual_modulate_ref", "gated_residual_ref",
    "layernorm_modulate", "layernorm_modulate_fp8", "layernorm_modulate_fp8_ref", "layernorm_modulate_ref",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _layernorm_modulate_kernel(
    X, SHIFT, SCALE, SEG, OUT, OUT_SCALE, RES, GATE,  #
    stride_xn, stride_shift, stride_scale, stride_on, stride_rn, stride_gate,  #
    n_cols, eps, fp8_eps,  #
    CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr, RESIDUAL: tl.constexpr,
):
    # x, out: [N, C]; shift, scale: [S, C]; seg: [N]. y = LN(x) * (1 + scale[seg]) + shift[seg]
    # FP8: out is e4m3 and out_scale [N] float32, y rounded to x's dtype and quantized per row (fp8.py's rule)
    # RESIDUAL: first x += gate[seg] * res (res [N, C], gate [S, C]), written back to x, as _gated_residual_kernel
    # One program per row, held as N_CHUNKS chunks (triton_utils.row_chunks).
    row = tl.program_id(0).to(tl.int64)
    seg = tl.load(SEG + row).to(tl.int64)
    dtype = X.dtype.element_ty
    cols = tl.arange(0, CHUNK)

    xs = load_row_chunks(X + row * stride_xn, n_cols, CHUNK, N_CHUNKS)
    if RESIDUAL:
        res = load_row_chunks(RES + row * stride_rn, n_cols, CHUNK, N_CHUNKS)
        gates = load_row_chunks(GATE + seg * stride_gate, n_cols, CHUNK, N_CHUNKS)
        updated = ()
        for i in tl.static_range(N_CHUNKS):
            updated = updated + ((xs[i] + (gates[i] * res[i]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32),)
        xs = updated
        store_row_chunks(X + row * stride_xn, xs, n_cols, CHUNK, N_CHUNKS)
    mean = chunks_sum(xs, N_CHUNKS) / n_cols
    centered = ()
    squares = ()
    for i in tl.static_range(N_CHUNKS):
        c = tl.where(i * CHUNK + cols < n_cols, xs[i] - mean, 0.0)
        centered = centered + (c,)
        squares = squares + (c * c,)
    rstd = tl.rsqrt(chunks_sum(squares, N_CHUNKS) / n_cols + eps)
    scales = load_row_chunks(SCALE + seg * stride_scale, n_cols, CHUNK, N_CHUNKS)
    shifts = load_row_chunks(SHIFT + seg * stride_shift, n_cols, CHUNK, N_CHUNKS)
    ys = ()
    for i in tl.static_range(N_CHUNKS):
        normed = (centered[i] * rstd).to(dtype).to(tl.float32)
        y = (normed * (1.0 + scales[i]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32) + shifts[i]
        ys = ys + (y.to(dtype).to(tl.float32),)
    if FP8:
        tl.store(OUT_SCALE + row, store_quantized_row(OUT + row * stride_on, ys, n_cols, fp8_eps, FP8_MAX, CHUNK,
                                                      N_CHUNKS))
    else:
        store_row_chunks(OUT + row * stride_on, ys, n_cols, CHUNK, N_CHUNKS)


@triton.jit
def _gated_residual_kernel(
    X, Y, GATE, SEG, OUT,  #
    stride_xn, stride_yn, stride_gate, stride_on,  #
    n_cols,  #
    BLOCK_C: tl.constexpr,
):
    # x, y, out: [N, C]; gate: [S, C]; seg: [N]. out = x + gate[seg] * y (out may alias x)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    dtype = OUT.dtype.element_ty

    seg = tl.load(SEG + row).to(tl.int64)
    gate = tl.load(GATE + seg * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * stride_yn + cols, mask=mask, other=0.0).to(tl.float32)
    out = x + (gate * y).to(dtype).to(tl.float32)
    tl.store(OUT + row * stride_on + cols, out.to(dtype), mask=mask)


def _check_rows(name: str, t: torch.Tensor, n: int | None, c: int, dtype: torch.dtype) -> None:
    if t.dim() != 2 or t.shape[1] != c or (n is not None and t.shape[0] != n):
        rows = "N" if n is None else n
        raise ValueError(f"{name} must be [{rows}, {c}], got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")


def _check_inputs(
    x: torch.Tensor,
    tables: dict[str, torch.Tensor],
    seg: torch.Tensor,
    others: dict[str, torch.Tensor | None],
) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [N, C], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    n, c = x.shape
    for name, t in others.items():
        if t is not None:
            _check_rows(name, t, n, c, x.dtype)
    num_segments = None
    for name, t in tables.items():
        _check_rows(name, t, None, c, x.dtype)
        if num_segments is not None and t.shape[0] != num_segments:
            raise ValueError(f"{', '.join(tables)} must have the same number of segments")
        num_segments = t.shape[0]
    if seg.shape != (n,) or seg.dtype not in _INDEX_DTYPES:
        raise ValueError(f"seg must be int32/int64 of shape ({n},), got {seg.dtype} {tuple(seg.shape)}")
    check_one_device("x", x, seg, *tables.values(), *others.values())


def layernorm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    seg: torch.Tensor,
    *,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(x) without affine, then * (1 + scale[seg]) + shift[seg]; x: [N, C], shift/scale: [S, C].

    seg values must lie in [0, S); they are not checked on the device.
    """
    require_triton("layernorm_modulate")
    _check_inputs(x, {"shift": shift, "scale": scale}, seg, {"out": out})
    x, shift, scale = (last_dim_contiguous(t) for t in (x, shift, scale))
    seg = seg.contiguous()
    out = row_output(out, x, "C")
    _launch_layernorm_modulate(x, shift, scale, seg, eps, out, None)
    return out


def _launch_layernorm_modulate(x, shift, scale, seg, eps, out, out_scale, res=None, gate=None) -> None:
    """One program per row over contiguous-in-C x, shift, scale, out (and res, gate); FP8 output when out_scale is
    given; the gated residual x += gate[seg] * res first when res is."""
    n, c = x.shape
    if n == 0:
        return
    chunk, n_chunks, num_warps = row_chunks(c)
    residual = res is not None
    res, gate = (res, gate) if residual else (x, shift)  # placeholders, never read
    _layernorm_modulate_kernel[(n,)](
        x, shift, scale, seg, out, out if out_scale is None else out_scale, res, gate,  #
        x.stride(0), shift.stride(0), scale.stride(0), out.stride(0), res.stride(0), gate.stride(0),  #
        c, eps, SCALE_EPS,  #
        CHUNK=chunk, N_CHUNKS=n_chunks, FP8=out_scale is not None, FP8_MAX=FP8_MAX, RESIDUAL=residual,
        num_warps=num_warps,
    )


def layernorm_modulate_ref(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    seg: torch.Tensor,
    *,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager version of `layernorm_modulate`, in x.dtype as diffusers computes it."""
    _check_inputs(x, {"shift": shift, "scale": scale}, seg, {"out": out})
    seg = seg.long()
    y = F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[seg]) + shift[seg]
    return y if out is None else out.copy_(y)


def layernorm_modulate_fp8(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    seg: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`layernorm_modulate` with its output quantized per row to e4m3 in the same pass, for an FP8 linear that
    reads it: (q [N, C] e4m3, scale [N] float32), as fp8.quantize_rows would give on the bf16 output, without
    writing and re-reading that output."""
    require_triton("layernorm_modulate_fp8")
    _check_inputs(x, {"shift": shift, "scale": scale}, seg, {})
    x, shift, scale = (last_dim_contiguous(t) for t in (x, shift, scale))
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    q_scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _launch_layernorm_modulate(x, shift, scale, seg.contiguous(), eps, q, q_scale)
    return q, q_scale


def layernorm_modulate_fp8_ref(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    seg: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch version of `layernorm_modulate_fp8`: the eager modulation, then the row quantization."""
    return quantize_rows_ref(layernorm_modulate_ref(x, shift, scale, seg, eps=eps))


def gated_residual_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    seg: torch.Tensor,
    *,
    eps: float = 1e-6,
    fp8: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`gated_residual` (x += gate[seg] * y, in place) and then `layernorm_modulate` of the new x (with ``fp8``:
    `layernorm_modulate_fp8`) in one pass, so the residual stream is read once: a block's attention residual and the
    norm in front of its MLP. Returns what the modulation returns; x (contiguous over C) holds the new residual."""
    require_triton("gated_residual_modulate")
    _check_inputs(x, {"shift": shift, "scale": scale, "gate": gate}, seg, {"y": y})
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous over C (it is updated in place)")
    y, gate, shift, scale = (last_dim_contiguous(t) for t in (y, gate, shift, scale))
    seg = seg.contiguous()
    if fp8:
        out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
        out_scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        _launch_layernorm_modulate(x, shift, scale, seg, eps, out, out_scale, y, gate)
        return out, out_scale
    out = torch.empty_like(x)
    _launch_layernorm_modulate(x, shift, scale, seg, eps, out, None, y, gate)
    return out


def gated_residual_modulate_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    seg: torch.Tensor,
    *,
    eps: float = 1e-6,
    fp8: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eager version of `gated_residual_modulate`: `gated_residual_ref`, then the modulation's reference."""
    gated_residual_ref(x, y, gate, seg)
    return (layernorm_modulate_fp8_ref if fp8 else layernorm_modulate_ref)(x, shift, scale, seg, eps=eps)


def gated_residual(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    seg: torch.Tensor,
    *,
    inplace: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x + gate[seg] * y; x, y: [N, C], gate: [S, C]. Writes into x when inplace (the default), else
    into out (or a new tensor)."""
    require_triton("gated_residual")
    _check_inputs(x, {"gate": gate}, seg, {"y": y, "out": out})
    if inplace and out is not None:
        raise ValueError("pass either inplace=True or out, not both")
    n, c = x.shape
    if inplace:
        if x.stride(-1) != 1:
            raise ValueError("inplace needs x contiguous over C")
        out = x
    else:
        x = last_dim_contiguous(x)
        out = row_output(out, x, "C")
    y, gate = last_dim_contiguous(y), last_dim_contiguous(gate)
    seg = seg.contiguous()
    if n == 0:
        return out
    block_c, num_warps = row_settings(c)
    _gated_residual_kernel[(n,)](
        x, y, gate, seg, out,  #
        x.stride(0), y.stride(0), gate.stride(0), out.stride(0),  #
        c,  #
        BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def gated_residual_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    seg: torch.Tensor,
    *,
    inplace: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager version of `gated_residual`, in x.dtype."""
    _check_inputs(x, {"gate": gate}, seg, {"y": y, "out": out})
    if inplace and out is not None:
        raise ValueError("pass either inplace=True or out, not both")
    update = gate[seg.long()] * y
    if inplace:
        return x.add_(update)
    return torch.add(x, update, out=out)
