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

A request with refinements (a tree, request.py) is admitted once, for all of it: its queue cost and remaining
work count every planned decomposition, and it holds the admission window's tokens of its largest level. When
one of its decompositions is decoded (aux thread), the refinements of the layers it returned are cropped and
queued for preprocessing, together; once all are prepared they join the running set together, as the request's
own decompositions, and are packed into steps with other requests' like any other. So the refinements of one
layer denoise in the same forwards, as LayeredPipeline.decompose_tree denoises them (it packs a whole depth,
which the engine does only where the depth has one parent: a tree served alone then takes the offline path's
steps). The request finishes when all are decoded; an empty layer to refine fails it with
layer_tree.EmptyLayerError (the client's error).

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
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
from PIL import Image

from vllm_layered.layer_tree import (
    EmptyLayerError,
    LayerTree,
    TreeJob,
    parent_path,
    plan_refinements,
    refinement_job,
)
from vllm_layered.model_executor.denoise import DenoiseState
from vllm_layered.model_executor.image_processing import MAX_ASPECT_RATIO, ConditionImage, bucket_size
from vllm_layered.model_executor.pipeline import DECODE_CHUNK, MAX_LAYERS, LayeredPipeline
from vllm_layered.model_executor.sequence_layout import SequenceLayout
from vllm_layered.serving.engine.observer import EngineObserver
from vllm_layered.serving.engine.request import (
    EngineError,
    EngineOverloadedError,
    EngineRequest,
    LayeredRequest,
    NodeRun,
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


def decomposition_tokens(
    request: LayeredRequest, image: ConditionImage, layers: int, text_len: int = ESTIMATED_TEXT_TOKENS
) -> int:
    """Tokens one decomposition of ``request`` (of ``image`` into ``layers``) adds to every forward (both CFG
    branches)."""
    width, height = bucket_size(image.width, image.height, request.params.resolution)
    layout = SequenceLayout(text_len, layers, height // 16, width // 16)
    cfg = request.params.true_cfg_scale > 1 and request.negative_prompt is not None
    return layout.total_tokens * (2 if cfg else 1)


def request_tokens(request: LayeredRequest, text_len: int = ESTIMATED_TEXT_TOKENS) -> int:
    """Tokens the request's root decomposition adds to every forward (both CFG branches)."""
    return decomposition_tokens(request, request.image, request.params.layers, text_len)


def refinement_tokens(request: LayeredRequest, layers: int) -> int:
    """Tokens a refinement into ``layers`` adds to every forward, estimated before its crop exists: a crop is
    resized to the request's resolution, so its bucket has about the area of the root's."""
    return decomposition_tokens(request, request.image, layers)


def planned_work(request: LayeredRequest) -> int:
    """Token-forwards of the whole request: its root decomposition and every refinement (estimated)."""
    tokens = request_tokens(request) + sum(refinement_tokens(request, r.layers) for r in request.refine)
    return tokens * request.params.num_inference_steps


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
        self._requests: dict[str, EngineRequest] = {}  # waiting and running
        self._preparing: dict[Future, list[NodeRun]] = {}  # aux jobs preprocessing decompositions of a request
        self._running: list[NodeRun] = []  # decompositions DENOISING (decoding ones are in their aux jobs)
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
        return len(self._requests) - len(self._waiting)

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
                if entry.status is RequestStatus.WAITING:
                    waiting += planned_work(entry.request)
                else:
                    running += self._remaining_work(entry)
        return running, waiting

    def _remaining_work(self, entry: EngineRequest) -> int:
        """Token-forwards left in an admitted request (call with the lock held): of its decompositions started
        (exact once prepared) and of the refinements still to start (estimated)."""
        steps = entry.request.params.num_inference_steps
        work = 0
        for run in entry.runs:
            state = run.state
            work += (state.num_steps - state.step) * state.step_tokens if state is not None else run.tokens * steps
        return work + sum(refinement_tokens(entry.request, r.layers) for r in entry.pending) * steps

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
        input (layer_tree.RefinementError for refinements that do not fit the tree)."""
        plan = plan_refinements(request.refine, root_layers=request.params.layers, max_layers=MAX_LAYERS)
        cost = planned_work(request)
        handle = RequestHandle(request, self.abort)
        entry = EngineRequest(request, handle, pending=plan)
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
        """Cancel a request. True: it will end CANCELLED, at once if it waits (or none of its preprocessing has
        started and nothing else of it runs), else at the next boundary of its work. False: it is unknown or has
        already ended."""
        with self._lock:
            entry = self._requests.get(request_id)
            if entry is None:
                return False
            entry.cancel_requested = True
            jobs = [(job, runs) for job, runs in self._preparing.items() if runs[0].entry is entry]
            cancelled = [job.cancel() for job, _ in jobs]  # those not started never will
            idle = bool(entry.runs) and sum(len(runs) for _, runs in jobs) == len(entry.runs) and all(cancelled)
            if self._waiting.remove(request_id) or idle:
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
        request_id = entry.request_id
        self._requests.pop(request_id, None)
        self._waiting.remove(request_id)
        for job in [job for job, runs in self._preparing.items() if runs[0].entry is entry]:
            del self._preparing[job]
            job.cancel()  # not started yet: never will; started: it stops at its next boundary
        for run in entry.runs:
            run.state = None
        self._running = [run for run in self._running if run.entry is not entry]
        entry.runs, entry.pending = [], []
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
                            jobs = list(self._preparing)
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
            denoising = list(dict.fromkeys(run.entry for run in self._running))
            for entry in waiting + denoising:
                stop = entry.stop_reason(now)
                if stop is not None:
                    self._end(entry, *stop)

    def _window_tokens(self, entry: EngineRequest) -> int:
        """Tokens a request holds in the admission window (call with the lock held): those of its decompositions
        preprocessing or denoising (a waiting request: its root's), or, when more, of the largest level of its
        refinements still to start, which join the running set without being admitted again."""
        if entry.status is RequestStatus.WAITING:
            now = request_tokens(entry.request)
        else:
            now = sum(run.tokens for run in entry.runs if run.state is None or not run.state.done)
        levels: dict[int, int] = defaultdict(int)
        for refinement in entry.pending:
            levels[refinement.depth] += refinement_tokens(entry.request, refinement.layers)
        return max([now, *levels.values()])

    def _admit(self) -> None:
        with self._lock:
            admitted = False
            while len(self._waiting) and self.num_running < self.config.max_running:
                entry = self._requests[self._waiting.peek()]
                busy = self.num_running > 0
                window = ADMISSION_FACTOR * self.token_budget
                admitted_tokens = sum(self._window_tokens(e) for e in self._requests.values()
                                      if e.status is not RequestStatus.WAITING)
                if busy and admitted_tokens + self._window_tokens(entry) > window:
                    break
                self._waiting.pop()
                request = entry.request
                entry.status = RequestStatus.PREPROCESSING
                entry.start_time = time.monotonic()
                entry.seed = request.seed if request.seed is not None else next(self._seeds)
                self.observer.on_request_started(entry.tenant, entry.start_time - entry.arrival_time)
                self._notify(entry, ProgressEvent("started"))
                root = TreeJob(None, request.image, request.params.layers, request.prompt, entry.seed)
                self._start([NodeRun(entry, root, request_tokens(request))])
                admitted = True
            if admitted:
                for position, request_id in enumerate(self._waiting.ordered()):
                    self._notify(self._requests[request_id], ProgressEvent("queued", queue_position=position))
            self.observer.on_queue_state(self.num_running, self.num_waiting)

    def _start(self, runs: list[NodeRun]) -> None:
        """Queue the preprocessing of decompositions of one request on the aux thread, as one job: they join the
        running set together (call with the lock held)."""
        runs[0].entry.runs.extend(runs)
        self._preparing[self._aux.submit(self._prepare, runs)] = runs

    def _collect_prepared(self) -> None:
        now = time.monotonic()
        with self._lock:
            for job, runs in list(self._preparing.items()):
                if not job.done():
                    continue
                del self._preparing[job]
                entry = runs[0].entry
                stop = entry.stop_reason(now)
                if stop is not None:
                    self._end(entry, *stop)
                elif job.exception() is not None:
                    exc = job.exception()
                    error = exc if isinstance(exc, ValueError) else EngineError(f"preprocessing failed: {exc}")
                    self._end(entry, RequestStatus.FAILED, error)
                else:
                    prepared, handoff = job.result()
                    handoff.receive()  # the step stream waits for the aux stream's writes of the states
                    for run, (state, prompt) in zip(runs, prepared):
                        run.state, run.prompt, run.last_step = state, prompt, now
                    entry.status = RequestStatus.DENOISING
                    if entry.denoise_start is None:
                        entry.denoise_start = now
                    self._running.extend(runs)

    def _pick_batch(self) -> list[NodeRun]:
        """The decompositions that take the next step. A request's remaining work (srpt) is all of it: every
        decomposition of a tree is ordered by the work left in the whole tree."""
        now = time.monotonic()
        remaining = {entry: self._remaining_work(entry) for entry in dict.fromkeys(r.entry for r in self._running)}
        candidates = [
            StepCandidate(run, run.entry.request.priority, remaining[run.entry], run.state.step_tokens,
                          now - run.last_step, run.entry.arrival_time)
            for run in self._running
        ]
        return pick_step_batch(candidates, self.token_budget, self.config.aging_s, self.config.step_order)

    def _step(self) -> None:
        with self._lock:
            batch = self._pick_batch()
            states = [run.state for run in batch]
        tokens = sum(state.step_tokens for state in states)
        start = time.monotonic()
        try:
            with torch.no_grad():
                self.pipeline.denoise_step(states)
        except Exception as exc:  # a failed forward fails its requests (a broken model fails the engine: _watch)
            logger.exception("denoising step failed")
            with self._lock:
                for run in batch:
                    self._end(run.entry, RequestStatus.FAILED, EngineError(f"denoising failed: {exc}"))
            return
        now = time.monotonic()
        self.observer.on_step(now - start, len(batch), tokens)
        stepped, decodes = [], []
        with self._lock:  # leave the running set before anything can report the outcome
            for run, state in zip(batch, states):
                entry = run.entry
                if entry.status.is_final:  # ended meanwhile (the engine failed)
                    continue
                run.last_step = now
                stepped.append((entry, ProgressEvent("step", step=state.step, num_steps=state.num_steps,
                                                     node=run.path)))
                if state.done:
                    self._running.remove(run)
                    entry.status = RequestStatus.DECODING
                    entry.decode_start = now
                    # the step stream has queued the last Euler update: the decode waits for it
                    decodes.append((run, state, Handoff.send(state_tensors(state))))
        for entry, event in stepped:
            self._notify(entry, event)
        for run, state, handoff in decodes:
            event = ProgressEvent("decoding", step=state.step, num_steps=state.num_steps, node=run.path)
            self._notify(run.entry, event)
            self._aux.submit(self._supervised, self._decode, run, state, handoff)

    # -- aux thread --------------------------------------------------------------------------------

    def _supervised(self, work, *args) -> None:
        """Run an aux job whose failures outside the request's own work (reporting, bookkeeping) are the engine's."""
        try:
            work(*args)
        except BaseException as exc:
            self._die(exc)

    def _prepare(self, runs: list[NodeRun]) -> tuple[list[tuple[DenoiseState, str]], Handoff] | None:
        """For each decomposition: prompt embeddings (after a caption if the prompt is empty), then condition
        latents and noise; one Handoff for all. None when the request was cancelled or expired before or between
        these stages (the step thread then ends it)."""
        entry = runs[0].entry
        prepared = []
        with torch.no_grad(), use_stream(self._aux_stream):
            for run in runs:
                job, params = run.job, run.params
                if not self._goes_on(entry):
                    return None
                cond, neg, prompt = self.pipeline.encode_prompts(job.image, job.prompt,
                                                                 entry.request.negative_prompt, params)
                if not self._goes_on(entry):
                    return None
                state = self.pipeline.prepare(
                    job.image, params, cond, neg, generator=torch.Generator("cpu").manual_seed(job.seed)
                )
                prepared.append((state, prompt))
            return prepared, Handoff.send(t for state, _ in prepared for t in state_tensors(state))

    def _decode(self, run: NodeRun, state: DenoiseState, handoff: Handoff) -> None:
        """VAE-decode a few layers at a time, stopping between chunks once the request is cancelled or expired;
        then put them in the request's tree and start the refinements of these layers, or, with nothing left to
        decompose, hand over the result."""
        entry = run.entry
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
        children: list[NodeRun] = []
        if self._goes_on(entry):  # else the boundary below ends it
            try:
                children = self._grow_tree(run, layers)
            except EmptyLayerError as exc:
                with self._lock:
                    self._end(entry, RequestStatus.FAILED, exc)
                return
            except Exception as exc:
                logger.exception("preparing the refinements failed")
                with self._lock:
                    self._end(entry, RequestStatus.FAILED, EngineError(f"preparing the refinements failed: {exc}"))
                return
        now = time.monotonic()
        with self._lock:  # the last boundary: a request cancelled by now ends cancelled, its layers dropped
            stop = entry.stop_reason(now)
            if stop is not None:
                self._end(entry, *stop)
                return
            if entry.status.is_final:  # ended meanwhile (the engine failed or stopped)
                return
            entry.runs.remove(run)
            started = {child.path for child in children}
            entry.pending = [r for r in entry.pending if r.path not in started]
            if children:
                self._start(children)
            if not entry.runs:
                self._end(entry, RequestStatus.FINISHED, output=self._output(entry, now))
        self._wakeup.set()

    @staticmethod
    def _output(entry: EngineRequest, now: float) -> RequestOutput:
        timings = {
            "queue_s": entry.start_time - entry.arrival_time,
            "preprocess_s": entry.denoise_start - entry.start_time,
            "denoise_s": entry.decode_start - entry.denoise_start,
            "decode_s": now - entry.decode_start,
            "total_s": now - entry.arrival_time,
        }
        tree = entry.tree
        return RequestOutput(entry.request_id, [node.image for node in tree.layers], tree.prompt, timings, tree)

    def _grow_tree(self, run: NodeRun, layers: list[Image.Image]) -> list[NodeRun]:
        """Put a decomposition's layers in its request's tree (the root's make the tree) and return the runs of
        the refinements of these layers, their inputs cropped (aux thread: the only one that touches the tree)."""
        entry = run.entry
        if run.path is None:
            entry.tree = LayerTree.from_layers(layers, run.prompt, entry.seed)
        else:
            entry.tree.attach(run.path, layers, run.box, run.prompt)
        children = []
        for refinement in entry.pending:
            if parent_path(refinement.path) == run.path:
                job, box = refinement_job(entry.tree, refinement, max_aspect_ratio=MAX_ASPECT_RATIO)
                tokens = decomposition_tokens(entry.request, job.image, job.layers)
                children.append(NodeRun(entry, job, tokens, box))
        return children


# The engine's first name, kept for code that imports it. It is not an asyncio object: it runs on its own threads.
AsyncLayeredEngine = ThreadedEngine


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
