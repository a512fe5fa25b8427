"""How an image request that does not get its layers is answered: each way it fails as an OpenAI-style error
(protocol.APIError), and the reason the rejection metric counts it under.

Before the engine has it: the waiting queue is full (503), the tenant is over a limit (429), a refinement does
not fit its tree (400). Once submitted: the engine is overloaded (503), the job was cancelled (409 by its client,
503 by the server), ran past its deadline (504), asked to refine an empty layer (400) or failed (500).
"""

from __future__ import annotations

import math

from vllm_layered.layer_tree import EmptyLayerError, RefinementError
from vllm_layered.serving.engine.request import DeadlineExceededError, EngineOverloadedError, RequestCancelledError
from vllm_layered.serving.protocol import APIError
from vllm_layered.serving.tenants import AdmissionError

OVERLOAD_RETRY_AFTER_S = 1
# Sent with an error answered before the request body was read to its end: what is left of the body would
# otherwise be read as the next request on the connection.
CLOSE = {"Connection": "close"}
_REJECTION_REASONS = {
    401: "unauthorized", 404: "model_not_found", 408: "body_timeout", 409: "conflict", 413: "too_large",
    503: "overloaded",
}


def overloaded(reason: str, *, close: bool = False) -> APIError:
    """503 engine_overloaded; ``close`` when the request body was not read (the connection cannot be reused)."""
    headers = {"Retry-After": str(OVERLOAD_RETRY_AFTER_S), **(CLOSE if close else {})}
    return APIError(503, f"the server is busy, retry later ({reason})", code="engine_overloaded", headers=headers)


def admission_error(e: AdmissionError) -> APIError:
    """A tenant over its rate or concurrency limit (429), or a tenant store out of reach (503), with Retry-After."""
    retry = str(max(1, math.ceil(e.retry_after_s)))
    return APIError(e.status_code, str(e), code=e.reason, headers={"Retry-After": retry})


def bad_refine(e: RefinementError) -> APIError:
    return APIError(400, str(e), code="invalid_value", param="refine")


def submission_error(e: EngineOverloadedError | ValueError) -> APIError:
    """The engine refused the job, at submission or later: overloaded (503), or a request it cannot run (400)."""
    if isinstance(e, EngineOverloadedError):
        return overloaded(str(e))
    return APIError(400, str(e), code="invalid_value")


def outcome_error(e: BaseException, request_id: str, *, cancelled_by_client: bool) -> APIError:
    """How a job that the engine accepted ended, when it did not end with its layers."""
    if isinstance(e, RequestCancelledError):
        if cancelled_by_client:
            return APIError(409, f"request {request_id!r} was cancelled", code="request_cancelled")
        return APIError(503, f"request {request_id!r} was cancelled by the server", code="server_cancelled")
    if isinstance(e, DeadlineExceededError):
        return APIError(504, f"request {request_id!r} ran past its deadline", code="deadline_exceeded")
    if isinstance(e, EmptyLayerError):  # known once the layer is decoded: the request asked for the impossible
        return APIError(400, str(e), code="empty_layer", param="refine")
    if isinstance(e, (EngineOverloadedError, ValueError)):
        return submission_error(e)
    return APIError(500, f"the decomposition failed: {e}", code="engine_error")


def rejection_reason(error: APIError) -> str:
    """The ``reason`` label of the rejection metric for a request refused with ``error``."""
    if error.status_code == 429 or error.code == "tenant_store_unavailable":
        return error.code or "rate_limited"
    if error.code == "work_limit_exceeded":
        return "work_limit"
    return _REJECTION_REASONS.get(error.status_code, "invalid_request")
