"""What one request may ask of the server (set from `vllm-layered serve` flags)."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_layered.serving.protocol import APIError


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for. ``request_timeout_s``: deadline handed to the engine (None: none)."""

    max_upload_bytes: int = 32 << 20
    max_pixels: int = 40_000_000
    max_n: int = 4
    request_timeout_s: float | None = None
    sse_heartbeat_s: float = 10.0
    png_compress_level: int = 1

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1 or self.max_pixels < 1 or self.max_n < 1:
            raise ValueError("max_upload_bytes, max_pixels and max_n must be positive")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level must be 0-9, got {self.png_compress_level}")

    def check_n(self, n: int) -> None:
        """Refuse more decompositions per request than ``max_n`` (a 400 on ``n``)."""
        if n > self.max_n:
            raise APIError(400, f"n must be between 1 and {self.max_n}, got {n}", code="invalid_value", param="n")
