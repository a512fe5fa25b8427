"""A request's life in the engine: what the caller submits, what it gets back, and its state.

WAITING -> PREPROCESSING -> DENOISING -> DECODING -> FINISHED, or CANCELLED / EXPIRED / FAILED from any
state. PREPROCESSING, DENOISING and DECODING are "running" (they hold engine resources). Progress events and
the final output reach the caller through its RequestHandle.

A request with refinements (layer_tree.py) is a tree of decompositions, still ONE request: one place in the
queue, one deadline, one cancellation, one result. Each decomposition (``NodeRun``: the root, or the refinement
of one layer) goes through preprocessing, denoising and decoding of its own; a refinement starts when the layer
it refines has been decoded, and the request finishes when every planned decomposition has. Its status is the
stage of its latest transition.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from PIL import Image

from vllm_layered.layer_tree import Box, LayerTree, Refinement, TreeJob
from vllm_layered.model_executor.denoise import DenoiseState
from vllm_layered.model_executor.image_processing import ConditionImage
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
    """What a caller submits. ``deadline`` is a time.monotonic() instant; ``priority``: higher runs first.

    ``refine``: layers to decompose again (layer_tree.py), checked at submit. Every refinement takes the
    request's params with its own layer count; a refinement without a prompt has its input captioned."""

    request_id: str
    image: ConditionImage
    params: GenerationParams = field(default_factory=GenerationParams)
    prompt: str | None = None
    negative_prompt: str | None = " "
    seed: int | None = None
    tenant: str = "default"
    priority: int = 0
    deadline: float | None = None
    refine: Sequence[Refinement] = ()


@dataclass
class ProgressEvent:
    """kind: 'queued' (with queue_position), 'started', 'step' (step of num_steps), 'decoding'. ``node``: the
    layer path whose refinement steps or decodes (None: the root decomposition, or the request as a whole)."""

    kind: str
    step: int = 0
    num_steps: int = 0
    queue_position: int | None = None
    node: str | None = None


@dataclass
class RequestOutput:
    """``layers``: the root decomposition's, bottom first; ``prompt``: the one it used. ``tree``: every
    decomposition of the request (None where the output did not come from this engine: the vLLM-Omni route)."""

    request_id: str
    layers: list[Image.Image]
    prompt: str
    timings: dict[str, float]
    tree: LayerTree | None = None


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
    """Engine-internal state of one request (compared by identity).

    ``runs``: its decompositions started and not yet decoded; ``pending``: the refinements not started yet,
    parents first; ``tree``: what is decoded so far (from the root's decode on); ``seed``: the root's (the
    request's, or drawn at admission; the refinements' derive from it). Timings are the request's:
    ``denoise_start`` when its first decomposition was ready to denoise, ``decode_start`` when its latest
    decode began."""

    request: LayeredRequest
    handle: RequestHandle
    pending: list[Refinement] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    seed: int | None = None
    runs: list[NodeRun] = field(default_factory=list)
    tree: LayerTree | None = None
    start_time: float | None = None
    denoise_start: float | None = None
    decode_start: float | None = None
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


@dataclass(eq=False)
class NodeRun:
    """One decomposition of a request in the engine (compared by identity): the root (``job.path`` None) or the
    refinement of layer ``job.path``, whose input was cropped from ``box`` of the root canvas. ``tokens``: what it
    adds to a forward, estimated before its prompt is encoded; ``state`` from its preprocessing until decoded."""

    entry: EngineRequest
    job: TreeJob
    tokens: int
    box: Box | None = None
    state: DenoiseState | None = None
    prompt: str = ""
    last_step: float = 0.0  # when it last took a denoising step (or became ready to)

    @property
    def path(self) -> str | None:
        return self.job.path

    @property
    def params(self) -> GenerationParams:
        return replace(self.entry.request.params, layers=self.job.layers)
