"""The door of an image request, passed before any of its body is read: who calls (API key -> tenant), under
which request id, whether the engine's waiting queue has room (503 at once otherwise) and whether the tenant may
start one more request (429). What passes is an Exchange, the request's bookkeeping until its last byte: the
tenant's concurrency slot, the job, and the status the request is counted with when it ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from vllm_layered.serving.errors import admission_error, overloaded, rejection_reason
from vllm_layered.serving.jobs import DecompositionJob, JobRegistry
from vllm_layered.serving.metrics import UNAUTHENTICATED, ServingMetrics
from vllm_layered.serving.protocol import APIError, resolve_request_id
from vllm_layered.serving.tenant_store import LiveTenants, TenantStore
from vllm_layered.serving.tenants import Admission, AdmissionError, AuthenticationError, Tenant

if TYPE_CHECKING:
    from vllm_layered.serving.engine.engine import ThreadedEngine


def authenticate(request: Request, tenants: LiveTenants, metrics: ServingMetrics) -> Tenant:
    """The tenant of the request's API key; a 401 (counted as a rejection) for a missing or unknown key."""
    try:
        return tenants.authenticate(request.headers.get("authorization"))
    except AuthenticationError as e:
        metrics.record_rejection(UNAUTHENTICATED, "unauthorized")
        raise APIError(401, str(e), code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}) from None


def admit(
    request: Request, endpoint: str, *, store: TenantStore, engine: ThreadedEngine, metrics: ServingMetrics,
    jobs: JobRegistry,
) -> Exchange:
    """Let an image request in, or raise the APIError that refuses it (counted in the metrics)."""
    try:
        tenant = authenticate(request, store.tenants, metrics)
    except APIError:
        metrics.record_api_request(UNAUTHENTICATED, endpoint, 401)
        raise
    try:
        request_id = resolve_request_id(request.headers)
        if not engine.has_queue_room(tenant.name):  # before reading (and decoding) any of the body
            raise overloaded("the waiting queue is full", close=True)
        admission = store.admit(tenant)
    except (APIError, AdmissionError) as e:
        error = admission_error(e) if isinstance(e, AdmissionError) else e
        metrics.record_rejection(tenant.name, rejection_reason(error))
        metrics.record_api_request(tenant.name, endpoint, error.status_code)
        raise error from None
    return Exchange(tenant, endpoint, request_id, admission, metrics=metrics, jobs=jobs)


class Exchange:
    """One admitted image request's bookkeeping: its concurrency slot, its job, the status metric it ends with."""

    def __init__(
        self, tenant: Tenant, endpoint: str, request_id: str, admission: Admission, *, metrics: ServingMetrics,
        jobs: JobRegistry,
    ) -> None:
        self.tenant, self.endpoint, self.request_id = tenant, endpoint, request_id
        self.job: DecompositionJob | None = None
        self._admission, self._metrics, self._jobs = admission, metrics, jobs
        self._ended = False
        metrics.api_in_progress.labels(tenant.name).inc()

    def reject(self, error: APIError) -> None:
        """End a request refused after its admission (its body, or its submission, was at fault)."""
        self._metrics.record_rejection(self.tenant.name, rejection_reason(error))
        self.end(error.status_code)

    def end(self, status: int) -> None:
        """Release the slot and record ``status`` (call from the event loop; later calls do nothing)."""
        if self._ended:
            return
        self._ended = True
        self._admission.release()
        if self.job is not None and status == 200:  # every decomposition has its result: nothing left to wait for
            self._jobs.finish(self.job)
        elif self.job is not None:
            self.job.abort()
            self._jobs.retire(self.job)
        self._metrics.api_in_progress.labels(self.tenant.name).dec()
        self._metrics.record_api_request(self.tenant.name, self.endpoint, status)

    async def closed(self) -> None:
        """A stream's background task: the stream ended, or the client went away (status 499)."""
        self.end(499)
