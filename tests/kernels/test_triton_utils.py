"""The shared row-kernel helpers: how rows split into chunks, and the fast exp2 / reciprocal against exact math."""

import pytest
import torch

from vllm_layered.kernels.triton_utils import (
    HAS_TRITON,
    chunks_max_abs,
    chunks_sum,
    fast_exp2,
    fast_reciprocal,
    interpreting,
    load_row_chunks,
    row_chunks,
    store_row_chunks,
    tl,
    triton,
)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("n, expected", [
    (3072, (1024, 3, 4)),  # the model's hidden size: three chunks, no padding
    (12288, (4096, 3, 16)),  # its MLP width
    (80, (16, 5, 4)),
    (448, (64, 7, 4)),
    (4096, (4096, 1, 16)),  # a power of two is one chunk already
    (200, (256, 1, 4)),  # 8 x 25: no exact split into 3, 5 or 7, one padded block
    (24, (32, 1, 4)),  # 3 x 8: chunks under 16 lanes are not worth it
    (1, (1, 1, 4)),
])
def test_row_chunks(n, expected):
    chunk, n_chunks, num_warps = row_chunks(n)
    assert (chunk, n_chunks, num_warps) == expected
    assert chunk & (chunk - 1) == 0 and chunk * n_chunks >= n
    assert n_chunks == 1 or chunk * n_chunks == n


def test_row_chunks_rejects_rows_too_long_for_one_program():
    with pytest.raises(ValueError, match="does not fit"):
        row_chunks(3 * 32768)


@triton.jit
def _row_stats_kernel(X, Y, STATS, n_cols, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
    # y = 2x over the row's chunks; stats = (sum, max |x|)
    row = tl.program_id(0).to(tl.int64)
    xs = load_row_chunks(X + row * n_cols, n_cols, CHUNK, N_CHUNKS)
    doubled = ()
    for i in tl.static_range(N_CHUNKS):
        doubled = doubled + (2.0 * xs[i],)
    store_row_chunks(Y + row * n_cols, doubled, n_cols, CHUNK, N_CHUNKS)
    tl.store(STATS + 2 * row, chunks_sum(xs, N_CHUNKS))
    tl.store(STATS + 2 * row + 1, chunks_max_abs(xs, N_CHUNKS))


@needs_triton
@pytest.mark.parametrize("n", [96, 80, 200])  # 3 and 5 chunks; one padded block (masked lanes must not count)
def test_row_chunk_helpers(n, device):
    x = torch.randn(7, n, device=device) - 0.3
    x[3, n - 1] = -50.0  # the largest |x| in the last column of the last chunk
    y = torch.full_like(x, float("nan"))
    stats = torch.empty(7, 2, device=device)
    chunk, n_chunks, num_warps = row_chunks(n)
    _row_stats_kernel[(7,)](x, y, stats, n, CHUNK=chunk, N_CHUNKS=n_chunks, num_warps=num_warps)
    assert torch.equal(y, 2 * x)
    torch.testing.assert_close(stats[:, 0], x.sum(dim=1), rtol=1e-5, atol=1e-4)
    assert torch.equal(stats[:, 1], x.abs().amax(dim=1))


@triton.jit
def _fast_math_kernel(X, EXP2, RCP, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=1.0)
    tl.store(EXP2 + offs, fast_exp2(x, FAST), mask=mask)
    tl.store(RCP + offs, fast_reciprocal(x, FAST), mask=mask)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # interpreter: 2^200 = inf
@pytest.mark.parametrize("fast", [False, True])
def test_fast_exp2_and_reciprocal(fast, device):
    """FAST (one PTX approximation each, GPU only) within a few float32 ulps of exact math, and at the edges the
    GELU relies on: 2^(-large) = 0, 2^(+large) = inf, 1 / inf = 0."""
    if fast and interpreting():
        pytest.skip("inline PTX runs on a GPU only")
    x = torch.cat([torch.linspace(-30, 30, 1000), torch.tensor([-200.0, 200.0, float("inf"), 1e-3, 3.0])])
    x = x.to(device)
    exp2, rcp = torch.empty_like(x), torch.empty_like(x)
    _fast_math_kernel[(1,)](x, exp2, rcp, x.numel(), FAST=fast, BLOCK=1024 * 2)
    finite = x.abs() < 100
    torch.testing.assert_close(exp2[finite], torch.exp2(x[finite].double()).float(), rtol=2**-21, atol=0)
    assert exp2[x == -200].item() == 0.0 and exp2[x == 200].item() == float("inf")
    torch.testing.assert_close(rcp, (1 / x.double()).float(), rtol=2**-21, atol=0)
    assert rcp[x == float("inf")].item() == 0.0
