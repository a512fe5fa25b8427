"""FP8 (e4m3) linears for the transformer's big GEMMs, the opt-in ``quantization="fp8"``.

The checkpoint still loads in bf16; `quantize_fp8` then swaps the selected ``nn.Linear`` of every block for an
`Fp8Linear`: weight [N, K] quantized once per output channel (e4m3 + float32 ``weight_scale`` [N]), bias kept in
bf16, the bf16 weight freed. Activations are quantized per token at run time (vllm_layered/kernels/fp8.py) and
multiplied by ``torch._scaled_mm`` with row-wise scales: 1.7x the bf16 GEMM rate on an H200 (1333 vs 784
TFLOP/s; benchmarks/RESULTS.md). Elsewhere (CPU) the float32 references compute the same math, so the
numerics and the wiring are testable.

Quantized: QKV, output projections and MLPs of both streams (24 C^2 of a block's 36 C^2 weights, nearly all of
its GEMM FLOPs). Kept in bf16: the AdaLN modulation linears (one row per sequence: weight-read bound, and their
shift/scale/gate steer every token), the embedders, norm_out and proj_out.

Inputs shared by several FP8 layers are quantized once: the stream rows read by Q, K and V (and those read by the
MLP) by the AdaLN kernel that writes them (kernels/adaln.layernorm_modulate_fp8), the joint attention output read
by both output projections by `fp8_input`; the MLP's GELU is fused into the quantization of the second linear's
input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm_layered.kernels.fp8 import fp8_gemm, fp8_gemm_ref, quantize_rows, quantize_rows_ref
from vllm_layered.kernels.triton_utils import use_triton

QUANTIZATIONS = ("none", "fp8")
FP8_LAYERS = (  # per DualStreamBlock, names as in the checkpoint
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm89), Hopper (sm90) and newer
_ALIGN = 16  # _scaled_mm: K and N multiples of 16; scale vectors kept 16-byte aligned


@dataclass(frozen=True)
class Fp8Rows:
    """Activation rows [M, K] of dtype ``dtype``, quantized once for the FP8 linears that read them: data [M, K]
    e4m3, scale [M] float32. ``shape``, ``dtype`` and ``device`` are the activation's, so code that sizes its
    outputs from its input takes either."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __getitem__(self, rows: slice) -> Fp8Rows:
        """A block of rows (what `linear_spans` takes per sequence). A scale vector starting off a 16-byte
        boundary is copied: GEMM libraries may load it with vector loads."""
        scale = self.scale[rows]
        if scale.data_ptr() % _ALIGN:
            scale = scale.clone()
        return Fp8Rows(self.data[rows], scale, self.dtype)


def quantize_activation(x: torch.Tensor, *, gelu: bool = False) -> Fp8Rows:
    """Per-token e4m3 quantization of x [M, K] (of GELU(tanh)(x) with ``gelu``): the Triton kernel on CUDA."""
    q, scale = (quantize_rows if use_triton(x) else quantize_rows_ref)(x, gelu=gelu)
    return Fp8Rows(q, scale, x.dtype)


class Fp8Linear(nn.Module):
    """y = x @ dequant(weight).T + bias with an e4m3 weight [N, K] and per-output-channel ``weight_scale`` [N]."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        out_dtype: torch.dtype,
        fast_accum: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_dtype = out_dtype
        self.fast_accum = fast_accum  # torch._scaled_mm's use_fast_accum (CUDA only)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, fast_accum: bool = False) -> Fp8Linear:
        """Quantize ``linear``'s weight per output channel; the output keeps the weight's dtype."""
        n, k = linear.weight.shape
        if n % _ALIGN or k % _ALIGN:
            raise ValueError(f"an FP8 linear needs in and out features divisible by {_ALIGN}, got {k} -> {n}")
        weight, scale = quantize_rows_ref(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, scale, bias, out_dtype=linear.weight.dtype, fast_accum=fast_accum)

    def _gemm(self, x: Fp8Rows, out: torch.Tensor | None) -> torch.Tensor:
        gemm = fp8_gemm if x.data.is_cuda else fp8_gemm_ref
        return gemm(x.data, x.scale, self.weight, self.weight_scale, self.bias, out_dtype=self.out_dtype, out=out,
                    fast_accum=self.fast_accum)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if isinstance(x, Fp8Rows):
            return self._gemm(x, None)
        y = self._gemm(quantize_activation(x.reshape(-1, x.shape[-1])), None)
        return y.view(*x.shape[:-1], self.out_features)

    def addmm_into(self, x: torch.Tensor | Fp8Rows, out: torch.Tensor) -> torch.Tensor:
        """The layer on rows x [M, K], written into out [M, N] (e.g. rows of a larger buffer), as
        ``torch.addmm(bias, x, weight.t(), out=out)`` does for a bf16 linear."""
        return self._gemm(x if isinstance(x, Fp8Rows) else quantize_activation(x), out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"out_dtype={self.out_dtype}, fast_accum={self.fast_accum}")


def fp8_input(x: torch.Tensor, *consumers: nn.Module) -> torch.Tensor | Fp8Rows:
    """x quantized once when every consumer is an Fp8Linear (each would quantize the same rows), else x."""
    if consumers and all(isinstance(m, Fp8Linear) for m in consumers):
        return quantize_activation(x)
    return x


def check_quantization(quantization: str | None, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Validate the option before anything loads: None for no quantization, else the method's name.

    FP8 on CUDA needs FP8 tensor cores (compute capability 8.9+) and a bf16 model (the scaled GEMM writes bf16
    with a bf16 bias). Other devices run the float32 reference: right numbers, no speed-up.
    """
    if quantization is None or quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < MIN_CAPABILITY:
            raise ValueError(
                f"quantization='fp8' needs FP8 tensor cores (compute capability 8.9 or newer: L4, L40S, H100, "
                f"H200, B200); {device} has compute capability {capability[0]}.{capability[1]}"
            )
        if dtype != torch.bfloat16:
            raise ValueError(f"quantization='fp8' on CUDA needs dtype bfloat16, got {dtype}")
    return quantization


@torch.no_grad()
def quantize_fp8(model: nn.Module, *, fast_accum: bool = True) -> list[str]:
    """Swap the `FP8_LAYERS` of every ``model.transformer_blocks`` entry for Fp8Linear, in place; returns the
    names of the converted layers. Raises ValueError where FP8 cannot run (checked once: every layer has
    ``proj_out``'s device and dtype) or a layer is not an nn.Linear.

    ``fast_accum`` (on by default) lets the FP8 tensor cores sum without periodic float32 promotion: on an H200
    the 640/4-layer CFG forward took 513 ms instead of 550, and its velocity moved from bf16's by 7.12e-2
    relative instead of 7.01e-2 (benchmarks/RESULTS.md); the e4m3 rounding of the inputs dominates the error."""
    weight = model.proj_out.weight  # never quantized; every layer shares its device and dtype
    check_quantization("fp8", weight.device, weight.dtype)
    converted = []
    for i, block in enumerate(model.transformer_blocks):
        for name in FP8_LAYERS:
            linear = block.get_submodule(name)
            full_name = f"transformer_blocks.{i}.{name}"
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"{full_name} is a {type(linear).__name__}, not an nn.Linear (quantized twice?)")
            layer = Fp8Linear.from_linear(linear, fast_accum=fast_accum)
            owner, _, attr = name.rpartition(".")
            setattr(block.get_submodule(owner), attr, layer)  # drops the bf16 weight
            converted.append(full_name)
    return converted
