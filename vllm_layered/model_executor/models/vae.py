"""The RGBA-VAE of Qwen-Image-Layered, run one frame at a time.

The checkpoint is diffusers' ``AutoencoderKLQwenImage`` (a causal video VAE, here with 4 input/output
channels). Qwen-Image-Layered only ever feeds it single frames: the condition image is encoded on its own,
and every output layer is decoded as its own batch item. For one frame the video machinery collapses:

* a causal 3-D conv pads ``2 * p_t`` zero frames in front, so over one frame only the kernel's LAST
  temporal slice meets data: it equals a 2-D conv with ``weight[:, :, -1]``;
* the temporal up/down-sampling convs (``time_conv``) only act from the second chunk of frames on, so
  for one frame they are never used. Their weights are still declared so real checkpoints load.

Everything here therefore works on 4-D ``[B, C, H, W]`` tensors. Parameter names and shapes equal the
diffusers state dict, 5-D conv weights included.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vllm_layered.model_executor.model_loader.weight_loader import install_weights, load_component

# Defaults are diffusers' constructor defaults, so a config.json that omits a key means the same here.
_DEFAULT_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_DEFAULT_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class VAEConfig:
    """The keys of diffusers' ``vae/config.json`` for ``AutoencoderKLQwenImage``.

    ``temperal_downsample`` keeps diffusers' spelling so the JSON keys map one to one.
    ``dropout`` is accepted and ignored: the module only runs inference. ``attn_scales`` must be empty.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple[float, ...] = _DEFAULT_LATENTS_MEAN
    latents_std: tuple[float, ...] = _DEFAULT_LATENTS_STD

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"VAEConfig.{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("base_dim", "z_dim", "num_res_blocks", "input_channels"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive integer, got {value!r}")
        if not self.dim_mult or not all(_is_int(m) and m >= 1 for m in self.dim_mult):
            raise ValueError(f"VAEConfig.dim_mult must be non-empty positive integers, got {self.dim_mult!r}")
        if self.attn_scales:
            # The reference builds encoder attention blocks for these scales but its encoder then calls
            # them with cache arguments they do not take (TypeError): no checkpoint can use them.
            raise ValueError(f"VAEConfig.attn_scales must be empty, got {self.attn_scales!r}")
        if not all(isinstance(t, bool) for t in self.temperal_downsample):
            raise ValueError(f"VAEConfig.temperal_downsample must be booleans, got {self.temperal_downsample!r}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"VAEConfig.temperal_downsample has {len(self.temperal_downsample)} entries; "
                f"dim_mult {self.dim_mult!r} needs one per downsampling stage ({len(self.dim_mult) - 1})"
            )
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VAEConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if len(value) != self.z_dim or not all(_is_number(v) for v in value):
                raise ValueError(f"VAEConfig.{name} must be {self.z_dim} numbers (z_dim), got {value!r}")
        if not all(s > 0 for s in self.latents_std):
            raise ValueError(f"VAEConfig.latents_std must be positive, got {self.latents_std!r}")

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along each side (8 for the released model)."""
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_json(cls, path: str | Path) -> VAEConfig:
        """Read a diffusers ``vae/config.json``; ``_``-prefixed bookkeeping keys are ignored."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unsupported VAE config keys {unknown}")
        return cls(**data)


class CausalConv3d(nn.Module):
    """A causal 3-D conv's parameters, applied to single frames as a 2-D conv.

    With the causal zero padding in front, one frame only meets the kernel's last temporal slice.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int], padding: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, -1], self.bias, padding=self.padding)


def _conv3x3(in_channels: int, out_channels: int) -> CausalConv3d:
    return CausalConv3d(in_channels, out_channels, (3, 3, 3), padding=1)


class RMSNorm(nn.Module):
    """Channel RMS norm: ``x / ||x||_channels * sqrt(C) * gamma`` (normalised in float32 for low precision).

    ``gamma_rank`` is the gamma tensor's rank in the checkpoint: 4 for norms written for video tensors
    ``(C, 1, 1, 1)``, 3 for the attention norm ``(C, 1, 1)``.
    """

    def __init__(self, dim: int, gamma_rank: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(dim, *([1] * (gamma_rank - 1))))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
        normed = F.normalize(wide, dim=1).to(x.dtype)
        return normed * self.scale * self.gamma.view(-1, 1, 1)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim, 4)
        self.conv1 = _conv3x3(in_dim, out_dim)
        self.norm2 = RMSNorm(out_dim, 4)
        self.conv2 = _conv3x3(out_dim, out_dim)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, (1, 1, 1), padding=0) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h + skip


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, 3)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, HW, 3C]
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve H and W: pad one zero row/column at the bottom/right, then a stride-2 3x3 conv."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal:
            # Checkpoint weights of the temporal stride-2 conv; it never runs for a single frame.
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class Upsample(nn.Module):
    """Double H and W by pixel repetition, then a 3x3 conv that halves the channels.

    Nearest-neighbour copying is exact in any dtype, so unlike the reference no float32 round trip.
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )
        if temporal:
            # Checkpoint weights of the frame-doubling conv; it never runs for a single frame.
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv_in = _conv3x3(config.input_channels, dims[0])
        blocks: list[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(config.temperal_downsample):
                blocks.append(Downsample(out_dim, config.temperal_downsample[stage]))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1], 4)
        self.conv_out = _conv3x3(dims[-1], 2 * config.z_dim)  # posterior mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_resnets: int, upsample: Upsample | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_resnets)]
        )
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
        temporal_upsample = config.temperal_downsample[::-1]
        self.conv_in = _conv3x3(config.z_dim, dims[0])
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for stage, (in_dim, out_dim) in enumerate(pairwise(dims)):
            if stage > 0:
                in_dim //= 2  # the previous stage's upsampler halved the channels
            upsample = Upsample(out_dim, temporal_upsample[stage]) if stage < len(temporal_upsample) else None
            blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks + 1, upsample))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1], 4)
        self.conv_out = _conv3x3(dims[-1], config.input_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


class RGBAVAE(nn.Module):
    """Single-frame encoder/decoder with diffusers ``AutoencoderKLQwenImage`` weights."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, (1, 1, 1), padding=0)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, (1, 1, 1), padding=0)
        self.decoder = Decoder(config)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        load_format: str = "safetensors",
    ) -> RGBAVAE:
        """Build on meta, then stream a diffusers ``vae/`` folder (config.json + safetensors) in
        (``load_format="dummy"``: random weights)."""
        config = VAEConfig.from_json(Path(folder) / "config.json")
        return load_component(lambda: cls(config=config), folder, device=device, dtype=dtype, component="vae",
                              load_format=load_format)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Install a full checkpoint (diffusers names); raises WeightLoadError on any mismatch."""
        return install_weights(self, weights, component="vae")

    def _check_frames(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} expects single frames [B, {channels}, H, W], got shape {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C_in, H, W]`` in [-1, 1] -> posterior mode ``[B, z_dim, H/8, W/8]``, un-normalised."""
        self._check_frames(x, self.config.input_channels, "encode")
        factor = self.config.spatial_factor
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"encode needs H and W divisible by {factor}, got {tuple(x.shape[2:])}")
        h = self.encoder(x)
        # The mode is the posterior mean: the first z_dim output channels of quant_conv. Skip the rest.
        z = self.config.z_dim
        return F.conv2d(h, self.quant_conv.weight[:z, :, -1], self.quant_conv.bias[:z])

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Latents ``[B, z_dim, h, w]`` (not normalised) -> images ``[B, C_in, 8h, 8w]`` clamped to [-1, 1].

        ``batch_size`` bounds how many items run through the decoder at once (peak activation memory).
        """
        self._check_frames(z, self.config.z_dim, "decode")
        if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
            raise ValueError(f"decode batch_size must be a positive integer or None, got {batch_size!r}")
        if batch_size is None or batch_size >= z.shape[0]:
            return self._decode(z)
        factor = self.config.spatial_factor
        b, _, h, w = z.shape
        out = z.new_empty(b, self.config.input_channels, h * factor, w * factor)
        for start in range(0, b, batch_size):
            out[start : start + batch_size] = self._decode(z[start : start + batch_size])
        return out

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z)).clamp_(-1.0, 1.0)

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents_mean and latents_std as float32 tensors cast to z's dtype, shaped to broadcast on dim 1."""
        if z.ndim < 2 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"latents need {self.config.z_dim} channels on dim 1, got shape {tuple(z.shape)}")
        shape = (1, self.config.z_dim) + (1,) * (z.ndim - 2)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32).view(shape).to(z.device, z.dtype)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32).view(shape).to(z.device, z.dtype)
        return mean, std

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """``(z - mean) / std``: what the transformer sees (the reference's condition-image arithmetic)."""
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of normalize_latents with the reference's decode-side arithmetic: ``z / (1 / std) + mean``.

        The reciprocal is taken after casting std to z's dtype, as the reference does.
        """
        mean, std = self._latent_stats(z)
        return z / (1.0 / std) + mean
