"""ThreadedEngine: continuous, step-level batching of Qwen-Image-Layered requests.

Threads and what runs where:
- the caller's asyncio loop: ``submit``/``abort`` and the RequestHandles (events, results);
- the step thread (its own CUDA stream): admission, then ONE packed transformer forward over every running
  request (each with its own layers, resolution, text length, timestep, CFG) and their sampler steps;
- the aux thread (its own CUDA stream): preprocessing (image -> condition latents, prompt -> embeddings,
  auto-captions) and VAE decoding, so they overlap with denoising instead of stalling it. Tensors cross between
  the two streams only through ``streams.Handoff`` (read there why nothing else orders them);
- the watch thread: fails the engine as soon as the model can no longer run (a parallel rank died), even while
  the step thread is stuck inside a forward.

Requests join the running set between steps (admitted in weighted-fair order while their tokens fit
twice the budget of one forward); each step takes those with the least remaining work that fit the
budget (scheduler.pick_step_batch). They leave when they finish, are cancelled or pass their deadline;
memory of a leaving request is dropped at once. Preprocessing, denoising and decoding requests all count
as running (num_running, admission's max_running).

Failures: one request's failed work (its preprocessing, its decode, the forward of the batch it is in) fails
those requests and the engine goes on. Anything else that raises on the step or aux thread (scheduler,
observer, bookkeeping), or a model that can no longer run, is the engine's failure: every request ends with an
EngineError, submit refuses new ones and is_healthy() turns false for good (/health 503: restart the process).

Cancellation (``abort``): True means the request will end CANCELLED: at once if it waits (or its preprocessing
has not started), else at the next boundary of its work: between the preprocessing stages, denoising steps or
decoded chunks, which stops the work there; a result completed meanwhile is dropped. False: it had already ended.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from vllm_layered.model_executor.denoise import DenoiseState
from vllm_layered.model_executor.image_processing import bucket_size
from vllm_layered.model_executor.pipeline import DECODE_CHUNK, LayeredPipeline
from vllm_layered.model_executor.sequence_layout import SequenceLayout
from vllm_layered.serving.engine.observer import EngineObserver
from vllm_layered.serving.engine.request import (
    EngineError,
    EngineOverloadedError,
    EngineRequest,
    LayeredRequest,
    ProgressEvent,
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
from vllm_layered.serving.engine.streams import Handoff, new_stream, state_tensors, use_stream

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
WATCH_INTERVAL_S = 0.2  # how often the watch thread asks the model whether it can still run
CANCEL_WAIT_S = 5.0  # at shutdown: how long cancelled requests get to reach the next boundary of their work
JOIN_TIMEOUT_S = 10.0  # at shutdown: how long to wait for a healthy step thread to leave its last step


@dataclass
class EngineConfig:
    """max_waiting bounds the queue; token_budget bounds the tokens of one packed forward (None: on a GPU
    the smaller of SATURATING_TOKENS and what free memory allows); a request larger than it runs alone.
    step_order: which running requests step first, "srpt" (least remaining work: lowest mean latency) or
    "fcfs" (first submitted: lowest worst-case latency); aging_s: under "srpt", a request passed over for that
    long counts its remaining work half (see pick_step_batch). decode_chunk: layers VAE-decoded at once (device
    and host memory of a decode grow with it, not with the layer count; the offline pipeline's default keeps the
    served layers identical to its own)."""

    model_name: str = "Qwen/Qwen-Image-Layered"
    max_waiting: int = 256
    max_running: int = 32
    token_budget: int | None = None
    tenant_weights: dict[str, float] = field(default_factory=dict)
    stuck_after_s: float = 600.0
    aging_s: float = 30.0
    step_order: str = "srpt"
    decode_chunk: int = DECODE_CHUNK

    def __post_init__(self) -> None:
        if self.max_waiting < 1 or self.max_running < 1:
            raise ValueError("max_waiting and max_running must be positive")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token_budget must be positive, got {self.token_budget}")
        if self.aging_s <= 0:
            raise ValueError(f"aging_s must be positive, got {self.aging_s}")
        if self.step_order not in STEP_ORDERS:
            raise ValueError(f"unknown step_order {self.step_order!r}; choose one of {', '.join(STEP_ORDERS)}")
        if self.decode_chunk < 1:
            raise ValueError(f"decode_chunk must be positive, got {self.decode_chunk}")


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


class ThreadedEngine:
    """The serving engine. It runs on threads of its own (step, aux and watch, above); the caller's asyncio loop
    only submits, aborts and reads RequestHandles."""

    def __init__(
        self, pipeline: LayeredPipeline, config: EngineConfig | None = None, observer: EngineObserver | None = None
    ) -> None:
        self.pipeline = pipeline
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self.token_budget = self.config.token_budget or default_token_budget(pipeline)
        self._lock = threading.Lock()  # guards the requests and the containers of their stages below
        self._wakeup = threading.Event()
        self._waiting = FairQueue(self.config.max_waiting, self.config.tenant_weights)
        self._requests: dict[str, EngineRequest] = {}
        self._preparing: dict[str, Future] = {}  # PREPROCESSING: their jobs on the aux thread
        self._running: list[EngineRequest] = []  # DENOISING
        self._decoding: dict[str, EngineRequest] = {}  # DECODING on the aux thread
        self._aux = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layered-aux")
        self._step_stream = new_stream(pipeline.device)
        self._aux_stream = new_stream(pipeline.device)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._stop = False
        self._failure: BaseException | None = None
        self._heartbeat = time.monotonic()
        self._seeds = itertools.count(int(time.time()))

    # -- caller side (asyncio loop) ----------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def num_running(self) -> int:
        """Requests preprocessing, denoising or decoding."""
        return len(self._preparing) + len(self._running) + len(self._decoding)

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
        if self.pipeline.device.type == "cuda":  # the weights were written on the loading thread's stream
            torch.cuda.synchronize(self.pipeline.device)
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="layered-step", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch, name="layered-watch", daemon=True).start()

    def is_healthy(self) -> bool:
        """The engine has not failed, its step thread is alive and stepping, and the model can still run (all
        parallel ranks alive)."""
        alive = self._thread is not None and self._thread.is_alive()
        stepping = time.monotonic() - self._heartbeat < self.config.stuck_after_s
        return alive and stepping and self._failure is None and self._model_failure() is None

    def has_queue_room(self, tenant: str) -> bool:
        """Whether a request of ``tenant`` would find room in the waiting queue now (the same for every tenant
        today). A hint for the server, which asks before it reads a request body; ``submit`` still decides."""
        return self._accepting and len(self._waiting) < self.config.max_waiting

    def submit(self, request: LayeredRequest) -> RequestHandle:
        """Queue a request. Raises EngineOverloadedError when full, shutting down or failed; ValueError for bad
        input."""
        cost = request_tokens(request) * request.params.num_inference_steps
        handle = RequestHandle(request, self.abort)
        entry = EngineRequest(request, handle)
        with self._lock:  # under the lock: a request is either refused here or ended by _die / shutdown
            if not self._accepting:
                if self._failure is not None:
                    self.observer.on_request_rejected(request.tenant, "unhealthy")
                    raise EngineOverloadedError(f"the engine failed and takes no requests ({_describe(self._failure)})")
                self.observer.on_request_rejected(request.tenant, "shutting_down")
                raise EngineOverloadedError("the engine is not accepting requests (shutting down)")
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
        """Cancel a request. True: it will end CANCELLED, at once if it waits (or its preprocessing has not
        started), else at the next boundary of its work. False: it is unknown or has already ended."""
        with self._lock:
            entry = self._requests.get(request_id)
            if entry is None:
                return False
            entry.cancel_requested = True
            job = self._preparing.get(request_id)
            if self._waiting.remove(request_id) or (job is not None and job.cancel()):
                self._end(entry, *entry.stop_reason(time.monotonic()))
        self._wakeup.set()
        return True

    async def shutdown(self, grace_period_s: float = 30.0) -> None:
        """Stop admitting, let queued and running work finish for ``grace_period_s``, cancel the rest. Every
        request has ended when it returns, even if the step thread died or is stuck."""
        self._accepting = False
        deadline = time.monotonic() + grace_period_s
        await self._drain(deadline)
        for request_id in list(self._requests):
            self.abort(request_id)
        await self._drain(deadline + CANCEL_WAIT_S)
        healthy = self.is_healthy()
        self._stop = True
        self._wakeup.set()
        if self._thread is not None and healthy:
            await asyncio.to_thread(self._thread.join, JOIN_TIMEOUT_S)
        self._end_all("the engine stopped before the request finished")
        self._aux.shutdown(wait=False, cancel_futures=True)

    async def _drain(self, until: float) -> None:
        while self._requests and self.is_healthy() and time.monotonic() < until:
            await asyncio.sleep(0.02)

    # -- supervision -------------------------------------------------------------------------------

    def _model_failure(self) -> str | None:
        """Why the model cannot run anymore (a ParallelTransformer lost a rank), or None."""
        return getattr(self.pipeline.transformer, "failure", None)

    def _watch(self) -> None:
        """Watch thread: fail the engine as soon as the model cannot run, even while the step thread waits in a
        forward (a collective with a dead rank)."""
        while not self._stop:
            failure = self._model_failure()
            if failure is not None:
                self._die(EngineError(f"the model can no longer run: {failure}"))
                return
            time.sleep(WATCH_INTERVAL_S)

    def _die(self, exc: BaseException) -> None:
        """The engine cannot go on: remember why (is_healthy() turns false), stop, and end every request."""
        with self._lock:
            first = self._failure is None
            if first:
                self._failure = exc
            self._accepting = False
            self._stop = True
        if first:
            logger.error("the engine failed; every request in it fails", exc_info=exc)
        self._wakeup.set()
        self._end_all(f"the engine failed: {_describe(exc)}")

    def _end_all(self, message: str) -> None:
        """End every request left: as its cancellation or deadline says, else failed with ``message``."""
        now = time.monotonic()
        with self._lock:
            for entry in list(self._requests.values()):
                status, error = entry.stop_reason(now) or (RequestStatus.FAILED, EngineError(message))
                try:
                    self._end(entry, status, error)
                except Exception:  # a broken observer or a closed loop must not leave the other requests hanging
                    logger.exception("could not report the end of request %s", entry.request_id)

    def _end(self, entry: EngineRequest, status: RequestStatus, error: BaseException | None = None,
             output: RequestOutput | None = None) -> None:
        """A request's final bookkeeping (call with the lock held): it leaves the engine and its stage, its caller
        hears the outcome, then the observer does. Once only: a request ended meanwhile stays as it ended."""
        if entry.status.is_final:
            return
        entry.status = status
        entry.state = None
        request_id = entry.request_id
        self._requests.pop(request_id, None)
        self._waiting.remove(request_id)
        job = self._preparing.pop(request_id, None)
        if job is not None:
            job.cancel()  # not started yet: never will; started: it stops at its next boundary
        self._running = [e for e in self._running if e is not entry]
        self._decoding.pop(request_id, None)
        self._loop.call_soon_threadsafe(entry.handle._finish, output, error)
        outcome = {RequestStatus.FINISHED: "success", RequestStatus.CANCELLED: "cancelled",
                   RequestStatus.EXPIRED: "deadline"}.get(status, "error")
        self.observer.on_request_finished(
            entry.tenant, outcome, time.monotonic() - entry.arrival_time,
            entry.request.params.layers, entry.request.params.num_inference_steps,
        )

    def _goes_on(self, entry: EngineRequest) -> bool:
        """Whether a request's work should continue past this boundary (not ended, cancelled or expired)."""
        return not entry.status.is_final and entry.stop_reason(time.monotonic()) is None

    # -- step thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with use_stream(self._step_stream):
                while not self._stop:
                    self._heartbeat = time.monotonic()
                    self._reap()
                    self._admit()
                    self._collect_prepared()
                    if self._running:
                        self._step()
                    elif self._preparing:  # nothing to denoise yet: wait for a preprocessing job, don't spin
                        with self._lock:
                            jobs = list(self._preparing.values())
                        wait(jobs, timeout=0.05, return_when=FIRST_COMPLETED)
                    else:
                        self._wakeup.wait(0.05)
                        self._wakeup.clear()
        except BaseException as exc:
            self._die(exc)

    def _notify(self, entry: EngineRequest, event: ProgressEvent) -> None:
        self._loop.call_soon_threadsafe(entry.handle._emit, event)

    def _reap(self) -> None:
        """End cancelled and expired requests at the step boundary (waiting and denoising ones; the aux thread's
        jobs stop at their own boundaries)."""
        now = time.monotonic()
        with self._lock:
            waiting = [self._requests[request_id] for request_id in self._waiting.ordered()]
            for entry in waiting + self._running:
                stop = entry.stop_reason(now)
                if stop is not None:
                    self._end(entry, *stop)

    def _running_tokens(self) -> int:
        active = self._running + [self._requests[r] for r in self._preparing]
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
        now = time.monotonic()
        with self._lock:
            for request_id, job in list(self._preparing.items()):
                if not job.done():
                    continue
                del self._preparing[request_id]
                entry = self._requests[request_id]
                stop = entry.stop_reason(now)
                if stop is not None:
                    self._end(entry, *stop)
                elif job.exception() is not None:
                    exc = job.exception()
                    error = exc if isinstance(exc, ValueError) else EngineError(f"preprocessing failed: {exc}")
                    self._end(entry, RequestStatus.FAILED, error)
                else:
                    entry.state, entry.prompt, handoff = job.result()
                    handoff.receive()  # the step stream waits for the aux stream's writes of the state
                    entry.status = RequestStatus.DENOISING
                    entry.denoise_start = entry.last_step = now
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
        with self._lock:
            batch = self._pick_batch()
            states = [e.state for e in batch]
        tokens = sum(state.step_tokens for state in states)
        start = time.monotonic()
        try:
            with torch.no_grad():
                self.pipeline.denoise_step(states)
        except Exception as exc:  # a failed forward fails its requests (a broken model fails the engine: _watch)
            logger.exception("denoising step failed")
            with self._lock:
                for entry in batch:
                    self._end(entry, RequestStatus.FAILED, EngineError(f"denoising failed: {exc}"))
            return
        now = time.monotonic()
        self.observer.on_step(now - start, len(batch), tokens)
        stepped, decodes = [], []
        with self._lock:  # leave the running set before anything can report the outcome
            for entry, state in zip(batch, states):
                if entry.status.is_final:  # ended meanwhile (the engine failed)
                    continue
                entry.last_step = now
                stepped.append((entry, ProgressEvent("step", step=state.step, num_steps=state.num_steps)))
                if state.done:
                    self._running.remove(entry)
                    entry.status = RequestStatus.DECODING
                    entry.decode_start = now
                    self._decoding[entry.request_id] = entry
                    # the step stream has queued the last Euler update: the decode waits for it
                    decodes.append((entry, state, Handoff.send(state_tensors(state))))
        for entry, event in stepped:
            self._notify(entry, event)
        for entry, state, handoff in decodes:
            self._notify(entry, ProgressEvent("decoding", step=state.step, num_steps=state.num_steps))
            self._aux.submit(self._supervised, self._decode, entry, state, handoff)

    # -- aux thread --------------------------------------------------------------------------------

    def _supervised(self, work, *args) -> None:
        """Run an aux job whose failures outside the request's own work (reporting, bookkeeping) are the engine's."""
        try:
            work(*args)
        except BaseException as exc:
            self._die(exc)

    def _prepare(self, entry: EngineRequest) -> tuple[DenoiseState, str, Handoff] | None:
        """Prompt embeddings (after a caption if the prompt is empty), then condition latents and noise. None when
        the request was cancelled or expired before or between the two (the step thread then ends it)."""
        request = entry.request
        if not self._goes_on(entry):
            return None
        seed = request.seed if request.seed is not None else next(self._seeds)
        with torch.no_grad(), use_stream(self._aux_stream):
            cond, neg, prompt = self.pipeline.encode_prompts(
                request.image, request.prompt, request.negative_prompt, request.params
            )
            if not self._goes_on(entry):
                return None
            state = self.pipeline.prepare(
                request.image, request.params, cond, neg, generator=torch.Generator("cpu").manual_seed(seed)
            )
            return state, prompt, Handoff.send(state_tensors(state))

    def _decode(self, entry: EngineRequest, state: DenoiseState, handoff: Handoff) -> None:
        """VAE-decode a few layers at a time, stopping between chunks once the request is cancelled or expired."""
        layers = []
        try:
            with torch.no_grad(), use_stream(self._aux_stream):
                handoff.receive()  # the aux stream waits for the step stream's last Euler update
                chunks = self.pipeline.decode_chunks(state, self.config.decode_chunk)
                while self._goes_on(entry) and (chunk := next(chunks, None)) is not None:
                    layers += chunk
        except Exception as exc:
            logger.exception("decoding failed")
            with self._lock:
                self._end(entry, RequestStatus.FAILED, EngineError(f"decoding failed: {exc}"))
            return
        now = time.monotonic()
        with self._lock:  # the last boundary: a request cancelled by now ends cancelled, its layers dropped
            stop = entry.stop_reason(now)
            if stop is not None:
                self._end(entry, *stop)
                return
            timings = {
                "queue_s": entry.start_time - entry.arrival_time,
                "preprocess_s": entry.denoise_start - entry.start_time,
                "denoise_s": entry.decode_start - entry.denoise_start,
                "decode_s": now - entry.decode_start,
                "total_s": now - entry.arrival_time,
            }
            output = RequestOutput(entry.request_id, layers, entry.prompt, timings)
            self._end(entry, RequestStatus.FINISHED, output=output)


# The engine's first name, kept for code that imports it. It is not an asyncio object: it runs on its own threads.
AsyncLayeredEngine = ThreadedEngine


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
