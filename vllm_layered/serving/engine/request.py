"""A request's life in the engine: what the caller submits, what it gets back, and its state.

WAITING -> PREPROCESSING -> DENOISING -> DECODING -> FINISHED, or CANCELLED / EXPIRED / FAILED from any
state. PREPROCESSING, DENOISING and DECODING are "running" (they hold engine resources). Progress events and
the final output reach the caller through its RequestHandle.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from PIL import Image

from vllm_layered.model_executor.denoise import DenoiseState
from vllm_layered.model_executor.pipeline import GenerationParams


class EngineError(RuntimeError):
    """The engine could not finish a request for a reason that is not the client's fault."""


class EngineOverloadedError(EngineError):
    """The waiting queue is full (or the engine is shutting down); nothing was started."""


class RequestCancelledError(EngineError):
    """The request was cancelled (by the caller, a disconnect or shutdown)."""


class DeadlineExceededError(EngineError):
    """The request's deadline passed before it finished."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    PREPROCESSING = "preprocessing"
    DENOISING = "denoising"
    DECODING = "decoding"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.CANCELLED, RequestStatus.EXPIRED, RequestStatus.FAILED)


@dataclass
class LayeredRequest:
    """What a caller submits. ``deadline`` is a time.monotonic() instant; ``priority``: higher runs first."""

    request_id: str
    image: Image.Image
    params: GenerationParams = field(default_factory=GenerationParams)
    prompt: str | None = None
    negative_prompt: str | None = " "
    seed: int | None = None
    tenant: str = "default"
    priority: int = 0
    deadline: float | None = None


@dataclass
class ProgressEvent:
    """kind: 'queued' (with queue_position), 'started', 'step' (step of num_steps), 'decoding'."""

    kind: str
    step: int = 0
    num_steps: int = 0
    queue_position: int | None = None


@dataclass
class RequestOutput:
    request_id: str
    layers: list[Image.Image]
    prompt: str
    timings: dict[str, float]


class RequestHandle:
    """The caller's side of a request: progress events, the result, cancellation."""

    def __init__(self, request: LayeredRequest, engine_abort) -> None:
        self.request = request
        self._abort = engine_abort
        self._events: asyncio.Queue[ProgressEvent | None] = asyncio.Queue()
        self._result: asyncio.Future[RequestOutput] = asyncio.get_running_loop().create_future()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def stream(self) -> AsyncIterator[ProgressEvent]:
        """Progress events until the request ends (then await ``result()``)."""
        while (event := await self._events.get()) is not None:
            yield event

    async def result(self) -> RequestOutput:
        return await asyncio.shield(self._result)

    def cancel(self) -> bool:
        """True: the request will end cancelled (result() raises RequestCancelledError); False: it had
        already ended, and its outcome stands."""
        return self._abort(self.request_id)

    # engine side
    def _emit(self, event: ProgressEvent) -> None:
        self._events.put_nowait(event)

    def _finish(self, output: RequestOutput | None = None, error: BaseException | None = None) -> None:
        if self._result.done():
            return
        if error is not None:
            self._result.set_exception(error)
            self._result.exception()  # mark retrieved: a caller that only streams must not log a warning
        else:
            self._result.set_result(output)
        self._events.put_nowait(None)


@dataclass(eq=False)
class EngineRequest:
    """Engine-internal state of one request (compared by identity)."""

    request: LayeredRequest
    handle: RequestHandle
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    state: DenoiseState | None = None
    prompt: str = ""
    start_time: float | None = None
    denoise_start: float | None = None
    decode_start: float | None = None
    last_step: float = 0.0  # when it last took a denoising step (or became ready to)
    cancel_requested: bool = False

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def expired(self, now: float) -> bool:
        return self.request.deadline is not None and now > self.request.deadline

    def stop_reason(self, now: float) -> tuple[RequestStatus, EngineError] | None:
        """How the request must end now if it was cancelled or ran past its deadline (None: it goes on).
        The engine asks at every boundary of its work: between preprocessing stages, denoising steps and
        decoded chunks, and once more before it hands over a result."""
        if self.cancel_requested:
            return RequestStatus.CANCELLED, RequestCancelledError(f"request {self.request_id} was cancelled")
        if self.expired(now):
            return RequestStatus.EXPIRED, DeadlineExceededError(f"request {self.request_id} expired")
        return None
