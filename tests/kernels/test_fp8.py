"""FP8 row quantization (Triton kernel vs reference), the scaled GEMM and Fp8Linear against bf16 nn.Linear."""

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.fp8_checks import (
    E4M3_HALF_ULP,
    E4M3_SUBNORMAL_STEP,
    assert_same_quantization,
    dequantize,
    rel_err,
    rows_with_spread,
)
from vllm_layered.kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    SCALE_EPS,
    fp8_gemm,
    fp8_gemm_ref,
    quantize_rows,
    quantize_rows_ref,
)
from vllm_layered.kernels.triton_utils import HAS_TRITON, interpreting
from vllm_layered.model_executor.models.fp8_linear import Fp8Linear, Fp8Rows, fp8_input, quantize_activation

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m, k", [(1, 16), (37, 48), (5, 200), (13, 1000), (3, 3072)])
def test_quantize_rows_matches_reference(m, k, dtype, device):
    x = rows_with_spread(m, k, dtype, device)
    q, scale = quantize_rows(x)
    q_ref, scale_ref = quantize_rows_ref(x)
    assert_same_quantization(q, scale, q_ref, scale_ref, exact=interpreting())


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter: exp(big) = inf
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [400, 384])  # one padded block; three chunks of 128 (as 12288 = 3 x 4096)
def test_quantize_rows_gelu_matches_reference(k, dtype, device):
    """The fused GELU(tanh): the kernel's sigmoid form vs torch's tanh form may differ by one ulp before the
    rounding to x's dtype, so compare the dequantized values and require nearly all codes to agree."""
    x = (torch.randn(29, k) * 3).to(dtype).to(device)
    q, scale = quantize_rows(x, gelu=True)
    q_ref, scale_ref = quantize_rows_ref(x, gelu=True)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-2, atol=0)
    # measured (H200 and interpreter, seed 0): 1.8e-6 in bf16, 2.4e-7 in float32 (a few codes flip by one step)
    assert rel_err(dequantize(q, scale), dequantize(q_ref, scale_ref)) < 4e-6
    assert (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item() > 0.99


@needs_triton
def test_quantize_rows_strided_and_empty(device):
    buffer = rows_with_spread(21, 3 * 64, torch.bfloat16, device)
    x = buffer[:, 64:128]  # row stride 192, read in place
    q, scale = quantize_rows(x)
    assert_same_quantization(q, scale, *quantize_rows_ref(x), exact=interpreting())
    q, scale = quantize_rows(x[:0])
    assert q.shape == (0, 64) and scale.shape == (0,)


def test_reference_quantization_error_is_within_e4m3_rounding():
    """Every row's largest |x| maps to 448; each value is off by at most half an e4m3 step (relative 2^-4 for
    normals, 2^-10 scale for subnormals); an all-zero row gets the floor scale and zero codes."""
    x = rows_with_spread(50, 96, torch.float32, "cpu")
    x[7] = 0
    q, scale = quantize_rows_ref(x)
    assert scale[7].item() == pytest.approx(SCALE_EPS / FP8_MAX) and q[7].float().eq(0).all()
    nonzero = torch.arange(50) != 7
    assert q[nonzero].float().abs().amax(dim=1).eq(FP8_MAX).all()
    error = (dequantize(q, scale) - x).abs()
    bound = torch.maximum(x.abs() * E4M3_HALF_ULP, scale[:, None] * E4M3_SUBNORMAL_STEP / 2) * (1 + 1e-6)
    assert error.le(bound).all()


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="x must be"):
        quantize_rows_ref(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        quantize_rows_ref(torch.randn(2, 4).double())
    xq, xs = quantize_rows_ref(torch.randn(4, 32))
    wq, ws = quantize_rows_ref(torch.randn(16, 32))
    with pytest.raises(ValueError, match="do not match"):
        fp8_gemm_ref(xq, xs, wq[:, :16], ws)
    with pytest.raises(ValueError, match="w_scale"):
        fp8_gemm_ref(xq, xs, wq, ws[:8])
    with pytest.raises(ValueError, match="bias"):
        fp8_gemm_ref(xq, xs, wq, ws, torch.zeros(8))
    with pytest.raises(ValueError, match="out must be"):
        fp8_gemm_ref(xq, xs, wq, ws, out=torch.empty(4, 16))  # float32 out, bfloat16 out_dtype
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Linear.from_linear(torch.nn.Linear(24, 32))


def make_linear(k: int, n: int, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Linear:
    """Output channels whose magnitudes span 6 decades: a per-tensor (or per-input-channel) weight scale would
    crush the small ones to zero."""
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-3, 3, n)[torch.randperm(n)][:, None])
        linear.bias.normal_(0, 0.1)
    return linear.to(dtype).requires_grad_(False)


def worst_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest relative error of one token (row) or one output channel (column)."""
    a, b = actual.double(), expected.double()
    return max(((a - b).norm(dim=d) / b.norm(dim=d)).max().item() for d in (0, 1))


@torch.no_grad()
def test_fp8_linear_matches_bf16_linear():
    """Per-token x per-channel e4m3 keeps every token and output channel within a few % of the bf16 linear, even
    with magnitudes spread over 6 decades (measured over seeds: 2.8-4.6% overall, 7-11% worst token/channel).
    Scales on the wrong axis or one per tensor fail the per-token/channel bound (measured 80-150%)."""
    linear = make_linear(256, 96)
    x = rows_with_spread(70, 256, torch.bfloat16, "cpu")
    layer = Fp8Linear.from_linear(linear)
    expected = linear(x)
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert layer.weight.dtype == FP8_DTYPE and layer.weight.shape == (96, 256)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (96,)
    assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.bias, linear.bias)
    assert rel_err(got, expected) < 0.08
    assert worst_err(got, expected) < 0.2

    # the same bound fails with one weight scale for the whole tensor, or activation scales per column
    w = linear.weight.float()
    w_scale = w.abs().amax() / FP8_MAX
    xq, x_scale = quantize_rows_ref(x)
    per_tensor = fp8_gemm_ref(xq, x_scale, (w / w_scale).to(FP8_DTYPE), w_scale.expand(96).contiguous(), linear.bias)
    assert worst_err(per_tensor, expected) > 0.5
    xq_t, x_scale_t = quantize_rows_ref(x.t().contiguous())
    x_wrong_axis = dequantize(xq_t, x_scale_t).t()
    w_deq = dequantize(layer.weight, layer.weight_scale)
    assert worst_err(x_wrong_axis @ w_deq.t() + linear.bias.float(), expected) > 0.5


@torch.no_grad()
def test_fp8_linear_call_paths_agree():
    """forward on [.., K] (any leading dims), on pre-quantized rows, and addmm_into a row block of a buffer."""
    linear = make_linear(64, 48)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(2, 9, 64).bfloat16()
    y = layer(x)
    assert y.shape == (2, 9, 48)
    rows = x.reshape(18, 64)
    assert torch.equal(layer(quantize_activation(rows)), y.reshape(18, 48))
    buffer = torch.full((30, 48), float("nan"), dtype=torch.bfloat16)
    layer.addmm_into(rows[4:11], buffer[5:12])
    assert torch.equal(buffer[5:12], y.reshape(18, 48)[4:11])
    assert buffer[:5].isnan().all() and buffer[12:].isnan().all()
    shared = fp8_input(rows, layer, layer)
    assert isinstance(shared, Fp8Rows)
    layer.addmm_into(shared[4:11], buffer[5:12])
    assert torch.equal(buffer[5:12], y.reshape(18, 48)[4:11])
    assert fp8_input(rows, layer, linear) is rows  # a bf16 consumer: no quantization


def test_fp8_rows_slice_keeps_scale_aligned():
    rows = quantize_activation(torch.randn(40, 32))
    part = rows[3:20]
    assert part.scale.data_ptr() % 16 == 0
    assert torch.equal(part.scale, rows.scale[3:20]) and part.data.data_ptr() == rows.data[3:20].data_ptr()


def test_scaled_mm_call_matches_reference_on_cpu():
    """The torch._scaled_mm call of fp8_gemm (row-wise scales, bf16 bias, out= a row block) on PyTorch's CPU
    kernel, where the build has one (2.14 does): checks the call contract the GPU path relies on."""
    xq, x_scale = quantize_rows_ref(rows_with_spread(40, 64, torch.bfloat16, "cpu"))
    wq, w_scale = quantize_rows_ref(torch.randn(32, 64))
    bias = torch.randn(32).bfloat16()
    try:
        got = fp8_gemm(xq, x_scale, wq, w_scale, bias)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this PyTorch has no CPU _scaled_mm with row-wise scales: {exc}")
    expected = fp8_gemm_ref(xq, x_scale, wq, w_scale, bias)
    assert got.dtype == torch.bfloat16 and rel_err(got, expected) < 1e-2
    buffer = torch.full((50, 32), float("nan"), dtype=torch.bfloat16)
    fp8_gemm(xq[3:40], x_scale[3:40].clone(), wq, w_scale, bias, out=buffer[5:42])
    assert rel_err(buffer[5:42], expected[3:40]) < 1e-2
    assert buffer[:5].isnan().all() and buffer[42:].isnan().all()


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("k, n, gelu", [(3072, 3072, False), (3072, 12288, False), (12288, 3072, True)])
def test_fp8_gemm_on_gpu(k, n, gelu):
    """Triton quantization + torch._scaled_mm (row-wise scales, bf16 bias, out= a row block) vs the float32
    reference on the transformer's shapes; and the FP8 layer against bf16 nn.Linear."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (sm89+)")
    m = 2000
    x = rows_with_spread(m, k, torch.bfloat16, "cuda")
    xq, x_scale = quantize_rows(x, gelu=gelu)
    assert_same_quantization(xq, x_scale, *quantize_rows_ref(x, gelu=gelu), exact=False)
    wq, w_scale = quantize_rows_ref(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    expected = fp8_gemm_ref(xq, x_scale, wq, w_scale, bias)
    for fast_accum in (False, True):
        got = fp8_gemm(xq, x_scale, wq, w_scale, bias, fast_accum=fast_accum)
        assert got.dtype == torch.bfloat16
        # measured on an H200 (benchmarks/RESULTS.md, 2026-11-30): 6.0e-4 to 7.2e-4 exact sums, 2.2e-3 to 2.8e-3 fast
        assert rel_err(got, expected) < (6e-3 if fast_accum else 1.5e-3), fast_accum  # fast: reduced-precision sums
    for rows in (1, 29, 42, 127, 128, 206):  # few rows (the text stream): no fast-accumulation kernel below 43
        assert rel_err(fp8_gemm(xq[:rows], x_scale[:rows], wq, w_scale, bias, fast_accum=True),
                       expected[:rows]) < 6e-3, rows
    buffer = torch.full((m + 10, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    fp8_gemm(xq[7:1007], x_scale[7:1007].clone(), wq, w_scale, bias, out=buffer[3:1003])
    assert rel_err(buffer[3:1003], expected[7:1007]) < 1.5e-3
    assert buffer[:3].isnan().all() and buffer[1003:].isnan().all()

    linear = make_linear(k, n).cuda()
    layer = Fp8Linear.from_linear(linear)
    inputs = F.gelu(x, approximate="tanh") if gelu else x
    with torch.no_grad():
        assert rel_err(layer(inputs), linear(inputs)) < 0.073  # measured 3.63e-2 to 3.65e-2 on an H200
        rows = fp8_input(inputs, layer, layer)
        assert rel_err(layer(rows[5:1005]), linear(inputs[5:1005])) < 0.073
