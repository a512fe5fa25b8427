"""FP8 (e4m3) attention for the transformer: the opt-in ``attention_dtype="fp8"``, on top of ``quantization="fp8"``.

In each JointAttention the QK-norm + RoPE kernel writes Q and K as e4m3 with static per-layer scales (derived from
the norm weights once, by `set_attention_dtype`), V is projected as before, centered on its per-sequence mean and
quantized per sequence, attention runs on cuDNN's FP8 kernel (kernels/cudnn_fp8_attention.py; on other devices the
PyTorch reference of the same math), and one pass adds the mean back to its e4m3 output and quantizes the rows for
both FP8 output projections. The scales and why they cannot overflow: kernels/fp8_attention.py.

Why only with FP8 GEMMs: on Hopper cuDNN writes FP8 attention's output only as e4m3, which an FP8 projection reads
as it is; a bf16 projection would need a dequantize pass over it, giving part of the gain back. The reverse, FP8
GEMMs with bf16 attention, is the default of ``quantization="fp8"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from vllm_layered.kernels.cudnn_fp8_attention import (
    MIN_CAPABILITY,
    cudnn_fp8_attention,
    cudnn_frontend_error,
    key_buffer,
)
from vllm_layered.kernels.fp8_attention import (
    Fp8AttentionScales,
    fp8_attention_ref,
    qk_scale,
    quantize_v,
    quantize_v_ref,
    restore_mean,
    restore_mean_ref,
    sequence_stats,
    sequence_stats_ref,
)
from vllm_layered.kernels.triton_utils import use_triton
from vllm_layered.model_executor.models.fp8_linear import Fp8Linear, Fp8Rows

if TYPE_CHECKING:
    from vllm_layered.model_executor.forward_batch import PackedMetadata
    from vllm_layered.model_executor.parallel.ulysses import HeadsInFlight

ATTENTION_DTYPES = ("bf16", "fp8")


@dataclass(frozen=True)
class Fp8AttentionLayer:
    """One JointAttention's static FP8 scales: Q's and K's (powers of two) as floats for the QK-norm kernel, and as
    one-value float32 tensors on the weights' device for cuDNN (its descale_q, descale_k)."""

    q_scale: float
    k_scale: float
    q_descale: torch.Tensor
    k_descale: torch.Tensor

    @classmethod
    def from_attention(cls, attn: nn.Module) -> Fp8AttentionLayer:
        """The scales of ``attn``'s joint Q (image and text rows: both norm weights) and joint K."""
        q_scale = qk_scale([attn.norm_q.weight, attn.norm_added_q.weight], attn.head_dim)
        k_scale = qk_scale([attn.norm_k.weight, attn.norm_added_k.weight], attn.head_dim)
        device = attn.norm_q.weight.device
        return cls(q_scale, k_scale, *(torch.full((1,), s, dtype=torch.float32, device=device)
                                       for s in (q_scale, k_scale)))


def check_attention_dtype(attention_dtype: str | None, quantization: str | None, device: torch.device | str) -> str:
    """Validate the option before anything loads: "bf16" (also for None) or "fp8".

    FP8 attention needs ``quantization="fp8"`` (see the module docstring) and, on CUDA, a Hopper or newer GPU and the
    cuDNN frontend package. Other devices run the PyTorch reference: right numbers, no speed-up.
    """
    if attention_dtype is None or attention_dtype == "bf16":
        return "bf16"
    if attention_dtype not in ATTENTION_DTYPES:
        raise ValueError(f"unknown attention dtype {attention_dtype!r}; choose one of {', '.join(ATTENTION_DTYPES)}")
    if quantization != "fp8":
        raise ValueError(
            "attention_dtype='fp8' needs quantization='fp8' (--quantization fp8): FP8 attention writes e4m3 output "
            "for the FP8 output projections; bf16 projections would need a dequantize pass over it"
        )
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"attention_dtype='fp8' on {device}: CUDA is not available")
        capability = tuple(torch.cuda.get_device_capability(device))
        if capability < MIN_CAPABILITY:
            raise ValueError(
                f"attention_dtype='fp8' needs cuDNN's FP8 attention, which runs on Hopper (compute capability 9.0) "
                f"or newer: H100, H200, B200; {device} has compute capability {capability[0]}.{capability[1]}"
            )
        error = cudnn_frontend_error()
        if error is not None:
            raise ValueError(f"attention_dtype='fp8' needs {error}")
    return "fp8"


def set_attention_dtype(model: nn.Module, attention_dtype: str) -> None:
    """Switch every ``model.transformer_blocks`` attention to ``attention_dtype`` ("bf16" or "fp8") in place and record
    it as ``model.attention_dtype``. FP8 derives each layer's static Q/K scales from its loaded norm weights, and
    needs the FP8 output projections of quantization="fp8" (ValueError otherwise)."""
    if attention_dtype not in ATTENTION_DTYPES:
        raise ValueError(f"unknown attention dtype {attention_dtype!r}; choose one of {', '.join(ATTENTION_DTYPES)}")
    for i, block in enumerate(model.transformer_blocks):
        attn = block.attn
        if attention_dtype == "fp8" and not all(isinstance(m, Fp8Linear) for m in (attn.to_out[0], attn.to_add_out)):
            raise ValueError(f"transformer_blocks.{i}: FP8 attention needs the FP8 output projections of "
                             "quantization='fp8'")
        attn.fp8_attention = Fp8AttentionLayer.from_attention(attn) if attention_dtype == "fp8" else None
    model.attention_dtype = attention_dtype


def fp8_joint_attention(
    q: torch.Tensor | HeadsInFlight, k: torch.Tensor | HeadsInFlight, v: torch.Tensor, layer: Fp8AttentionLayer,
    meta: PackedMetadata,
) -> Fp8Rows:
    """Attention over the joint buffers [rows, H, D]: q and k e4m3 (written with ``layer``'s scales), v in the
    projection's dtype, centered on its per-sequence mean and quantized here with one scale per sequence; the mean is
    added back to the output, whose rows are quantized for the FP8 output projections (kernels/fp8_attention.py says
    why V is centered).

    Sequence parallel (``meta.ulysses``): a rank holds a range of the joint rows, and q and k are their all-to-alls
    to a share of the heads, in flight (JointAttention.forward starts them). The group all-reduces the per-sequence
    amax(V) and each rank's share of V's mean (every rank then attends over every row with the same scales and
    means), and the all-to-alls move e4m3 bytes.
    """
    exchange = meta.ulysses
    row_offset = 0 if exchange is None else exchange.row_range[0]
    rows = v.view(meta.total_tokens, -1)
    kernels = use_triton(v)  # Triton kernels, or their PyTorch references where Triton cannot run
    amax, mean = (sequence_stats if kernels else sequence_stats_ref)(rows, meta.seq_bounds, meta.cu_seqlens,
                                                                      row_offset)
    if exchange is not None:  # each rank's mean is its rows' sum over the whole length: the group adds them up
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=exchange.group)
        dist.all_reduce(mean, op=dist.ReduceOp.SUM, group=exchange.group)
    # one rank: V's codes, like K's, in a key_buffer, whose zero rows after the last sequence its key window reads
    v8 = None if exchange is not None else key_buffer(v.shape, v.device)
    codes = None if v8 is None else v8[: meta.total_tokens].view(rows.shape)
    quantized = (quantize_v if kernels else quantize_v_ref)(rows, amax, meta.cu_seqlens, row_offset, mean, codes)
    if exchange is not None:
        q, k, v8 = q.wait(), k.wait(), exchange.scatter_heads(quantized.data.view(v.shape))
    scales = Fp8AttentionScales(layer.q_descale, layer.k_descale, quantized.scale, quantized.o_inv)
    out = (cudnn_fp8_attention if q.is_cuda else fp8_attention_ref)(q, k, v8, scales, meta.seq_bounds)
    if exchange is not None:
        out = exchange.gather_heads(out)
    restored = (restore_mean if kernels else restore_mean_ref)(
        out.view(meta.total_tokens, -1), quantized.o_row_scale, mean, meta.cu_seqlens, row_offset)
    return Fp8Rows(*restored, v.dtype)

