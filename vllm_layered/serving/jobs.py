"""One API request = one job = n engine requests (decompositions) seen as one: merged progress,
results in order, one cancel. ``engine_requests`` builds them from the request read (intake.py); the
registry submits them and lets a tenant find (and cancel) its own jobs by id, and only its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from vllm_layered.serving.engine.request import (
    EngineOverloadedError,
    LayeredRequest,
    ProgressEvent,
    RequestHandle,
    RequestOutput,
)
from vllm_layered.serving.errors import submission_error
from vllm_layered.serving.intake import ImagesRequest
from vllm_layered.serving.protocol import APIError, decomposition_seeds
from vllm_layered.serving.tenants import Tenant


class Engine(Protocol):
    def submit(self, request: LayeredRequest) -> RequestHandle: ...


def engine_requests(
    asked: ImagesRequest, tenant: Tenant, request_id: str, *, timeout_s: float | None
) -> list[LayeredRequest]:
    """One engine request per decomposition (seeds seed .. seed + n - 1, ids TENANT/REQUEST_ID/i), each with the
    tenant's priority and a deadline ``timeout_s`` from now (None: none)."""
    options = asked.options
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    return [
        LayeredRequest(
            request_id=f"{tenant.name}/{request_id}/{i}",
            image=asked.image,
            params=asked.params,
            prompt=asked.prompt,
            negative_prompt=options.negative_prompt or " ",
            seed=seed,
            tenant=tenant.name,
            priority=tenant.priority,
            deadline=deadline,
            refine=options.refine,
        )
        for i, seed in enumerate(decomposition_seeds(options.seed, options.n))
    ]


class DecompositionJob:
    """The decompositions of one API request: their handles and seeds, in order."""

    def __init__(self, request_id: str, tenant: str, handles: list[RequestHandle], seeds: list[int]) -> None:
        self.request_id = request_id
        self.tenant = tenant
        self.handles = handles
        self.seeds = seeds
        self.cancelled_by_client = False

    @classmethod
    def submit(cls, engine: Engine, request_id: str, requests: Sequence[LayeredRequest]) -> DecompositionJob:
        """Submit every request or none: if one is refused, those already in are aborted."""
        handles: list[RequestHandle] = []
        try:
            for request in requests:
                handles.append(engine.submit(request))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return cls(request_id, requests[0].tenant, handles, [r.seed for r in requests])

    async def progress(self, heartbeat_s: float | None = None) -> AsyncIterator[tuple[int, ProgressEvent] | None]:
        """(decomposition index, event) from all handles as they come, until every one has ended;
        None after ``heartbeat_s`` without an event."""
        queue: asyncio.Queue[tuple[int, ProgressEvent] | int] = asyncio.Queue()

        async def pump(index: int, handle: RequestHandle) -> None:
            try:
                async for event in handle.stream():
                    queue.put_nowait((index, event))
            finally:
                queue.put_nowait(index)

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(self.handles)]
        try:
            open_streams = len(tasks)
            while open_streams:
                try:
                    item = await asyncio.wait_for(queue.get(), heartbeat_s)
                except asyncio.TimeoutError:
                    yield None
                    continue
                if isinstance(item, int):
                    open_streams -= 1
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def results(self) -> list[RequestOutput]:
        """The outputs in decomposition order; on the first failure the others are aborted and it is raised."""
        try:
            return list(await asyncio.gather(*(h.result() for h in self.handles)))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for handle in self.handles:
            handle.cancel()

    def cancel_by_client(self) -> bool:
        """Cancel the job for its client. True: at least one decomposition was still running and will end
        cancelled, so the job ends with RequestCancelledError. False: every decomposition had already ended, and
        the job's outcome (its result being delivered, or its error) stands."""
        cancelled = [handle.cancel() for handle in self.handles]
        if any(cancelled):
            self.cancelled_by_client = True
        return any(cancelled)


class JobRegistry:
    """Jobs in flight, keyed by (tenant, request id): a tenant cannot name another tenant's job."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], DecompositionJob] = {}
        self._retiring: set[asyncio.Task] = set()

    def start(self, engine: Engine, request_id: str, requests: Sequence[LayeredRequest]) -> DecompositionJob:
        """Submit a job under an id its tenant has not in flight. APIError: the id is in flight (409), the engine
        is overloaded (503) or refuses a request (400)."""
        key = (requests[0].tenant, request_id)
        if key in self._jobs:
            raise APIError(409, f"request id {request_id!r} is already in flight", code="duplicate_request_id")
        try:
            job = self._jobs[key] = DecompositionJob.submit(engine, request_id, requests)
        except (EngineOverloadedError, ValueError) as e:
            raise submission_error(e) from None
        return job

    def finish(self, job: DecompositionJob) -> None:
        if self._jobs.get((job.tenant, job.request_id)) is job:
            del self._jobs[(job.tenant, job.request_id)]

    def retire(self, job: DecompositionJob) -> None:
        """Forget an aborted job once the engine has let go of all its requests. Until then its id stays
        taken (a request reusing it gets the 409), as the engine still holds requests under that id."""
        task = asyncio.get_running_loop().create_task(self._finish_when_ended(job))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def get(self, tenant: str, request_id: str) -> DecompositionJob | None:
        return self._jobs.get((tenant, request_id))

    async def _finish_when_ended(self, job: DecompositionJob) -> None:
        await asyncio.gather(*(handle.result() for handle in job.handles), return_exceptions=True)
        self.finish(job)
