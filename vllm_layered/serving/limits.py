"""What one request may ask of the server (set from `vllm-layered serve` flags), and the work it asks for.

Work is counted in image token-forwards, before anything runs: one forward of a request processes
``(layers + 2) x (H / 16) x (W / 16)`` image tokens (the composite frame, the layers and the condition
frame, each (H/16) x (W/16) patches of its bucket W x H), a step is two forwards with CFG and one
without, and a request runs ``steps`` of them for each of its ``n`` decompositions. Text tokens (at most
1024 per forward) are left out: they are unknown until the prompt is encoded or captioned.

A request with refinements (layer_tree.py) runs one more decomposition per refinement, with that
refinement's layer count, the same steps and CFG. Its input, a crop of the layer, is resized to the same
resolution, so its bucket has about the root bucket's area (its aspect ratio moves the patch count by a
few percent): it is counted at the root bucket's patches, before any crop exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_layered.serving.protocol import APIError

# The largest request the model was trained for, as the official app sends it: 20 layers at 1024 (the
# widest 1024 bucket has 4320 patches), 50 steps with CFG, n = 1: 22 x 4320 x 2 x 50 = 9,504,000. Rounded
# up, the default admits it at every aspect ratio and refuses anything twice as large. By the cost model
# (docs/cost_model.md: 8e15 FLOP per forward, 100 forwards, 400-500 TFLOP/s) it is about half an hour
# of one H200.
DEFAULT_MAX_REQUEST_WORK = 10_000_000
# Twice that request's run time alone on an H200: only a request that waited long behind others or got
# stuck reaches it.
DEFAULT_REQUEST_TIMEOUT_S = 3600.0
# A 32 MB upload takes under 3 s at 100 Mbit/s; a client slower than about 1 MB/s is refused rather than
# holding its tenant's concurrency slot.
DEFAULT_BODY_TIMEOUT_S = 30.0


def request_work(
    *,
    layers: int,
    bucket: tuple[int, int],
    num_inference_steps: int,
    cfg: bool,
    n: int,
    refine_layers: Sequence[int] = (),
) -> int:
    """Image token-forwards of a request whose condition image has the bucket size ``bucket`` (W, H), with
    refinements into ``refine_layers`` layers each."""
    width, height = bucket
    frames = sum(count + 2 for count in (layers, *refine_layers))
    image_tokens = frames * (height // 16) * (width // 16)
    return image_tokens * (2 if cfg else 1) * num_inference_steps * n


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for.

    ``request_timeout_s``: deadline handed to the engine, from submission (None: none).
    ``body_timeout_s``: time to read a request body, from when the server starts reading it (None: none).
    ``max_request_work``: largest request_work of one request (None: no cap); a tenant's own cap replaces it.
    """

    max_upload_bytes: int = 32 << 20
    max_pixels: int = 40_000_000
    max_n: int = 4
    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S
    body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S
    max_request_work: int | None = DEFAULT_MAX_REQUEST_WORK
    sse_heartbeat_s: float = 10.0
    png_compress_level: int = 1

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1 or self.max_pixels < 1 or self.max_n < 1:
            raise ValueError("max_upload_bytes, max_pixels and max_n must be positive")
        for name in ("request_timeout_s", "body_timeout_s", "max_request_work"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level must be 0-9, got {self.png_compress_level}")

    def check_n(self, n: int) -> None:
        """Refuse more decompositions per request than ``max_n`` (a 400 on ``n``)."""
        if n > self.max_n:
            raise APIError(400, f"n must be between 1 and {self.max_n}, got {n}", code="invalid_value", param="n")

    def check_work(self, work: int, tenant: str, tenant_cap: int | None) -> None:
        """Refuse a request of more work than the tenant's cap, or else the server's (a 400, before any work)."""
        cap, whose = (tenant_cap, f"tenant {tenant!r}'s") if tenant_cap is not None else (self.max_request_work, "the")
        if cap is not None and work > cap:
            raise APIError(
                400,
                f"this request asks for {work:,} image token-forwards ((layers + 2) x image patches x 2 with CFG "
                f"x steps x n, summed over the decomposition and its refinements), over {whose} limit of {cap:,} "
                f"per request; ask for fewer layers, steps, decompositions, refinements or a lower resolution",
                code="work_limit_exceeded",
            )
