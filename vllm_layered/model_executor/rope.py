"""Layer3D rotary position embedding of Qwen-Image-Layered.

Every token has a (frame, row, col) position. Noisy frames take frame index 0..layers (0 is the
regenerated composite), the condition image takes -1; rows and cols are centred:
``-(h - h//2) .. h//2 - 1``. Text token ``i`` sits at ``max(h//2, w//2, layers+1) + i`` on all
three axes. Each axis owns a slice of the head dim (axes_dims, e.g. 16/56/56 -> 8+28+28 rotation
pairs); a pair (2k, 2k+1) is rotated by ``position * theta**(-2j/axis_dim)``.
"""

from __future__ import annotations

import torch

from vllm_layered.model_executor.sequence_layout import SequenceLayout


def _centred(n: int) -> torch.Tensor:
    return torch.arange(n) - (n - n // 2)


def layer3d_positions(layout: SequenceLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer positions: image [image_tokens, 3] (frame, row, col) and text [text_len, 3]."""
    h, w = layout.height, layout.width
    frames = torch.cat([torch.arange(layout.layers + 1), torch.tensor([-1])])
    grid = torch.stack(
        torch.meshgrid(frames, _centred(h), _centred(w), indexing="ij"), dim=-1
    ).reshape(-1, 3)
    text_start = max(h // 2, w // 2, layout.layers + 1)
    text = torch.arange(text_start, text_start + layout.text_len).unsqueeze(1).expand(-1, 3)
    return grid, text


def axis_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """The ``dim // 2`` rotation frequencies of one axis, float32."""
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))


def rope_cos_sin(
    positions: torch.Tensor, *, axes_dims: tuple[int, int, int], theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [N, sum(axes_dims) // 2] float32 for integer positions [N, 3]."""
    angles = torch.cat(
        [
            positions[:, axis, None].to(torch.float32) * axis_inv_freq(dim, theta)[None, :]
            for axis, dim in enumerate(axes_dims)
        ],
        dim=1,
    )
    return torch.cos(angles), torch.sin(angles)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [N, H, D] by the per-token angles (float32 math, x's dtype out)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)
