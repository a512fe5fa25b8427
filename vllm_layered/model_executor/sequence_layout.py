"""The shape of one sequence of a packed forward: its text length, layer count and latent size.

Its own module because both the packed batch (forward_batch.py) and the Layer3D positions (rope.py) read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SequenceLayout:
    """Shape of one sequence: ``height`` and ``width`` count 2x2 latent patches (pixels / 16)."""

    text_len: int
    layers: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.text_len < 1 or self.layers < 1 or self.height < 1 or self.width < 1:
            raise ValueError(f"invalid sequence layout {self}")

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def noisy_tokens(self) -> int:
        """Tokens of the composite frame plus the ``layers`` RGBA frames."""
        return (self.layers + 1) * self.frame_tokens

    @property
    def image_tokens(self) -> int:
        """Noisy tokens plus the condition frame."""
        return (self.layers + 2) * self.frame_tokens

    @property
    def total_tokens(self) -> int:
        return self.text_len + self.image_tokens
