import pytest
import torch

from vllm_layered.kernels import attention as attn
from vllm_layered.kernels.attention import (
    attention,
    attention_shape_bucket,
    clear_attention_backends,
    flex_attention_available,
    resolve_attention_backend,
    set_attention_backend,
    varlen_attention,
    varlen_attention_ref,
)
from vllm_layered.kernels.triton_utils import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_flex = pytest.mark.skipif(not flex_attention_available(), reason="this torch has no FlexAttention")


def packed(lengths, h, d, dtype, device, scale=1.0):
    """q, k, v [S_total, H, D] and cu_seqlens for sequences of the given lengths."""
    total = sum(lengths)
    q, k, v = ((torch.randn(total, h, d) * scale).to(dtype).to(device) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def reference(q, k, v, cu, max_seqlen, scale=None):
    """fp32 reference: low-precision results are compared with the exact math, not with SDPA's rounding."""
    return varlen_attention_ref(q.float(), k.float(), v.float(), cu, max_seqlen, scale=scale)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths, h, d", [([5, 17, 9], 3, 32), ([33, 1, 20], 2, 64), ([3, 18], 1, 128)])
def test_varlen_attention_matches_reference(lengths, h, d, dtype, device, check_close):
    q, k, v, cu = packed(lengths, h, d, dtype, device, scale=1.5)
    out = torch.full_like(q, float("nan"))  # poisoned: every row of every sequence must be written
    assert varlen_attention(q, k, v, cu, max(lengths), out=out) is out
    check_close(out, reference(q, k, v, cu, max(lengths)), dtype)


@needs_triton
def test_varlen_attention_custom_scale_empty_sequence_and_loose_max_seqlen(device, check_close):
    lengths = [6, 0, 19, 2]
    q, k, v, cu = packed(lengths, 2, 32, torch.float32, device)
    out = varlen_attention(q, k, v, cu, 40, scale=0.3)
    check_close(out, reference(q, k, v, cu, 40, scale=0.3))


@needs_triton
def test_varlen_attention_reads_strided_fused_qkv(device, check_close):
    lengths, h, d = [7, 12], 2, 32
    qkv = torch.randn(sum(lengths), 3, h, d, device=device)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 7, 19], dtype=torch.int32, device=device)
    check_close(varlen_attention(q, k, v, cu, 12), reference(q, k, v, cu, 12))


@needs_triton
def test_sequences_do_not_attend_to_each_other(device):
    """Changing one sequence's keys/values must not change another sequence's output."""
    q, k, v, cu = packed([9, 14], 2, 32, torch.float32, device)
    before = varlen_attention(q, k, v, cu, 14)
    k[9:] += 5.0
    v[9:] *= -3.0
    after = varlen_attention(q, k, v, cu, 14)
    assert torch.equal(before[:9], after[:9])
    assert not torch.allclose(before[9:], after[9:])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager flex on CPU
@pytest.mark.parametrize("backend", ["sdpa", "sdpa:math", "triton", "flex", "auto"])
def test_dispatcher_backends_agree(backend, device, check_close):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    if backend == "flex" and not flex_attention_available():
        pytest.skip("this torch has no FlexAttention")
    # equal-length runs (7, 7 and 7 again after a 3) exercise the batched SDPA calls
    lengths = [7, 7, 3, 7, 11]
    q, k, v, cu = packed(lengths, 3, 32, torch.float32, device)
    out = attention(q, k, v, cu, max(lengths), backend=backend)
    check_close(out, reference(q, k, v, cu, max(lengths)))


def test_unknown_backend_and_bad_cu_seqlens():
    q, k, v, cu = packed([4, 5], 1, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, cu, 5, backend="xformers")
    with pytest.raises(ValueError, match="unknown SDPA kernel"):
        attn.sdpa_varlen_attention(q, k, v, cu, sdpa_kernel="fast")
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        attention(q, k, v, torch.tensor([0, 5, 4], dtype=torch.int32), 5, backend="sdpa")
    with pytest.raises(ValueError, match="one shape"):
        attention(q, k[:3], v, cu, 5, backend="sdpa")


@needs_triton
def test_triton_rejects_unsupported_head_dim():
    q, k, v, cu = packed([4], 1, 48, torch.float32, "cpu")
    with pytest.raises(ValueError, match="head dim"):
        varlen_attention(q, k, v, cu, 4)


def test_auto_backend_resolution(monkeypatch):
    monkeypatch.delenv(attn.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU-X")
    clear_attention_backends()
    try:
        assert resolve_attention_backend("cpu", 24, 128, 9856) == "sdpa"
        assert resolve_attention_backend("cuda", 24, 128, 9856) == "sdpa"  # nothing measured yet
        set_attention_backend("flex")
        assert resolve_attention_backend("cuda", 24, 128, 9856) == "flex"
        set_attention_backend("sdpa:cudnn", device_name="GPU-X")
        assert resolve_attention_backend("cuda", 24, 128, 9856) == "sdpa:cudnn"
        set_attention_backend("triton", device_name="GPU-X", bucket=attention_shape_bucket(24, 128, 9856))
        assert resolve_attention_backend("cuda", 24, 128, 9000) == "triton"  # same power-of-two bucket
        assert resolve_attention_backend("cuda", 24, 128, 24776) == "sdpa:cudnn"
        monkeypatch.setenv(attn.ENV_VAR, "sdpa:flash")
        assert resolve_attention_backend("cuda", 24, 128, 9856) == "sdpa:flash"
        assert resolve_attention_backend("cpu", 24, 128, 9856) == "sdpa"
        monkeypatch.setenv(attn.ENV_VAR, "bogus")
        with pytest.raises(ValueError, match="unknown attention backend"):
            resolve_attention_backend("cuda", 24, 128, 9856)
        with pytest.raises(ValueError, match="unknown attention backend"):
            set_attention_backend("auto")
    finally:
        clear_attention_backends()


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("lengths", [[9856, 9856], [24776], [1000, 37, 4097]])
def test_real_shapes_gpu(lengths, check_close):
    q, k, v, cu = packed(lengths, 24, 128, torch.bfloat16, "cuda")
    expected = reference(q, k, v, cu, max(lengths))
    out = torch.full_like(q, float("nan"))
    varlen_attention(q, k, v, cu, max(lengths), out=out)
    check_close(out, expected, torch.bfloat16)
    for backend in ("sdpa", "sdpa:cudnn", "sdpa:flash"):
        check_close(attention(q, k, v, cu, max(lengths), backend=backend), expected, torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_fp32_gpu_is_exact(check_close):
    lengths = [300, 1, 777]
    q, k, v, cu = packed(lengths, 4, 128, torch.float32, "cuda")
    check_close(varlen_attention(q, k, v, cu, 777), reference(q, k, v, cu, 777))


@pytest.mark.gpu
@needs_cuda
@needs_flex
def test_flex_gpu(check_close):
    lengths = [700, 129, 1030]
    q, k, v, cu = packed(lengths, 4, 128, torch.bfloat16, "cuda")
    check_close(attention(q, k, v, cu, 1030, backend="flex"), reference(q, k, v, cu, 1030), torch.bfloat16)
