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
    "HAS_TRITON", "check_one_device", "interpreting", "last_dim_contiguous", "next_power_of_2", "require_triton",
    "row_output", "row_settings", "tl", "triton",
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
