"""Kernel tests: Triton's CPU interpreter where there is no GPU, compiled kernels where there is one.

TRITON_INTERPRET is read when a kernel is decorated, so tests/conftest.py sets it before anything imports
a kernel module.
"""

import pytest
import torch

from vllm_layered.kernels.triton_utils import HAS_TRITON, interpreting


def _fix_interpreter_casts() -> None:
    """Make Triton's CPU interpreter treat bfloat16 and e4m3 as the GPU does (it stores bf16 as raw uint16 bits).

    - float32 -> bfloat16 casts truncate in the interpreter; the GPU (and PyTorch) round to nearest even.
      Truncation adds a one-sided error at every rounding step that the references do not have.
    - tl.dot on bfloat16 operands multiplies the raw bits as integers; widen them to float32 first.
    - float32 -> e4m3 rounds half up and loses the carry into the exponent (125.9 becomes 64, not 128); the GPU
      rounds to nearest even (cvt.rn.satfinite), as PyTorch does.
    All are interpreter artefacts, so without these the tests would measure the interpreter.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or not all(
        hasattr(builder, name) for name in ("cast_impl", "create_dot", "create_fp_to_fp")
    ):
        return
    cast_impl, create_dot, create_fp_to_fp = builder.cast_impl, builder.create_dot, builder.create_fp_to_fp

    def bf16_to_f32(h):
        return handle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def patched_cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return handle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    def patched_create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a = bf16_to_f32(a) if a.dtype.scalar == tl.bfloat16 else a
        b = bf16_to_f32(b) if b.dtype.scalar == tl.bfloat16 else b
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def patched_create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            data = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.float8_e4m3fn)
            return handle(data.view(torch.uint8).numpy(), tl.float8e4nv)
        return create_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.cast_impl = patched_cast_impl
    builder.create_dot = patched_create_dot
    builder.create_fp_to_fp = patched_create_fp_to_fp


if HAS_TRITON and interpreting():
    _fix_interpreter_casts()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    """Small-shape tests run on the GPU when there is one, else on the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def check_close():
    """Relative error ||a - b|| / ||b|| in float64, against a per-dtype bound (fp32 1e-5, half 1e-2)."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        assert actual.shape == expected.shape, (actual.shape, expected.shape)
        a, b = actual.double(), expected.double()
        assert torch.isfinite(a).all(), "output has non-finite values (unwritten rows?)"
        tol = 1e-5 if (dtype or actual.dtype) == torch.float32 else 1e-2
        err = ((a - b).norm() / b.norm()).item()
        assert err <= tol, f"relative error {err:.3g} > {tol:g}"

    return check
