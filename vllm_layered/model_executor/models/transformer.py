"""Qwen-Image-Layered transformer (VLD-MMDiT) over packed batches.

60 dual-stream blocks: image and text tokens keep separate weights (AdaLN modulation, QKV, output
projection, MLP) and meet in one joint attention per sequence. The Layered variant adds the Layer3D
RoPE and an additional timestep condition embedding. Parameter names follow diffusers'
``QwenImageTransformer2DModel`` so the official ``transformer/`` folder loads as is.

Shapes: activations are flat per stream, image [N_img, C] and text [N_txt, C]; modulation is per
sequence [S, C] and reaches tokens through their segment id (see forward_batch.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vllm_layered.kernels import adaln, qk_norm_rope
from vllm_layered.kernels.attention import attention
from vllm_layered.kernels.cudnn_fp8_attention import key_buffer
from vllm_layered.kernels.fp8 import FP8_DTYPE
from vllm_layered.kernels.triton_utils import use_triton
from vllm_layered.model_executor.forward_batch import ForwardBatch, PackedMetadata
from vllm_layered.model_executor.model_loader.weight_loader import install_weights, load_component
from vllm_layered.model_executor.models.fp8_attention import (
    Fp8AttentionLayer,
    check_attention_dtype,
    fp8_joint_attention,
    set_attention_dtype,
)
from vllm_layered.model_executor.models.fp8_linear import (
    Fp8Linear,
    Fp8Rows,
    check_quantization,
    fp8_input,
    quantize_activation,
    quantize_fp8,
)

if TYPE_CHECKING:
    from vllm_layered.model_executor.parallel.ulysses import HeadsInFlight

METADATA_CACHE_SIZE = 4  # distinct packed layouts kept (the engine's running set changes now and then)
MODULATION_CACHE_SIZE = 4  # distinct schedules whose modulation tables are kept (most requests share a few)


@dataclass(frozen=True)
class TransformerConfig:
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    use_additional_t_cond: bool = True
    use_layer3d_rope: bool = True
    zero_cond_t: bool = False
    guidance_embeds: bool = False
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not self.use_layer3d_rope:
            raise ValueError("only the Layered variant (use_layer3d_rope=true) is supported")
        if self.zero_cond_t or self.guidance_embeds:
            raise ValueError("zero_cond_t and guidance_embeds are not used by Qwen-Image-Layered")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to {self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_json(cls, path: str | Path) -> TransformerConfig:
        raw = json.loads(Path(path).read_text())
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in raw.items() if k in known}
        if "axes_dims_rope" in kwargs:
            kwargs["axes_dims_rope"] = tuple(kwargs["axes_dims_rope"])
        return cls(**kwargs)


class RMSNorm(nn.Module):
    """RMSNorm with a weight; statistics in float32, output rounded as diffusers' RMSNorm does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear; names net.0.proj / net.2 as in diffusers."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if isinstance(self.net[2], Fp8Linear):  # FP8: GELU fused into the quantization of net.2's input
            return self.net[2](quantize_activation(self.net[0].proj(x), gelu=True))
        return self.net[2](self.net[0](x))


class _GELUProj(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GELU in the GEMM epilogue (cuBLASLt's GELU is the tanh form): one pass less over 4C
        if x.is_cuda and isinstance(self.proj, nn.Linear):
            return torch._addmm_activation(self.proj.bias, x, self.proj.weight.t(), use_gelu=True)
        return F.gelu(self.proj(x), approximate="tanh")


class JointAttention(nn.Module):
    """QKV for both streams, QK RMSNorm + Layer3D RoPE, block-diagonal joint attention, out proj.

    With ``fp8_attention`` set (models/fp8_attention.set_attention_dtype), Q and K are written as e4m3 and attention
    runs in FP8, its e4m3 output going to the FP8 output projections as is.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        dim, head_dim = config.inner_dim, config.attention_head_dim
        self.num_heads = config.num_attention_heads
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, config.eps), RMSNorm(head_dim, config.eps)
        self.norm_added_q = RMSNorm(head_dim, config.eps)
        self.norm_added_k = RMSNorm(head_dim, config.eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)
        self.backend = "auto"  # attention backend, see vllm_layered.kernels.attention
        self.fp8_attention: Fp8AttentionLayer | None = None

    def forward(
        self, img: torch.Tensor | Fp8Rows, txt: torch.Tensor | Fp8Rows, meta: PackedMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # img, txt: the modulated streams, quantized once for Q, K and V when the projections are FP8 (see
        # DualStreamBlock; an FP8 projection given bf16 rows quantizes them itself)
        # q, k, v: [S_total, H, D] joint buffers, each sequence's rows ordered [text, image]
        fp8 = self.fp8_attention
        heads = (-1, self.num_heads, self.head_dim)
        shape = (meta.total_tokens, self.num_heads, self.head_dim)
        q = torch.empty(shape, dtype=img.dtype if fp8 is None else FP8_DTYPE, device=img.device)
        # FP8 on one rank: K with zero rows after the last sequence, so that every key window reads in place
        k = torch.empty_like(q) if fp8 is None or meta.ulysses is not None else key_buffer(shape, img.device)
        v = torch.empty(shape, dtype=img.dtype, device=img.device)
        q_scale, k_scale = (None, None) if fp8 is None else (fp8.q_scale, fp8.k_scale)  # FP8: e4m3 Q and K
        norm_rope = qk_norm_rope.qk_norm_rope if use_triton(v) else qk_norm_rope.qk_norm_rope_ref
        streams = (
            (img, meta.img_rows, meta.img_spans, (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k),
             (meta.img_cos, meta.img_sin)),
            (txt, meta.txt_rows, meta.txt_spans, (self.add_q_proj, self.add_k_proj, self.add_v_proj),
             (self.norm_added_q, self.norm_added_k), (meta.txt_cos, meta.txt_sin)),
        )
        for x, rows, _, (proj_q, proj_k, _), (norm_q, norm_k), (cos, sin) in streams:
            norm_rope(proj_q(x).view(heads), norm_q.weight, cos, sin, eps=norm_q.eps, out=q, out_rows=rows,
                      out_scale=q_scale)
            norm_rope(proj_k(x).view(heads), norm_k.weight, cos, sin, eps=norm_k.eps, out=k, out_rows=rows,
                      out_scale=k_scale)
        if meta.ulysses is not None:  # sequence parallel: Q's and K's all-to-alls run while V is projected
            q, k = (meta.ulysses.start_scatter(t) for t in (q, k))
        for x, _, spans, (_, _, proj_v), _, _ in streams:
            linear_spans(x, proj_v, spans, v.view(meta.total_tokens, -1), to_joint=True)
        if fp8 is not None:
            out = fp8_joint_attention(q, k, v, fp8, meta)  # e4m3 rows and their scale, for both projections
        else:
            out = self._attention(q, k, v, meta).view(meta.total_tokens, -1)
            out = fp8_input(out, self.to_out[0], self.to_add_out)  # FP8 GEMMs: quantized once for both
        img_out = linear_spans(out, self.to_out[0], meta.img_spans, v.new_empty(img.shape), to_joint=False)
        txt_out = linear_spans(out, self.to_add_out, meta.txt_spans, v.new_empty(txt.shape), to_joint=False)
        return img_out, txt_out

    def _attention(self, q: torch.Tensor | HeadsInFlight, k: torch.Tensor | HeadsInFlight, v: torch.Tensor,
                   meta: PackedMetadata) -> torch.Tensor:
        # q, k: the joint buffers, or with sequence parallelism (meta.ulysses) their all-to-alls in flight
        exchange = meta.ulysses
        if exchange is not None:  # every row of the joint buffer, a share of the heads
            q, k, v = q.wait(), k.wait(), exchange.scatter_heads(v)
        out = attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, backend=self.backend, bounds=meta.seq_bounds)
        return out if exchange is None else exchange.gather_heads(out)


def linear_spans(
    x: torch.Tensor | Fp8Rows,
    linear: nn.Linear | Fp8Linear,
    spans: tuple[tuple[int, int, int], ...],
    out: torch.Tensor,
    *,
    to_joint: bool,
) -> torch.Tensor:
    """``linear`` applied span by span between a stream and the joint buffer, each GEMM writing straight
    into its rows of ``out`` (no gather/scatter pass). Spans: (stream row, joint row, length)."""
    for stream_row, joint_row, n in spans:
        src, dst = (stream_row, joint_row) if to_joint else (joint_row, stream_row)
        if isinstance(linear, Fp8Linear):
            linear.addmm_into(x[src : src + n], out[dst : dst + n])
        else:
            torch.addmm(linear.bias, x[src : src + n], linear.weight.t(), out=out[dst : dst + n])
    return out


def modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg: torch.Tensor, *, fp8: bool = False
) -> torch.Tensor | Fp8Rows:
    """LayerNorm without affine, then per-sequence AdaLN: norm(x) * (1 + scale[seg]) + shift[seg]; quantized for
    FP8 linears in the same pass with ``fp8``."""
    if fp8:
        fn = adaln.layernorm_modulate_fp8 if use_triton(x) else adaln.layernorm_modulate_fp8_ref
        return Fp8Rows(*fn(x, shift, scale, seg), x.dtype)
    fn = adaln.layernorm_modulate if use_triton(x) else adaln.layernorm_modulate_ref
    return fn(x, shift, scale, seg)


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """x + gate[seg] * y, written into x."""
    fn = adaln.gated_residual if use_triton(x) else adaln.gated_residual_ref
    return fn(x, y, gate, seg)


def gated_add_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    seg: torch.Tensor, *, fp8: bool = False,
) -> torch.Tensor | Fp8Rows:
    """`gated_add` (into x), then `modulate` of the result, in one pass over x."""
    fn = adaln.gated_residual_modulate if use_triton(x) else adaln.gated_residual_modulate_ref
    out = fn(x, y, gate, shift, scale, seg, fp8=fp8)
    return Fp8Rows(*out, x.dtype) if fp8 else out


class DualStreamBlock(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        dim = config.inner_dim
        # SiLU then Linear, named img_mod.1 as in the checkpoint. The SiLU of the timestep embedding is the same for
        # every block, and the linears depend on the timestep alone: LayeredTransformer.modulation runs all blocks'
        # img_mod[1] and txt_mod[1] at once, per forward or once for a request's whole schedule
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(config)
        self.img_mlp = FeedForward(dim, 4 * dim)
        self.txt_mlp = FeedForward(dim, 4 * dim)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, modulation: torch.Tensor, meta: PackedMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # modulation: [2, S, 6C], this block's img_mod and txt_mod outputs (LayeredTransformer.modulation); each
        # [S, 6C] -> shift1, scale1, gate1, shift2, scale2, gate2, each [S, C]
        im = modulation[0].chunk(6, dim=-1)
        tm = modulation[1].chunk(6, dim=-1)
        si, st = meta.img_seg, meta.txt_seg
        fp8 = isinstance(self.attn.to_q, Fp8Linear)  # quantize_fp8 converts all of a block's projections or none
        img_attn, txt_attn = self.attn(
            modulate(img, im[0], im[1], si, fp8=fp8), modulate(txt, tm[0], tm[1], st, fp8=fp8), meta
        )
        # the attention residual and the MLP's norm in one pass over each stream
        img_mlp_in = gated_add_modulate(img, img_attn, im[2], im[3], im[4], si, fp8=fp8)
        txt_mlp_in = gated_add_modulate(txt, txt_attn, tm[2], tm[3], tm[4], st, fp8=fp8)
        img = gated_add(img, self.img_mlp(img_mlp_in), im[5], si)
        txt = gated_add(txt, self.txt_mlp(txt_mlp_in), tm[5], st)
        return img, txt


def timestep_features(timesteps: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal features of sigma*1000, cos first (flip_sin_to_cos, shift 0), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = 1000 * (timesteps[:, None].float() * freqs[None, :])
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """temb = MLP(sinusoid(sigma)) + Embedding(2)[t_cond]."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(config.inner_dim)
        self.addition_t_embedding = nn.Embedding(2, config.inner_dim)

    def forward(self, timesteps: torch.Tensor, t_cond: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # the reference rounds sigma to the activation dtype before the sinusoid
        feats = timestep_features(timesteps.to(dtype)).to(dtype)
        return self.timestep_embedder(feats) + self.addition_t_embedding(t_cond).to(dtype)


class OutputNorm(nn.Module):
    """AdaLayerNormContinuous: LayerNorm(x) * (1 + scale) + shift, with (scale, shift) from SiLU(temb)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb_silu: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(temb_silu).chunk(2, dim=-1)
        return modulate(x, shift, scale, seg)


class LayeredTransformer(nn.Module):
    def __init__(self, *, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.attention_dtype = "bf16"  # "fp8": see models/fp8_attention.set_attention_dtype
        self._metadata_cache: dict[tuple, PackedMetadata] = {}
        self._modulation_cache: dict[tuple, torch.Tensor] = {}
        dim = config.inner_dim
        self.time_text_embed = TimeTextEmbed(config)
        self.txt_norm = RMSNorm(config.joint_attention_dim, config.eps)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(DualStreamBlock(config) for _ in range(config.num_layers))
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.out_channels)

    def build_metadata(self, batch: ForwardBatch) -> PackedMetadata:
        """The packed metadata of ``batch``'s layouts, reused while they repeat (a request's layouts are the
        same at every step; building the RoPE tables on the host each step left the GPU idle ~10-100 ms)."""
        key = (tuple(batch.layouts), batch.image_tokens.device)
        meta = self._metadata_cache.pop(key, None)
        if meta is None:
            meta = PackedMetadata.build(
                batch.layouts,
                axes_dims=self.config.axes_dims_rope,
                theta=self.config.rope_theta,
                device=batch.image_tokens.device,
            )
        self._metadata_cache[key] = meta  # most recently used last
        while len(self._metadata_cache) > METADATA_CACHE_SIZE:
            self._metadata_cache.pop(next(iter(self._metadata_cache)))
        return meta

    def modulation(self, temb_silu: torch.Tensor) -> torch.Tensor:
        """Every block's AdaLN modulation (its img_mod and txt_mod linears) of SiLU(temb) rows [M, C]:
        [num_layers, 2 (image, text), M, 6C]. Each linear writes its block of the output in place."""
        blocks = self.transformer_blocks
        out = temb_silu.new_empty(len(blocks), 2, temb_silu.shape[0], 6 * self.config.inner_dim)
        for i, block in enumerate(blocks):
            for j, linear in enumerate((block.img_mod[1], block.txt_mod[1])):
                torch.addmm(linear.bias, temb_silu, linear.weight.t(), out=out[i, j])
        return out

    def modulation_table(self, timesteps: torch.Tensor, t_cond: torch.Tensor | None = None) -> torch.Tensor:
        """`modulation` for a request's whole schedule, computed once before its first step: model timesteps [T]
        (sampler.model_timestep) and their t_cond (zeros by default) -> [num_layers, 2, T, 6C], row t for step t.

        Why: the 120 modulation linears depend on the timestep alone, and with one or two rows per sequence they
        are bound by reading their weights (13.6 GB for the full model): a few ms of every forward, and on a
        CFG-parallel rank all of it for a single row. Here they read them once for all T steps. Tables are kept
        for the last `MODULATION_CACHE_SIZE` schedules, so requests with the same steps and bucketed size share one
        (4.4 MB per step for the full model). The rows are the same bits whichever caller asks, so the engine's
        forwards stay bit-equal to the offline pipeline's.
        """
        if t_cond is None:
            t_cond = torch.zeros(timesteps.shape, dtype=torch.long)
        if timesteps.dim() != 1 or t_cond.shape != timesteps.shape:
            raise ValueError(f"timesteps {tuple(timesteps.shape)} and t_cond {tuple(t_cond.shape)} must be one "
                             "equal-length row each")
        key = (tuple(timesteps.tolist()), tuple(t_cond.tolist()))
        table = self._modulation_cache.pop(key, None)
        if table is None:
            weight = self.proj_out.weight  # never quantized: the model's device and activation dtype
            temb = self.time_text_embed(timesteps.to(weight.device), t_cond.to(weight.device), weight.dtype)
            table = self.modulation(F.silu(temb))
        self._modulation_cache[key] = table  # most recently used last
        while len(self._modulation_cache) > MODULATION_CACHE_SIZE:
            self._modulation_cache.pop(next(iter(self._modulation_cache)))
        return table

    def forward(self, batch: ForwardBatch, meta: PackedMetadata | None = None) -> torch.Tensor:
        """Velocity prediction for the noisy tokens: [sum noisy_tokens, patch^2 * out_channels]."""
        meta = meta or self.build_metadata(batch)
        return self.run(batch.image_tokens, batch.text_embeds, batch.timesteps, batch.t_cond, meta, batch.modulation)

    def run(
        self,
        image_tokens: torch.Tensor,
        text_embeds: torch.Tensor,
        timesteps: torch.Tensor,
        t_cond: torch.Tensor,
        meta: PackedMetadata,
        modulation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The forward on explicit rows; a sequence-parallel rank passes its own rows (``PackedMetadata.shard``)
        and gets the velocity of the noisy tokens among them. ``modulation``: the sequences' rows of their
        modulation tables [num_layers, 2, S, 6C] (ForwardBatch.modulation), else computed here."""
        img = self.img_in(image_tokens)
        txt = self.txt_in(self.txt_norm(text_embeds))
        temb_silu = F.silu(self.time_text_embed(timesteps, t_cond, img.dtype))
        if modulation is None:
            modulation = self.modulation(temb_silu)
        expected = (len(self.transformer_blocks), 2, timesteps.shape[0], 6 * self.config.inner_dim)
        if tuple(modulation.shape) != expected:
            raise ValueError(f"modulation has shape {tuple(modulation.shape)}, this forward needs {expected}")
        for block, block_modulation in zip(self.transformer_blocks, modulation):
            img, txt = block(img, txt, block_modulation, meta)
        noisy = img[meta.noisy_rows]
        return self.proj_out(self.norm_out(noisy, temb_silu, meta.img_seg[meta.noisy_rows]))

    def load_weights(self, weights) -> set[str]:
        return install_weights(self, weights, component="transformer")

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        quantization: str | None = None,
        attention_dtype: str | None = None,
        load_format: str = "safetensors",
    ) -> LayeredTransformer:
        """Build on the meta device and stream a diffusers ``transformer/`` folder onto ``device``.

        ``quantization``: None / "none", or "fp8" (e4m3 weights and per-token activations for the blocks' big
        linears, see fp8_linear.py). ``attention_dtype``: None / "bf16", or "fp8" (FP8 attention, with
        quantization="fp8" only, see fp8_attention.py). Both are checked before anything loads.
        ``load_format="dummy"``: random weights (model_loader/dummy_loader.py).
        """
        quantization = check_quantization(quantization, device, dtype)
        attention_dtype = check_attention_dtype(attention_dtype, quantization, device)
        config = TransformerConfig.from_json(Path(folder) / "config.json")
        model = load_component(lambda: cls(config=config), folder, device=device, dtype=dtype,
                               component="transformer", load_format=load_format)
        if quantization == "fp8":
            quantize_fp8(model)
        if attention_dtype == "fp8":
            set_attention_dtype(model, attention_dtype)
        return model.eval()  # the FP8 modules swapped in are new, in training mode
