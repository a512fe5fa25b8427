"""AsyncLayeredEngine: continuous, step-level batching of Qwen-Image-Layered requests.

Threads and what runs where:
- the caller's asyncio loop: ``submit``/``abort`` and the RequestHandles (events, results);
- the step thread: admission, then ONE packed transformer forward over every running request
  (each with its own layers, resolution, text length, timestep, CFG) and their sampler steps;
- the aux thread (its own CUDA stream): preprocessing (image -> condition latents, prompt ->
  embeddings, auto-captions) and VAE decoding, so they overlap with denoising instead of stalling it.

Requests join the running set between steps (admitted in weighted-fair order while their tokens fit
twice the budget of one forward); each step takes those with the least remaining work that fit the
budget (scheduler.pick_step_batch). They leave when they finish, are cancelled or pass their deadline;
memory of a leaving request is dropped at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from vllm_layered.model_executor.forward_batch import SequenceLayout
from vllm_layered.model_executor.image_processing import bucket_size
from vllm_layered.model_executor.pipeline import LayeredPipeline
from vllm_layered.serving.engine.observer import EngineObserver
from vllm_layered.serving.engine.request import (
    DeadlineExceededError,
    EngineError,
    EngineOverloadedError,
    EngineRequest,
    LayeredRequest,
    ProgressEvent,
    RequestCancelledError,
    RequestHandle,
    RequestOutput,
    RequestStatus,
)
from vllm_layered.serving.engine.scheduler import (
    STEP_ORDERS,
    FairQueue,
    QueueFullError,
    StepCandidate,
    pick_step_batch,
)

logger = logging.getLogger(__name__)

ESTIMATED_TEXT_TOKENS = 256
ACTIVATION_BYTES_PER_TOKEN_PER_CHANNEL = 48  # peak activation bytes of one token, per model channel, bf16
# One 640/4-layer CFG request (19.6k tokens) already runs the GEMMs at the GPU's bf16 rate (H200,
# benchmarks/RESULTS.md): packing more tokens into a forward adds no throughput, it only makes every
# packed request wait for the others. So the default budget packs small requests together and runs
# large ones (nearly) alone.
SATURATING_TOKENS = 32768
# Admitted requests may hold this many forwards' worth of tokens: the next ones are preprocessed while
# others denoise, and a short request can overtake a long one at a step boundary (pick_step_batch).
ADMISSION_FACTOR = 2


@dataclass
class EngineConfig:
    """max_waiting bounds the queue; token_budget bounds the tokens of one packed forward (None: on a GPU
    the smaller of SATURATING_TOKENS and what free memory allows); a request larger than it runs alone.
    step_order: which running requests step first, "srpt" (least remaining work: lowest mean latency) or
    "fcfs" (first submitted: lowest worst-case latency); aging_s: under "srpt", a request passed over for that
    long counts its remaining work half (see pick_step_batch)."""

    model_name: str = "Qwen/Qwen-Image-Layered"
    max_waiting: int = 256
    max_running: int = 32
    token_budget: int | None = None
    tenant_weights: dict[str, float] = field(default_factory=dict)
    stuck_after_s: float = 600.0
    aging_s: float = 30.0
    step_order: str = "srpt"

    def __post_init__(self) -> None:
        if self.max_waiting < 1 or self.max_running < 1:
            raise ValueError("max_waiting and max_running must be positive")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token_budget must be positive, got {self.token_budget}")
        if self.aging_s <= 0:
            raise ValueError(f"aging_s must be positive, got {self.aging_s}")
        if self.step_order not in STEP_ORDERS:
            raise ValueError(f"unknown step_order {self.step_order!r}; choose one of {', '.join(STEP_ORDERS)}")


def default_token_budget(pipeline: LayeredPipeline) -> int:
    """Tokens of one forward: what saturates a GPU (or fits its free memory), times the GPUs sharing the
    forward (CFG-parallel and sequence-parallel ranks each hold about 1/world of the tokens)."""
    if pipeline.device.type != "cuda":
        return 1 << 16
    free, _ = torch.cuda.mem_get_info(pipeline.device)
    per_token = pipeline.transformer.config.inner_dim * ACTIVATION_BYTES_PER_TOKEN_PER_CHANNEL
    parallel = getattr(pipeline.transformer, "parallel_config", None)
    gpus = parallel.world_size if parallel is not None else 1
    return max(1 << 14, gpus * min(SATURATING_TOKENS, int(0.6 * free / per_token)))


def request_tokens(request: LayeredRequest, text_len: int = ESTIMATED_TEXT_TOKENS) -> int:
    """Tokens the request adds to every forward (both CFG branches)."""
    width, height = bucket_size(request.image.width, request.image.height, request.params.resolution)
    layout = SequenceLayout(text_len, request.params.layers, height // 16, width // 16)
    cfg = request.params.true_cfg_scale > 1 and request.negative_prompt is not None
    return layout.total_tokens * (2 if cfg else 1)


class AsyncLayeredEngine:
    def __init__(
        self, pipeline: LayeredPipeline, config: EngineConfig | None = None, observer: EngineObserver | None = None
    ) -> None:
        self.pipeline = pipeline
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self.token_budget = self.config.token_budget or default_token_budget(pipeline)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._waiting = FairQueue(self.config.max_waiting, self.config.tenant_weights)
        self._requests: dict[str, EngineRequest] = {}
        self._preparing: dict[str, Future] = {}
        self._running: list[EngineRequest] = []
        self._aux = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layered-aux")
        self._aux_stream = torch.cuda.Stream(pipeline.device) if pipeline.device.type == "cuda" else None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._stop = False
        self._heartbeat = time.monotonic()
        self._seeds = itertools.count(int(time.time()))

    # -- caller side (asyncio loop) ----------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._preparing)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def work_tokens(self) -> tuple[int, int]:
        """Work left in token-forwards (tokens of one forward x steps still to run): of the admitted requests
        and of the waiting ones. The load a router balances replicas by: a 50-step request weighs 25 2-step
        ones, where a request count sees one against 25."""
        running = waiting = 0
        with self._lock:
            for entry in self._requests.values():
                state = entry.state
                if state is not None:  # denoising or decoding
                    running += (state.num_steps - state.step) * state.step_tokens
                    continue
                work = request_tokens(entry.request) * entry.request.params.num_inference_steps
                if entry.status is RequestStatus.WAITING:
                    waiting += work
                elif entry.status is RequestStatus.PREPROCESSING:
                    running += work
        return running, waiting

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="layered-step", daemon=True)
        self._thread.start()

    def is_healthy(self) -> bool:
        """The step thread is alive and stepping, and the model can still run (all parallel ranks alive)."""
        alive = self._thread is not None and self._thread.is_alive()
        model_ok = getattr(self.pipeline.transformer, "healthy", True)
        return alive and model_ok and time.monotonic() - self._heartbeat < self.config.stuck_after_s

    def submit(self, request: LayeredRequest) -> RequestHandle:
        """Queue a request. Raises EngineOverloadedError when full or shutting down, ValueError for bad input."""
        if not self._accepting:
            self.observer.on_request_rejected(request.tenant, "shutting_down")
            raise EngineOverloadedError("the engine is not accepting requests (shutting down)")
        cost = request_tokens(request) * request.params.num_inference_steps
        handle = RequestHandle(request, self.abort)
        entry = EngineRequest(request, handle)
        with self._lock:
            if request.request_id in self._requests:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            try:
                self._waiting.push(request.request_id, tenant=request.tenant, cost=cost, priority=request.priority)
            except QueueFullError as exc:
                self.observer.on_request_rejected(request.tenant, "overloaded")
                raise EngineOverloadedError(str(exc)) from exc
            self._requests[request.request_id] = entry
            position = self._waiting.ordered().index(request.request_id)
        handle._emit(ProgressEvent("queued", queue_position=position))
        self.observer.on_request_queued(request.tenant)
        self._wakeup.set()
        return handle

    def abort(self, request_id: str) -> bool:
        """Cancel a request: at once if it waits, at the next step boundary if it runs."""
        with self._lock:
            entry = self._requests.get(request_id)
            if entry is None or entry.status.is_final:
                return False
            entry.cancel_requested = True
            if self._waiting.remove(request_id):
                self._end(entry, RequestStatus.CANCELLED, RequestCancelledError(f"request {request_id} was cancelled"))
        self._wakeup.set()
        return True

    async def shutdown(self, grace_period_s: float = 30.0) -> None:
        """Stop admitting, let queued and running work finish for ``grace_period_s``, cancel the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_period_s
        while self._requests and time.monotonic() < deadline and self.is_healthy():
            await asyncio.sleep(0.05)
        for request_id in list(self._requests):
            self.abort(request_id)
        while self._requests and self.is_healthy() and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.02)
        self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._aux.shutdown(wait=False, cancel_futures=True)

    # -- step thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            self._heartbeat = time.monotonic()
            self._reap()
            self._admit()
            self._collect_prepared()
            if self._running:
                self._step()
            elif self._preparing:  # nothing to denoise yet: wait for a preprocessing job, don't spin
                wait(list(self._preparing.values()), timeout=0.05, return_when=FIRST_COMPLETED)
            else:
                self._wakeup.wait(0.05)
                self._wakeup.clear()

    def _notify(self, entry: EngineRequest, event: ProgressEvent) -> None:
        self._loop.call_soon_threadsafe(entry.handle._emit, event)

    def _end(self, entry: EngineRequest, status: RequestStatus, error: BaseException | None = None,
             output: RequestOutput | None = None) -> None:
        """Final bookkeeping of a request (call with the lock held or from the step thread)."""
        entry.status = status
        entry.state = None
        self._requests.pop(entry.request_id, None)
        outcome = {RequestStatus.FINISHED: "success", RequestStatus.CANCELLED: "cancelled",
                   RequestStatus.EXPIRED: "deadline"}.get(status, "error")
        self.observer.on_request_finished(
            entry.tenant, outcome, time.monotonic() - entry.arrival_time,
            entry.request.params.layers, entry.request.params.num_inference_steps,
        )
        self._loop.call_soon_threadsafe(entry.handle._finish, output, error)

    def _reap(self) -> None:
        """Drop cancelled and expired requests at the step boundary."""
        now = time.monotonic()
        with self._lock:
            for request_id in self._waiting.ordered():
                entry = self._requests[request_id]
                if entry.expired(now):
                    self._waiting.remove(request_id)
                    self._end(entry, RequestStatus.EXPIRED, DeadlineExceededError(f"request {request_id} expired"))
            leaving = []
            for entry in self._running:
                if entry.cancel_requested:
                    error = RequestCancelledError(f"request {entry.request_id} was cancelled")
                    leaving.append((entry, RequestStatus.CANCELLED, error))
                elif entry.expired(now):
                    error = DeadlineExceededError(f"request {entry.request_id} expired")
                    leaving.append((entry, RequestStatus.EXPIRED, error))
            # leave the running set before the caller hears the outcome, so it never sees a stale count
            self._running = [e for e in self._running if all(e is not gone for gone, _, _ in leaving)]
            for entry, status, error in leaving:
                self._end(entry, status, error)

    def _running_tokens(self) -> int:
        active = self._running + [self._requests[r] for r in self._preparing if r in self._requests]
        return sum(request_tokens(e.request) for e in active)

    def _admit(self) -> None:
        with self._lock:
            admitted = False
            while len(self._waiting) and self.num_running < self.config.max_running:
                entry = self._requests[self._waiting.peek()]
                busy = self.num_running > 0
                window = ADMISSION_FACTOR * self.token_budget
                if busy and self._running_tokens() + request_tokens(entry.request) > window:
                    break
                self._waiting.pop()
                entry.status = RequestStatus.PREPROCESSING
                entry.start_time = time.monotonic()
                self.observer.on_request_started(entry.tenant, entry.start_time - entry.arrival_time)
                self._notify(entry, ProgressEvent("started"))
                self._preparing[entry.request_id] = self._aux.submit(self._prepare, entry)
                admitted = True
            if admitted:
                for position, request_id in enumerate(self._waiting.ordered()):
                    self._notify(self._requests[request_id], ProgressEvent("queued", queue_position=position))
            self.observer.on_queue_state(self.num_running, self.num_waiting)

    def _collect_prepared(self) -> None:
        for request_id, future in list(self._preparing.items()):
            if not future.done():
                continue
            del self._preparing[request_id]
            entry = self._requests.get(request_id)
            if entry is None:
                continue
            if future.exception() is not None:
                exc = future.exception()
                error = exc if isinstance(exc, ValueError) else EngineError(f"preprocessing failed: {exc}")
                with self._lock:
                    self._end(entry, RequestStatus.FAILED, error)
                continue
            entry.state, entry.prompt = future.result()
            entry.status = RequestStatus.DENOISING
            entry.denoise_start = entry.last_step = time.monotonic()
            self._running.append(entry)

    def _pick_batch(self) -> list[EngineRequest]:
        now = time.monotonic()
        candidates = []
        for entry in self._running:
            state = entry.state
            candidates.append(StepCandidate(entry, entry.request.priority,
                                            (state.num_steps - state.step) * state.step_tokens, state.step_tokens,
                                            now - entry.last_step, entry.arrival_time))
        return pick_step_batch(candidates, self.token_budget, self.config.aging_s, self.config.step_order)

    def _step(self) -> None:
        batch = self._pick_batch()
        states = [e.state for e in batch]
        start = time.monotonic()
        try:
            with torch.no_grad():
                self.pipeline.denoise_step(states)
        except Exception as exc:  # a failed forward fails its requests, never the engine
            logger.exception("denoising step failed")
            with self._lock:
                self._running = [e for e in self._running if all(e is not b for b in batch)]
                for entry in batch:
                    self._end(entry, RequestStatus.FAILED, EngineError(f"denoising failed: {exc}"))
            return
        tokens = sum(state.step_tokens for state in states)
        now = time.monotonic()
        self.observer.on_step(now - start, len(batch), tokens)
        for entry in batch:
            entry.last_step = now
        finished = [e for e in batch if e.state.done]
        with self._lock:  # leave the running set before anything can report the outcome
            self._running = [e for e in self._running if all(e is not f for f in finished)]
        for entry in batch:
            state = entry.state
            self._notify(entry, ProgressEvent("step", step=state.step, num_steps=state.num_steps))
        for entry in finished:
            entry.status = RequestStatus.DECODING
            entry.decode_start = time.monotonic()
            self._notify(entry, ProgressEvent("decoding", step=entry.state.step, num_steps=entry.state.num_steps))
            self._aux.submit(self._decode, entry)

    # -- aux thread --------------------------------------------------------------------------------

    def _aux_context(self):
        return torch.cuda.stream(self._aux_stream) if self._aux_stream is not None else contextlib.nullcontext()

    def _prepare(self, entry: EngineRequest):
        request = entry.request
        seed = request.seed if request.seed is not None else next(self._seeds)
        with torch.no_grad(), self._aux_context():
            cond, neg, prompt = self.pipeline.encode_prompts(
                request.image, request.prompt, request.negative_prompt, request.params
            )
            state = self.pipeline.prepare(
                request.image, request.params, cond, neg, generator=torch.Generator("cpu").manual_seed(seed)
            )
            if self._aux_stream is not None:
                self._aux_stream.synchronize()
        return state, prompt

    def _decode(self, entry: EngineRequest) -> None:
        try:
            with torch.no_grad(), self._aux_context():
                layers = self.pipeline.decode(entry.state)
        except Exception as exc:
            logger.exception("decoding failed")
            with self._lock:
                self._end(entry, RequestStatus.FAILED, EngineError(f"decoding failed: {exc}"))
            return
        now = time.monotonic()
        timings = {
            "queue_s": entry.start_time - entry.arrival_time,
            "preprocess_s": entry.denoise_start - entry.start_time,
            "denoise_s": entry.decode_start - entry.denoise_start,
            "decode_s": now - entry.decode_start,
            "total_s": now - entry.arrival_time,
        }
        output = RequestOutput(entry.request_id, layers, entry.prompt, timings)
        with self._lock:
            self._end(entry, RequestStatus.FINISHED, output=output)
