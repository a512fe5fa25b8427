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
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from vllm_layered.formats import missing_dependency
from vllm_layered.layer_tree import (
    EmptyLayerError,
    RefinementError,
    path_parts,
    plan_refinements,
    refinements_from_form,
)
from vllm_layered.model_executor.image_processing import (
    RESOLUTIONS,
    BucketImage,
    InvalidImageError,
    SizeCheck,
    bucket_size,
    load_image,
    resize_to_bucket,
)
from vllm_layered.model_executor.pipeline import MAX_LAYERS, GenerationParams
from vllm_layered.serving.engine.request import (
    DeadlineExceededError,
    EngineOverloadedError,
    LayeredRequest,
    ProgressEvent,
    RequestCancelledError,
    RequestOutput,
)
from vllm_layered.serving.jobs import DecompositionJob, DuplicateRequestError, JobRegistry
from vllm_layered.serving.limits import ServerLimits, request_work
from vllm_layered.serving.metrics import UNAUTHENTICATED, ServingMetrics
from vllm_layered.serving.protocol import (
    ERROR_CODES,
    APIError,
    CancelResponse,
    ErrorResponse,
    ImageEditForm,
    ImageGenerationRequest,
    ImagesResponse,
    LayeredOptions,
    ModelCard,
    ModelList,
    ProgressData,
    decomposition_seeds,
    resolve_request_id,
    validation_error,
)
from vllm_layered.serving.results import build_images_response
from vllm_layered.serving.sse import HEADERS as SSE_HEADERS
from vllm_layered.serving.sse import HEARTBEAT, sse_event
from vllm_layered.serving.tenant_store import LiveTenants, LocalTenantStore, TenantStore
from vllm_layered.serving.tenants import (
    Admission,
    AdmissionError,
    AuthenticationError,
    Tenant,
    TenantRegistry,
)
from vllm_layered.serving.uploads import CLOSE, ClientGone, read_form, read_json, wait_for_disconnect

if TYPE_CHECKING:
    from vllm_layered.serving.engine.engine import ThreadedEngine

logger = logging.getLogger(__name__)
OVERLOAD_RETRY_AFTER_S = 1
# Uploads decoded at once. A decode briefly holds about 8 bytes per input pixel (the RGBA image and the
# premultiplied copy Pillow resizes: ~325 MB at 40 MP); the bound keeps that the same however many upload.
DECODE_CONCURRENCY = 2
_REJECTION_REASONS = {
    401: "unauthorized", 404: "model_not_found", 408: "body_timeout", 409: "conflict", 413: "too_large",
    503: "overloaded",
}
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


class _Exchange:
    """One image request's bookkeeping: its concurrency slot, its job, the status metric it ends with."""

    def __init__(self, api: LayeredAPI, tenant: Tenant, endpoint: str, request_id: str, admission: Admission) -> None:
        self.api, self.tenant, self.endpoint, self.request_id = api, tenant, endpoint, request_id
        self.job: DecompositionJob | None = None
        self._admission = admission
        self._ended = False
        api.metrics.api_in_progress.labels(tenant.name).inc()

    def end(self, status: int) -> None:
        """Release the slot and record ``status`` (call from the event loop; later calls do nothing)."""
        if self._ended:
            return
        self._ended = True
        self._admission.release()
        if self.job is not None and status == 200:  # every decomposition has its result: nothing left to wait for
            self.api.jobs.finish(self.job)
        elif self.job is not None:
            self.job.abort()
            self.api.retire(self.job)
        self.api.metrics.api_in_progress.labels(self.tenant.name).dec()
        self.api.metrics.record_api_request(self.tenant.name, self.endpoint, status)

    async def closed(self) -> None:
        """A stream's background task: the stream ended, or the client went away (status 499)."""
        self.end(499)


class LayeredAPI:
    """The request handling behind the routes; ``build_app`` wires it into FastAPI."""

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
        self.tenants: LiveTenants = tenant_store.tenants
        self.limits = limits
        self.metrics = metrics
        self.model_names = list(dict.fromkeys([*served_model_names, engine.model_name]))
        self.admission = tenant_store
        self.jobs = JobRegistry()
        self.created = int(time.time())
        self._decode_slots = asyncio.Semaphore(DECODE_CONCURRENCY)
        self._retiring: set[asyncio.Task] = set()

    # -- callers --------------------------------------------------------------------------------

    def authenticate(self, request: Request) -> Tenant:
        try:
            return self.tenants.authenticate(request.headers.get("authorization"))
        except AuthenticationError as e:
            self.metrics.record_rejection(UNAUTHENTICATED, "unauthorized")
            raise APIError(401, str(e), code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}) from None

    # -- image requests -------------------------------------------------------------------------

    async def images(self, request: Request, endpoint: str) -> Response:
        """The shared path of edits and generations: admit, read, validate, submit, answer."""
        try:
            tenant = self.authenticate(request)
        except APIError:
            self.metrics.record_api_request(UNAUTHENTICATED, endpoint, 401)
            raise
        try:
            request_id = resolve_request_id(request.headers)
            if not self.engine.has_queue_room(tenant.name):  # before reading (and decoding) any of the body
                raise _overloaded("the waiting queue is full", close=True)
            admission = self.admission.admit(tenant)
        except (APIError, AdmissionError) as e:
            error = _admission_error(e) if isinstance(e, AdmissionError) else e
            self._rejected(tenant, endpoint, error)
            raise error from None
        exchange = _Exchange(self, tenant, endpoint, request_id, admission)
        try:
            read = self._read_edit if endpoint == "edits" else self._read_generation
            options, params, image, prompt = await read(request, tenant)
            exchange.job = self._submit(tenant, request_id, options, params, image, prompt)
        except ClientGone:
            exchange.end(499)
            return Response(status_code=499)
        except APIError as e:
            self.metrics.record_rejection(tenant.name, _rejection_reason(e))
            exchange.end(e.status_code)
            raise
        except BaseException:
            exchange.end(500)
            raise
        reply = _Reply(self, exchange, options, experimental=endpoint == "generations")
        headers = {"X-Request-Id": request_id}
        if options.stream:
            return StreamingResponse(
                reply.events(),
                media_type="text/event-stream",
                headers={**SSE_HEADERS, **headers},
                background=BackgroundTask(exchange.closed),
            )
        return await reply.json(request, headers)

    def _rejected(self, tenant: Tenant, endpoint: str, error: APIError) -> None:
        self.metrics.record_rejection(tenant.name, _rejection_reason(error))
        self.metrics.record_api_request(tenant.name, endpoint, error.status_code)

    async def _read_edit(
        self, request: Request, tenant: Tenant
    ) -> tuple[LayeredOptions, GenerationParams, BucketImage, str | None]:
        form, data = await read_form(request, self.limits)
        fields = {name: values[-1] for name, values in form.items()}
        try:  # refine may come as several fields (what the openai SDK makes of a list)
            fields["refine"] = refinements_from_form(form)
        except RefinementError as e:
            raise _bad_refine(e) from None
        options = _validate(ImageEditForm, fields)
        params = self._params(options)

        def check_size(width: int, height: int) -> None:  # from the image header, before decoding
            self._check_work(tenant, options, params, bucket_size(width, height, params.resolution))

        async with self._decode_slots:
            image = await asyncio.to_thread(
                decode_upload, data, self.limits.max_pixels, params.resolution, check_size=check_size
            )
        return options, params, image, options.prompt.strip() or None

    async def _read_generation(
        self, request: Request, tenant: Tenant
    ) -> tuple[LayeredOptions, GenerationParams, BucketImage, str | None]:
        body = await read_json(request, self.limits)
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="bad_body")
        options = _validate(ImageGenerationRequest, body)
        params = self._params(options)
        width, height = options.size_pixels() or (params.resolution, params.resolution)
        try:  # the canvas only carries the aspect ratio: make it at its bucket size
            bucket = bucket_size(width, height, params.resolution)
        except InvalidImageError as e:
            raise APIError(400, str(e), code=e.code, param="size") from None
        self._check_work(tenant, options, params, bucket)
        canvas = BucketImage(Image.new("RGBA", bucket, (0, 0, 0, 0)), width, height, params.resolution)
        return options, params, canvas, options.prompt

    def _check_work(
        self, tenant: Tenant, options: LayeredOptions, params: GenerationParams, bucket: tuple[int, int]
    ) -> None:
        """The work cap (serving/limits.py). The server always sends a negative prompt, so CFG is on when
        true_cfg_scale > 1."""
        work = request_work(
            layers=params.layers, bucket=bucket, num_inference_steps=params.num_inference_steps,
            cfg=params.true_cfg_scale > 1, n=options.n, refine_layers=[r.layers for r in options.refine],
        )
        self.limits.check_work(work, tenant.name, tenant.max_request_work)

    def _params(self, options: LayeredOptions) -> GenerationParams:
        """Model and request-level checks, then GenerationParams (which validates the model's ranges)."""
        if options.model and options.model not in self.model_names:
            raise APIError(
                404, f"model {options.model!r} is not served here; try {self.model_names[0]!r}",
                code="model_not_found", param="model",
            )
        self.limits.check_n(options.n)
        if options.package is not None and missing_dependency(options.package) is not None:
            raise APIError(
                400, f"package={options.package} needs {missing_dependency(options.package)} on the server",
                code="unsupported_package", param="package",
            )
        resolution = options.resolution
        if resolution is None and options.size_pixels() is not None:
            width, height = options.size_pixels()
            resolution = min(RESOLUTIONS, key=lambda r: abs(r - math.sqrt(width * height)))
        kwargs = dict(
            layers=options.layers,
            resolution=resolution if resolution is not None else RESOLUTIONS[0],
            num_inference_steps=options.num_inference_steps,
            cfg_normalize=options.cfg_normalize,
            use_en_prompt=options.use_en_prompt,
        )
        if options.cfg_scale is not None:
            kwargs["true_cfg_scale"] = options.cfg_scale
        try:
            params = GenerationParams(**kwargs)
        except ValueError as e:
            name = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), code="invalid_value", param=name if name in kwargs else None) from None
        try:  # the refinements must fit the tree they describe
            plan_refinements(options.refine, root_layers=params.layers, max_layers=MAX_LAYERS)
        except RefinementError as e:
            raise _bad_refine(e) from None
        return params

    def _submit(
        self,
        tenant: Tenant,
        request_id: str,
        options: LayeredOptions,
        params: GenerationParams,
        image: BucketImage,
        prompt: str | None,
    ) -> DecompositionJob:
        seeds = decomposition_seeds(options.seed, options.n)
        deadline = None if self.limits.request_timeout_s is None else time.monotonic() + self.limits.request_timeout_s
        requests = [
            LayeredRequest(
                request_id=f"{tenant.name}/{request_id}/{i}",
                image=image,
                params=params,
                prompt=prompt,
                negative_prompt=options.negative_prompt or " ",
                seed=seed,
                tenant=tenant.name,
                priority=tenant.priority,
                deadline=deadline,
                refine=options.refine,
            )
            for i, seed in enumerate(seeds)
        ]
        try:
            return self.jobs.start(self.engine, request_id, requests)
        except DuplicateRequestError as e:
            raise APIError(409, str(e), code="duplicate_request_id") from None
        except EngineOverloadedError as e:
            raise _overloaded(str(e)) from None
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None

    def retire(self, job: DecompositionJob) -> None:
        """Forget an aborted job once the engine has let go of all its requests. Until then its id stays
        taken (a request reusing it gets the 409), as the engine still holds requests under that id."""
        task = asyncio.get_running_loop().create_task(self._forget_when_ended(job))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _forget_when_ended(self, job: DecompositionJob) -> None:
        await asyncio.gather(*(handle.result() for handle in job.handles), return_exceptions=True)
        self.jobs.finish(job)

    # -- other routes ---------------------------------------------------------------------------

    def cancel(self, request: Request, request_id: str) -> CancelResponse:
        tenant = self.authenticate(request)
        job = self.jobs.get(tenant.name, request_id)
        if job is None:  # another tenant's id looks exactly like an unknown one
            raise APIError(404, f"no request {request_id!r} in flight", code="request_not_found")
        # cancelled=false: it could not be cancelled any more (it ended; its result may be on its way)
        return CancelResponse(id=request_id, cancelled=job.cancel_by_client())

    def models(self, request: Request) -> ModelList:
        self.authenticate(request)
        cards = [
            ModelCard(id=name, created=self.created, max_layers=MAX_LAYERS, resolutions=list(RESOLUTIONS))
            for name in self.model_names
        ]
        return ModelList(data=cards)


def load_request_image(data: Any, max_pixels: int, *, check_size: SizeCheck | None = None) -> Image.Image:
    """The request's input image (``load_image`` within the pixel limit), or the APIError it deserves."""
    try:
        return load_image(data, max_pixels=max_pixels, check_size=check_size)
    except InvalidImageError as e:
        raise APIError(ERROR_CODES.get(e.code, 400), str(e), code=e.code, param="image") from None


def decode_upload(data: bytes, max_pixels: int, resolution: int, *, check_size: SizeCheck | None = None) -> BucketImage:
    """An upload decoded, turned upright, made RGBA and resized to its bucket: the full-size decode is
    dropped on return, so a request holds bucket-size pixels however large the upload was."""
    return resize_to_bucket(load_request_image(data, max_pixels, check_size=check_size), resolution)


class _Reply:
    """Waits for a submitted job and answers: one JSON body, or a stream of server-sent events."""

    def __init__(self, api: LayeredAPI, exchange: _Exchange, options: LayeredOptions, *, experimental: bool) -> None:
        self.api, self.exchange, self.options, self.experimental = api, exchange, options, experimental
        self.job: DecompositionJob = exchange.job

    async def json(self, request: Request, headers: dict[str, str]) -> Response:
        status = 499
        try:
            outputs = await self._outputs_unless_disconnected(request)
            if outputs is None:
                return Response(status_code=status)
            body = await self._body(outputs)
            status = 200
            return JSONResponse(body, headers=headers)
        except Exception as e:
            error = _engine_error(e, self.job)
            status = error.status_code
            raise error from e
        finally:
            self.exchange.end(status)

    async def events(self) -> AsyncIterator[bytes]:
        status = 499
        try:
            async for item in self.job.progress(heartbeat_s=self.api.limits.sse_heartbeat_s):
                yield HEARTBEAT if item is None else sse_event("progress", self._progress(*item))
            try:
                body = await self._body(await self.job.results())
                event, data, final_status = "result", {"type": "result", **body}, 200
            except Exception as e:
                error = _engine_error(e, self.job)
                final_status = error.status_code
                event, data = "error", {"type": "error", "status": final_status, **error.body()}
            yield sse_event(event, data)
            status = final_status
        finally:
            self.exchange.end(status)

    def _progress(self, index: int, event: ProgressEvent) -> dict[str, Any]:
        data = ProgressData(
            id=self.exchange.request_id,
            decomposition_index=index,
            stage=event.kind,
            step=event.step if event.kind == "step" else None,
            num_steps=event.num_steps or None,
            queue_position=event.queue_position,
            node=event.node,
            level=0 if event.node is None else len(path_parts(event.node)),
        )
        return {**data.model_dump(exclude_none=True), "node": event.node}  # null: the root

    async def _outputs_unless_disconnected(self, request: Request) -> list[RequestOutput] | None:
        results = asyncio.ensure_future(self.job.results())
        gone = asyncio.ensure_future(wait_for_disconnect(request.receive))
        try:
            done, _ = await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not results.done():
                results.cancel()  # job.results() aborts the engine work when cancelled
        return results.result() if results in done else None

    async def _body(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        return await asyncio.to_thread(
            build_images_response,
            request_id=self.exchange.request_id,
            model=self.api.model_names[0],
            outputs=outputs,
            seeds=self.job.seeds,
            output_format=self.options.output_format,
            package=self.options.package,
            experimental=self.experimental,
            png_compress_level=self.api.limits.png_compress_level,
        )


def _validate(model: type[LayeredOptions], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def _rejection_reason(error: APIError) -> str:
    if error.status_code == 429 or error.code == "tenant_store_unavailable":
        return error.code or "rate_limited"
    if error.code == "work_limit_exceeded":
        return "work_limit"
    return _REJECTION_REASONS.get(error.status_code, "invalid_request")


def _admission_error(e: AdmissionError) -> APIError:
    retry = str(max(1, math.ceil(e.retry_after_s)))
    return APIError(e.status_code, str(e), code=e.reason, headers={"Retry-After": retry})


def _bad_refine(e: RefinementError) -> APIError:
    return APIError(400, str(e), code="invalid_value", param="refine")


def _overloaded(reason: str, *, close: bool = False) -> APIError:
    """503 engine_overloaded; ``close`` when the request body was not read (the connection cannot be reused)."""
    headers = {"Retry-After": str(OVERLOAD_RETRY_AFTER_S), **(CLOSE if close else {})}
    return APIError(503, f"the server is busy, retry later ({reason})", code="engine_overloaded", headers=headers)


def _engine_error(e: BaseException, job: DecompositionJob) -> APIError:
    """How a job that was accepted ended, as an HTTP error."""
    if isinstance(e, EngineOverloadedError):
        return _overloaded(str(e))
    if isinstance(e, RequestCancelledError):
        if job.cancelled_by_client:
            return APIError(409, f"request {job.request_id!r} was cancelled", code="request_cancelled")
        return APIError(503, f"request {job.request_id!r} was cancelled by the server", code="server_cancelled")
    if isinstance(e, DeadlineExceededError):
        return APIError(504, f"request {job.request_id!r} ran past its deadline", code="deadline_exceeded")
    if isinstance(e, EmptyLayerError):  # known once the layer is decoded: the request asked for the impossible
        return APIError(400, str(e), code="empty_layer", param="refine")
    if isinstance(e, ValueError):
        return APIError(400, str(e), code="invalid_value")
    return APIError(500, f"the decomposition failed: {e}", code="engine_error")


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
