import pytest
import torch

from tests.reference import import_reference
from vllm_layered.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from vllm_layered.kernels.triton_utils import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_inputs(n, h, d, dtype, weight_dtype, device):
    x = (torch.randn(n, h, d) * 3 + 0.5).to(dtype).to(device)
    weight = (torch.rand(d) + 0.5).to(weight_dtype).to(device)
    angles = torch.randn(n, d // 2) * 4
    return x, weight, angles.cos().to(device), angles.sin().to(device)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, h, d", [(37, 3, 32), (5, 24, 128), (1, 1, 64)])
def test_matches_reference(n, h, d, dtype, weight_dtype, device, check_close):
    x, weight, cos, sin = make_inputs(n, h, d, dtype, weight_dtype, device)
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    result = qk_norm_rope(x, weight, cos, sin, eps=1e-6, out=out)
    assert result is out
    check_close(out, qk_norm_rope_ref(x, weight, cos, sin, eps=1e-6))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_rows_into_strided_joint_buffer(dtype, device, check_close):
    n, h, d, m = 23, 3, 32, 41
    # x is q out of a fused [N, 3, H, D] projection; out is q of a joint [M, 3, H, D] buffer
    qkv = (torch.randn(n, 3, h, d) * 2).to(dtype).to(device)
    x = qkv[:, 0]
    _, weight, cos, sin = make_inputs(n, h, d, dtype, dtype, device)
    joint = torch.full((m, 3, h, d), float("nan"), dtype=dtype, device=device)
    rows = torch.randperm(m)[:n].to(torch.int32).to(device)
    qk_norm_rope(x, weight, cos, sin, out=joint[:, 0], out_rows=rows)

    expected = qk_norm_rope_ref(x, weight, cos, sin)
    check_close(joint[rows.long(), 0], expected)
    untouched = torch.ones(m, dtype=torch.bool, device=device)
    untouched[rows.long()] = False
    assert joint[untouched].isnan().all(), "rows not named in out_rows were written"
    assert joint[:, 1:].isnan().all(), "the kernel wrote outside its slice of the joint buffer"


@needs_triton
def test_text_and_image_rows_fill_one_buffer(device, check_close):
    """The transformer's use: two calls (text, image) scatter into one joint [S_total, H, D] buffer."""
    h, d = 2, 32
    txt_rows = torch.tensor([0, 1, 2, 12, 13], dtype=torch.int32, device=device)
    img_rows = torch.tensor([r for r in range(20) if r not in (0, 1, 2, 12, 13)], dtype=torch.int32,
                            device=device)
    joint = torch.full((20, h, d), float("nan"), dtype=torch.bfloat16, device=device)
    for rows in (txt_rows, img_rows):
        x, weight, cos, sin = make_inputs(len(rows), h, d, torch.bfloat16, torch.bfloat16, device)
        qk_norm_rope(x, weight, cos, sin, out=joint, out_rows=rows)
        check_close(joint[rows.long()], qk_norm_rope_ref(x, weight, cos, sin))
    assert not joint.isnan().any()


def test_reference_matches_diffusers():
    """qk_norm_rope_ref is diffusers' RMSNorm followed by Qwen-Image's complex RoPE, bit for bit."""
    diffusers_norm = import_reference("diffusers.models.normalization")
    qwen = import_reference("diffusers.models.transformers.transformer_qwenimage")
    n, h, d = 19, 3, 32
    for dtype, weight_dtype in [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]:
        x, weight, cos, sin = make_inputs(n, h, d, dtype, weight_dtype, "cpu")
        norm = diffusers_norm.RMSNorm(d, eps=1e-6).to(weight_dtype)
        norm.weight.data.copy_(weight)
        with torch.no_grad():
            expected = qwen.apply_rotary_emb_qwen(norm(x)[None], torch.complex(cos, sin), use_real=False)[0]
        torch.testing.assert_close(qk_norm_rope_ref(x, weight, cos, sin), expected, rtol=0, atol=0)


@needs_triton
def test_bad_inputs_raise_value_error(device):
    x, weight, cos, sin = make_inputs(7, 2, 32, torch.float32, torch.float32, device)
    with pytest.raises(ValueError, match="x must be"):
        qk_norm_rope(x[0], weight, cos, sin)
    with pytest.raises(ValueError, match="cos must be"):
        qk_norm_rope(x, weight, cos[:3], sin)
    with pytest.raises(ValueError, match="float32"):
        qk_norm_rope(x, weight, cos.half(), sin)
    with pytest.raises(ValueError, match="weight"):
        qk_norm_rope(x, weight[:16], cos, sin)
    with pytest.raises(ValueError, match="out_rows needs out"):
        qk_norm_rope(x, weight, cos, sin, out_rows=torch.arange(7, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="dtype"):
        qk_norm_rope(x, weight, cos, sin, out=torch.empty_like(x, dtype=torch.bfloat16))


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("n", [2 * 9856, 24776])
def test_real_shapes_gpu(n, check_close):
    h, d, m = 24, 128, n + 1000
    x, weight, cos, sin = make_inputs(n, h, d, torch.bfloat16, torch.bfloat16, "cuda")
    joint = torch.full((m, h, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    rows = torch.randperm(m, device="cuda")[:n].to(torch.int32)
    qk_norm_rope(x, weight, cos, sin, out=joint, out_rows=rows)
    check_close(joint[rows.long()], qk_norm_rope_ref(x, weight, cos, sin))
    x32, weight32 = x.float(), weight.float()
    check_close(qk_norm_rope(x32, weight32, cos, sin), qk_norm_rope_ref(x32, weight32, cos, sin))
