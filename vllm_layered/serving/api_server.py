"""The OpenAI-compatible HTTP server: FastAPI routes over a ThreadedEngine.

- POST /v1/images/edits         multipart (OpenAI's and vLLM-Omni's fields): image -> RGBA layers
- POST /v1/images/generations   JSON, EXPERIMENTAL: text -> layers (the condition image is a fully
                                transparent canvas of the requested aspect ratio; the released
                                weights are tuned for image -> layers)
- DELETE /v1/requests/{id}      cancel one of the caller's own requests (id: the X-Request-Id the
                                client sent, or the one in the first SSE event / response header)
- GET /v1/models, GET /health (503 when the engine loop is dead or stuck), GET /metrics, GET /docs

Before a body is read, the server checks the engine's queue has room (503 at once otherwise) and admits
the tenant (429); the body must then arrive within ``--body-timeout`` (408). An upload is decoded,
turned upright, converted to RGBA and resized to its resolution bucket once; only that BucketImage
is kept. A request's work (serving/limits.py: request_work) is checked against the tenant's or the
server's cap as soon as the image header gives its bucket, before any pixel is decoded.

Responses hold one ``data`` entry per layer, bottom first (``layer_order: bottom_to_top``), each
with ``layer_index`` and ``role``; n > 1 gives n decompositions (seeds seed..seed+n-1), their
entries one after the other, marked by ``decomposition_index``. ``package=zip|psd|pptx`` returns
one entry per decomposition holding the whole file. ``stream=true`` answers with server-sent
events: ``progress`` (queued with queue_position, started, step i of n, decoding), then one
``result`` (the response body) or ``error`` (the error body) event.

``refine`` decomposes layers again (layer_tree.py): each decomposition becomes a tree, still ONE engine
request (one concurrency slot, deadline and cancel), its whole work checked against the cap up front. Its
entries come depth first with ``path``, ``parent``, ``bbox`` (and a refined layer's ``crop_box``), packages
hold the tree (folders, PSD groups, PPTX group shapes), and progress events name the ``node`` at work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from vllm_layered.model_executor.image_processing import RESOLUTIONS
from vllm_layered.model_executor.pipeline import MAX_LAYERS
from vllm_layered.serving.exchange import admit, authenticate
from vllm_layered.serving.intake import Intake
from vllm_layered.serving.jobs import JobRegistry, engine_requests
from vllm_layered.serving.limits import ServerLimits
from vllm_layered.serving.metrics import ServingMetrics
from vllm_layered.serving.protocol import (
    APIError,
    CancelResponse,
    ErrorResponse,
    ImageEditForm,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from vllm_layered.serving.reply import respond
from vllm_layered.serving.tenant_store import LocalTenantStore, TenantStore
from vllm_layered.serving.tenants import TenantRegistry
from vllm_layered.serving.uploads import ClientGone

if TYPE_CHECKING:
    from vllm_layered.serving.engine.engine import ThreadedEngine

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "Invalid request (error.param names the field)"),
        (401, "Missing or invalid API key"),
        (404, "Unknown model"),
        (408, "The request body did not arrive within --body-timeout"),
        (409, "X-Request-Id already in flight"),
        (413, "Upload or image too large"),
        (429, "Tenant over its rate or concurrency limit (see Retry-After)"),
        (503, "Engine overloaded or shutting down (see Retry-After)"),
    ]
}


class LayeredAPI:
    """What the routes share (the engine, the tenants, the jobs in flight, the limits) and the request handling
    behind them; ``build_app`` wires it into FastAPI."""

    def __init__(
        self,
        engine: ThreadedEngine,
        *,
        tenant_store: TenantStore,
        limits: ServerLimits,
        metrics: ServingMetrics,
        served_model_names: Sequence[str] = (),
    ) -> None:
        self.engine = engine
        self.admission = tenant_store
        self.limits = limits
        self.metrics = metrics
        self.model_names = list(dict.fromkeys([*served_model_names, engine.model_name]))
        self.jobs = JobRegistry()
        self.intake = Intake(limits, self.model_names)
        self.created = int(time.time())

    async def images(self, request: Request, endpoint: str) -> Response:
        """The shared path of edits and generations, one module a stage: exchange.py admits the request before
        its body is read, intake.py reads and checks the body, jobs.py submits its decompositions to the engine,
        reply.py answers (results.py's body, or errors.py's error)."""
        exchange = admit(request, endpoint, store=self.admission, engine=self.engine, metrics=self.metrics,
                         jobs=self.jobs)
        try:
            asked = await self.intake.read(request, endpoint, exchange.tenant)
            requests = engine_requests(asked, exchange.tenant, exchange.request_id,
                                       timeout_s=self.limits.request_timeout_s)
            exchange.job = self.jobs.start(self.engine, exchange.request_id, requests)
        except ClientGone:
            exchange.end(499)
            return Response(status_code=499)
        except APIError as e:
            exchange.reject(e)
            raise
        except BaseException:
            exchange.end(500)
            raise
        return await respond(request, exchange, asked.options, model=self.model_names[0], limits=self.limits,
                             experimental=endpoint == "generations")

    def cancel(self, request: Request, request_id: str) -> CancelResponse:
        tenant = authenticate(request, self.admission.tenants, self.metrics)
        job = self.jobs.get(tenant.name, request_id)
        if job is None:  # another tenant's id looks exactly like an unknown one
            raise APIError(404, f"no request {request_id!r} in flight", code="request_not_found")
        # cancelled=false: it could not be cancelled any more (it ended; its result may be on its way)
        return CancelResponse(id=request_id, cancelled=job.cancel_by_client())

    def models(self, request: Request) -> ModelList:
        authenticate(request, self.admission.tenants, self.metrics)
        cards = [
            ModelCard(id=name, created=self.created, max_layers=MAX_LAYERS, resolutions=list(RESOLUTIONS))
            for name in self.model_names
        ]
        return ModelList(data=cards)


def _multipart_body(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["properties"] = {
        "image": {"type": "string", "format": "binary", "description": "The image to decompose (one file)."},
        **schema["properties"],
    }
    schema["required"] = ["image"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def build_app(
    engine: ThreadedEngine,
    *,
    tenants: TenantRegistry | TenantStore,
    limits: ServerLimits,
    metrics: ServingMetrics | None = None,
    served_model_names: Sequence[str] = (),
    shutdown_grace_s: float = 30.0,
) -> FastAPI:
    """The FastAPI app. It starts the engine (and the tenant store) on startup and shuts them down on exit.
    ``tenants``: a fixed registry, or the TenantStore of `serve` (keys file reloads, shared limits). Pass the
    ServingMetrics that is the engine's observer, or engine-side metrics stay empty."""
    store = tenants if isinstance(tenants, TenantStore) else LocalTenantStore(tenants)
    api = LayeredAPI(
        engine, tenant_store=store, limits=limits, metrics=metrics or ServingMetrics(),
        served_model_names=served_model_names,
    )
    api.metrics.watch_engine(engine.is_healthy, engine.config.max_waiting)
    api.metrics.watch_load(engine.work_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(store.start)  # the first Redis contact is bounded by the store's short timeouts
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown(grace_period_s=shutdown_grace_s)
            store.close()

    app = FastAPI(title="vllm-layered", summary="Qwen-Image-Layered: one image in, RGBA layers out",
                  description=__doc__, lifespan=lifespan)
    app.state.api = api
    _install_error_handlers(app)
    images_responses = {200: {"model": ImagesResponse, "description": "The layers (or text/event-stream)"},
                        **_ERROR_RESPONSES}

    @app.post("/v1/images/edits", response_model=None, responses=images_responses,
              openapi_extra=_multipart_body(ImageEditForm))
    async def images_edits(request: Request) -> Response:
        """Decompose an image into RGBA layers (bottom first)."""
        return await api.images(request, "edits")

    @app.post("/v1/images/generations", response_model=None, responses=images_responses,
              openapi_extra=_json_body(ImageGenerationRequest))
    async def images_generations(request: Request) -> Response:
        """EXPERIMENTAL text -> layers: the condition image is a transparent canvas of the requested
        aspect ratio. The released weights are tuned for image -> layers; expect weaker results."""
        return await api.images(request, "generations")

    @app.delete("/v1/requests/{request_id}", response_model=CancelResponse, responses=_ERROR_RESPONSES)
    async def cancel_request(request: Request, request_id: str) -> CancelResponse:
        """Cancel one of your own requests in flight (404 for ids that are not yours)."""
        return api.cancel(request, request_id)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        return api.models(request)

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> dict[str, Any]:
        """200 while the engine loop is alive and stepping; 503 when it died or is stuck. The body carries the
        load a router balances by: requests and work left (token-forwards), running and waiting."""
        if not engine.is_healthy():
            raise APIError(503, "the engine is not healthy (its loop died or is stuck)", code="engine_unhealthy")
        running_work, waiting_work = engine.work_tokens()
        return {"status": "ok", "num_requests_running": engine.num_running, "num_requests_waiting": engine.num_waiting,
                "running_work_tokens": running_work, "waiting_work_tokens": waiting_work}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        api.metrics.on_queue_state(engine.num_running, engine.num_waiting)
        content, content_type = api.metrics.render()
        return Response(content, media_type=content_type)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the OpenAI error body, framework errors included."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}")
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        error = APIError(400, str(first.get("msg")), code="invalid_value", param=str(first["loc"][-1]))
        return JSONResponse(error.body(), status_code=400)
