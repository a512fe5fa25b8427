import pytest
import torch

from tests.kernels.fp8_checks import assert_same_quantization, dequantize, rel_err
from vllm_layered.kernels.adaln import (
    gated_residual,
    gated_residual_modulate,
    gated_residual_modulate_ref,
    gated_residual_ref,
    layernorm_modulate,
    layernorm_modulate_fp8,
    layernorm_modulate_fp8_ref,
    layernorm_modulate_ref,
)
from vllm_layered.kernels.fp8 import quantize_rows_ref
from vllm_layered.kernels.triton_utils import HAS_TRITON, interpreting

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_inputs(n, c, num_segments, dtype, device):
    """x with an offset (LayerNorm must remove it), the six [S, C] chunks of one modulation output
    (row-strided views, as the transformer gets them) and unsorted segment ids covering every segment."""
    x = (torch.randn(n, c) * 2 + 0.7).to(dtype).to(device)
    mod = (torch.randn(num_segments, 6 * c) * 0.5).to(dtype).to(device)
    chunks = mod.chunk(6, dim=-1)
    seg = torch.cat([torch.arange(num_segments), torch.randint(0, num_segments, (n - num_segments,))])
    seg = seg[torch.randperm(n)].to(torch.int32).to(device)
    return x, chunks, seg


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c, num_segments", [(37, 48, 3), (9, 96, 1), (64, 200, 5)])
def test_layernorm_modulate(n, c, num_segments, dtype, device, check_close):
    x, (shift, scale, *_), seg = make_inputs(n, c, num_segments, dtype, device)
    out = torch.full_like(x, float("nan"))
    assert layernorm_modulate(x, shift, scale, seg, eps=1e-6, out=out) is out
    check_close(out, layernorm_modulate_ref(x, shift, scale, seg, eps=1e-6))
    check_close(layernorm_modulate(x, shift, scale, seg.long()), layernorm_modulate_ref(x, shift, scale, seg))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c, num_segments", [(37, 48, 3), (9, 96, 1), (64, 200, 5)])
def test_layernorm_modulate_fp8(n, c, num_segments, dtype, device):
    """The fused quantization equals quantizing the unfused kernel's output (bit for bit in the interpreter), and
    the reference (eager modulation, then fp8.quantize_rows_ref) up to the modulation's own rounding. Rows of
    very different sizes (after modulation) each get their own scale."""
    x, (shift, scale, *_), seg = make_inputs(n, c, num_segments, dtype, device)
    shift = shift * torch.logspace(-1, 2, shift.shape[0], device=device)[:, None].to(dtype)
    q, q_scale = layernorm_modulate_fp8(x, shift, scale, seg)
    unfused = quantize_rows_ref(layernorm_modulate(x, shift, scale, seg))
    assert_same_quantization(q, q_scale, *unfused, exact=interpreting())
    q_ref, scale_ref = layernorm_modulate_fp8_ref(x, shift, scale, seg)
    torch.testing.assert_close(q_scale, scale_ref, rtol=1e-2, atol=0)
    assert rel_err(dequantize(q, q_scale), dequantize(q_ref, scale_ref)) < 1e-2
    assert (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item() > 0.95
    q_empty, scale_empty = layernorm_modulate_fp8(x[:0], shift, scale, seg[:0])
    assert q_empty.shape == (0, c) and scale_empty.shape == (0,)


@needs_triton
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c, num_segments", [(37, 48, 3), (64, 200, 5)])
def test_gated_residual_modulate(n, c, num_segments, dtype, fp8, device, check_close):
    """The fused residual + modulation against the two kernels it replaces (bit for bit in the interpreter: the same
    rounding steps; a GPU may contract x + gate * y into an FMA in one and not the other) and the eager path."""
    x, (shift, scale, gate, *_), seg = make_inputs(n, c, num_segments, dtype, device)
    y = torch.randn_like(x)
    fused_x, unfused_x, ref_x = x.clone(), x.clone(), x.clone()
    got = gated_residual_modulate(fused_x, y, gate, shift, scale, seg, fp8=fp8)
    gated_residual(unfused_x, y, gate, seg)
    expected = (layernorm_modulate_fp8 if fp8 else layernorm_modulate)(unfused_x, shift, scale, seg)
    ref = gated_residual_modulate_ref(ref_x, y, gate, shift, scale, seg, fp8=fp8)
    check_close(fused_x, ref_x)
    assert torch.equal(fused_x, unfused_x) or not interpreting()
    check_close(fused_x, unfused_x)
    if fp8:
        assert_same_quantization(*got, *expected, exact=interpreting())
        # vs eager: the residual's bf16 rounding differs from the eager add now and then, and a flipped bf16 ulp can
        # flip an e4m3 code (1.30e-2 and 1.45e-2 on an H200 in bf16)
        assert rel_err(dequantize(*got), dequantize(*ref)) < 3e-2
    else:
        assert torch.equal(got, expected) or not interpreting()
        check_close(got, expected)
        check_close(got, ref)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c, num_segments", [(37, 48, 3), (64, 200, 5)])
def test_gated_residual(n, c, num_segments, dtype, device, check_close):
    x, (*_, gate), seg = make_inputs(n, c, num_segments, dtype, device)
    y = torch.randn(n, c).to(dtype).to(device)
    expected = gated_residual_ref(x, y, gate, seg, inplace=False)

    out = torch.full_like(x, float("nan"))
    assert gated_residual(x, y, gate, seg, inplace=False, out=out) is out
    check_close(out, expected)

    x_before = x.clone()
    assert gated_residual(x, y, gate, seg) is x  # in place by default
    check_close(x, expected)
    assert not torch.equal(x, x_before)


@needs_triton
def test_gated_residual_strided_rows(device, check_close):
    """x and y as column slices of wider buffers (row stride != C) are read and written in place."""
    n, c = 21, 40
    x_buf = torch.randn(n, 2 * c, device=device)
    x, y = x_buf[:, :c], torch.randn(n, 3 * c, device=device)[:, c:2 * c]
    _, (*_, gate), seg = make_inputs(n, c, 2, torch.float32, device)
    expected = gated_residual_ref(x, y, gate, seg, inplace=False)
    untouched = x_buf[:, c:].clone()
    gated_residual(x, y, gate, seg)
    check_close(x, expected)
    assert torch.equal(x_buf[:, c:], untouched)


def test_reference_rounding_is_eager_bf16():
    """The reference computes in the activation dtype, exactly like the transformer's eager path."""
    x, (shift, scale, *_), seg = make_inputs(11, 32, 2, torch.bfloat16, "cpu")
    normed = torch.nn.functional.layer_norm(x, (32,), eps=1e-6)
    expected = normed * (1 + scale[seg.long()]) + shift[seg.long()]
    assert torch.equal(layernorm_modulate_ref(x, shift, scale, seg), expected)


@needs_triton
def test_bad_inputs_raise_value_error(device):
    x, (shift, scale, *_, gate), seg = make_inputs(10, 16, 2, torch.float32, device)
    with pytest.raises(ValueError, match="x must be"):
        layernorm_modulate(x[None], shift, scale, seg)
    with pytest.raises(ValueError, match="scale must be"):
        layernorm_modulate(x, shift, scale[:, :8], seg)
    with pytest.raises(ValueError, match="same number of segments"):
        layernorm_modulate(x, shift, scale[:1], seg)
    with pytest.raises(ValueError, match="dtype"):
        layernorm_modulate(x, shift.double(), scale, seg)
    with pytest.raises(ValueError, match="seg must be"):
        layernorm_modulate(x, shift, scale, seg.float())
    with pytest.raises(ValueError, match="y must be"):
        gated_residual(x, x[:3], gate, seg)
    with pytest.raises(ValueError, match="not both"):
        gated_residual(x, x, gate, seg, inplace=True, out=torch.empty_like(x))


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_shapes_gpu(dtype, check_close):
    n, c = 2 * 9600, 3072  # image rows of 640 px / 4 layers, cond + uncond
    x, (shift, scale, gate, *_), seg = make_inputs(n, c, 2, dtype, "cuda")
    check_close(layernorm_modulate(x, shift, scale, seg), layernorm_modulate_ref(x, shift, scale, seg))
    if dtype == torch.bfloat16:
        q, q_scale = layernorm_modulate_fp8(x, shift, scale, seg)
        unfused = quantize_rows_ref(layernorm_modulate(x, shift, scale, seg))
        assert_same_quantization(q, q_scale, *unfused, exact=False)
    y = torch.randn_like(x)
    check_close(gated_residual(x, y, gate, seg, inplace=False), gated_residual_ref(x, y, gate, seg, inplace=False))
