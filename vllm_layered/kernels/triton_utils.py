"""Triton import guard and launch heuristics shared by the kernel modules.

Triton is an optional dependency (the `kernels` extra). Without it the kernel modules still import, so
the PyTorch references beside every kernel stay usable; calling a Triton wrapper then raises
RuntimeError. The placeholders follow vLLM's `triton_utils`: decorators become no-ops and any
`tl.<name>` used in an annotation resolves to None.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    HAS_TRITON = False

    class _TritonPlaceholder:
        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*args, **kwargs):
            return lambda f: f

        @staticmethod
        def Config(kwargs, num_warps=4, num_stages=3, **extra):
            return SimpleNamespace(kwargs=kwargs, num_warps=num_warps, num_stages=num_stages)

    class _LanguagePlaceholder:
        def __getattr__(self, name: str) -> None:
            return None

    triton = _TritonPlaceholder()
    tl = _LanguagePlaceholder()

__all__ = [
    "HAS_TRITON", "check_one_device", "chunks_max_abs", "chunks_sum", "fast_exp2", "fast_reciprocal", "interpreting",
    "last_dim_contiguous", "load_row_chunks", "next_power_of_2", "require_triton", "row_chunks", "row_output",
    "row_settings", "store_row_chunks", "tl", "triton",
]


def require_triton(op: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{op} needs Triton, which is not installed; use {op}_ref instead")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_settings(n: int) -> tuple[int, int]:
    """BLOCK size and num_warps for a kernel that holds one row of `n` elements in registers.

    The same thresholds as Liger-Kernel's `calculate_settings`: about 16-32 elements per thread.
    """
    block = next_power_of_2(n)
    if block > 65536:
        raise ValueError(f"a row of {n} elements does not fit one program (max 65536)")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def row_chunks(n: int) -> tuple[int, int, int]:
    """CHUNK, N_CHUNKS and num_warps for a kernel that holds one row of ``n`` elements in registers as N_CHUNKS
    power-of-two chunks (`load_row_chunks`).

    Why chunks: the model's rows are 3 x 2^k wide (3072, 12288). One power-of-two block pads them by a third, and
    padded lanes cost as many instructions as real ones; the row kernels of the FP8 step are bound by instruction
    issue rather than memory on an H200 (benchmarks/RESULTS.md, session 7). A row splits into 3, 5 or 7 chunks
    where that covers it exactly; other widths get one padded block. num_warps gives each thread 8 elements per
    chunk (16-byte loads of bf16), between 4 and 16 warps.
    """
    chunk = n & -n  # the largest power of two dividing n
    if n <= 0 or n // chunk not in (3, 5, 7) or chunk < 16:
        chunk, n_chunks = next_power_of_2(n), 1
    else:
        n_chunks = n // chunk
    if chunk * n_chunks > 65536:
        raise ValueError(f"a row of {n} elements does not fit one program (max 65536)")
    return chunk, n_chunks, min(16, max(4, chunk // 256))


@triton.jit
def load_row_chunks(ptr, n_cols, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
    """One row at ``ptr`` (stride 1) as a tuple of N_CHUNKS float32 [CHUNK] blocks, lanes past ``n_cols`` 0."""
    cols = tl.arange(0, CHUNK)
    chunks = ()
    for i in tl.static_range(N_CHUNKS):
        chunks = chunks + (tl.load(ptr + i * CHUNK + cols, mask=i * CHUNK + cols < n_cols, other=0.0).to(tl.float32),)
    return chunks


@triton.jit
def store_row_chunks(ptr, chunks, n_cols, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
    """Writes `load_row_chunks`' layout back to the row at ``ptr``, cast to its element type."""
    cols = tl.arange(0, CHUNK)
    for i in tl.static_range(N_CHUNKS):
        tl.store(ptr + i * CHUNK + cols, chunks[i].to(ptr.dtype.element_ty), mask=i * CHUNK + cols < n_cols)


@triton.jit
def chunks_sum(chunks, N_CHUNKS: tl.constexpr):
    """The sum over a row's chunks: added elementwise first, then one reduction."""
    total = chunks[0]
    for i in tl.static_range(1, N_CHUNKS):
        total = total + chunks[i]
    return tl.sum(total, axis=0)


@triton.jit
def chunks_max_abs(chunks, N_CHUNKS: tl.constexpr):
    """max |x| over a row's chunks: elementwise first, then one reduction."""
    amax = tl.abs(chunks[0])
    for i in tl.static_range(1, N_CHUNKS):
        amax = tl.maximum(amax, tl.abs(chunks[i]))
    return tl.max(amax, axis=0)


@triton.jit
def fast_exp2(x, FAST: tl.constexpr):
    """2^x; with FAST one ex2.approx.ftz instruction (the same approximation as tl.exp2, without the subnormal
    fix-up that costs 3-4 more instructions per element; results below 2^-126 flush to 0). FAST needs a GPU: the
    interpreter cannot run inline PTX, so wrappers pass ``not interpreting()``."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return tl.exp2(x)


@triton.jit
def fast_reciprocal(x, FAST: tl.constexpr):
    """1 / x; with FAST one rcp.approx.ftz instruction (what tl's division does after its range checks)."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return 1.0 / x


def check_one_device(name: str, first: torch.Tensor, *others: torch.Tensor | None) -> None:
    """ValueError unless each of ``others`` (None: an optional tensor not given) is on ``first``'s device;
    ``name`` names ``first`` in the message."""
    if any(t is not None and t.device != first.device for t in others):
        raise ValueError(f"all tensors must be on {name}'s device")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (a kernel reads strided rows and heads in place, e.g. views
    of one fused QKV or modulation output), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def row_output(
    out: torch.Tensor | None, like: torch.Tensor, last_dim: str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A kernel's output: ``out``, which must be contiguous over its last dim (named ``last_dim`` in the error), or
    a new contiguous tensor of ``like``'s shape and device, in ``dtype`` (default: like's)."""
    if out is None:
        return torch.empty(like.shape, dtype=dtype or like.dtype, device=like.device)
    if out.stride(-1) != 1:
        raise ValueError(f"out must be contiguous over {last_dim}")
    return out


def use_triton(x: torch.Tensor) -> bool:
    """Triton kernels on CUDA; their PyTorch references (same math) elsewhere or when disabled
    (VLLM_LAYERED_TRITON=0)."""
    return x.is_cuda and HAS_TRITON and os.environ.get("VLLM_LAYERED_TRITON", "1") != "0"
