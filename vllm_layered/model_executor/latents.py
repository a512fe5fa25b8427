"""2x2 patch packing of latent frames into transformer tokens, and back.

A frame [C, 2h, 2w] becomes h*w tokens of C*4 channels in (c, py, px) order; frames are stacked
frame-major, then row, then column, as the reference pipeline does.
"""

from __future__ import annotations

import torch


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """[F, C, 2h, 2w] -> [F*h*w, C*4]."""
    f, c, hh, ww = z.shape
    if hh % 2 or ww % 2:
        raise ValueError(f"latent height and width must be even, got {hh}x{ww}")
    z = z.view(f, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(f * (hh // 2) * (ww // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """[F*h*w, C*4] -> [F, C, 2h, 2w] for ``height`` x ``width`` patches per frame."""
    c = tokens.shape[-1] // 4
    z = tokens.view(frames, height, width, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(frames, c, height * 2, width * 2)
