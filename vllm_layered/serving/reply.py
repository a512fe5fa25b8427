"""The answer to a submitted image request: one JSON body, or with ``stream=true`` server-sent events
(``progress``: queued with its queue position, started, step i of n, decoding, each naming the tree ``node`` at
work; then one ``result`` event with the body or one ``error`` event). The body is results.py's, built off the
event loop; a failed job answers with its errors.py error. However the answer ends, its exchange ends with the
status it got (499: the client went away first).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import Request

from vllm_layered.layer_tree import path_parts
from vllm_layered.serving.engine.request import ProgressEvent, RequestOutput
from vllm_layered.serving.errors import outcome_error
from vllm_layered.serving.exchange import Exchange
from vllm_layered.serving.jobs import DecompositionJob
from vllm_layered.serving.limits import ServerLimits
from vllm_layered.serving.protocol import APIError, LayeredOptions, ProgressData
from vllm_layered.serving.results import build_images_response
from vllm_layered.serving.sse import HEADERS as SSE_HEADERS
from vllm_layered.serving.sse import HEARTBEAT, sse_event
from vllm_layered.serving.uploads import wait_for_disconnect

Body = Callable[[list[RequestOutput]], Awaitable[dict[str, Any]]]


async def respond(
    request: Request, exchange: Exchange, options: LayeredOptions, *, model: str, limits: ServerLimits,
    experimental: bool,
) -> Response:
    """Wait for the exchange's job and answer as ``options`` ask; ``model`` is the name the body reports."""
    job = exchange.job

    async def body(outputs: list[RequestOutput]) -> dict[str, Any]:
        return await asyncio.to_thread(
            build_images_response,
            request_id=exchange.request_id,
            model=model,
            outputs=outputs,
            seeds=job.seeds,
            output_format=options.output_format,
            package=options.package,
            experimental=experimental,
            png_compress_level=limits.png_compress_level,
        )

    headers = {"X-Request-Id": exchange.request_id}
    if options.stream:
        return StreamingResponse(
            _events(exchange, body, limits.sse_heartbeat_s),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **headers},
            background=BackgroundTask(exchange.closed),
        )
    return await _json(request, exchange, body, headers)


async def _json(request: Request, exchange: Exchange, body: Body, headers: dict[str, str]) -> Response:
    status = 499
    try:
        outputs = await _outputs_unless_disconnected(request, exchange.job)
        if outputs is None:
            return Response(status_code=status)
        content = await body(outputs)
        status = 200
        return JSONResponse(content, headers=headers)
    except Exception as e:
        error = _failure(e, exchange.job)
        status = error.status_code
        raise error from e
    finally:
        exchange.end(status)


async def _events(exchange: Exchange, body: Body, heartbeat_s: float) -> AsyncIterator[bytes]:
    job, status = exchange.job, 499
    try:
        async for item in job.progress(heartbeat_s=heartbeat_s):
            yield HEARTBEAT if item is None else sse_event("progress", progress_data(job.request_id, *item))
        try:
            content = await body(await job.results())
            event, data, final_status = "result", {"type": "result", **content}, 200
        except Exception as e:
            error = _failure(e, job)
            final_status = error.status_code
            event, data = "error", {"type": "error", "status": final_status, **error.body()}
        yield sse_event(event, data)
        status = final_status
    finally:
        exchange.end(status)


def progress_data(request_id: str, index: int, event: ProgressEvent) -> dict[str, Any]:
    """The data of a ``progress`` event of decomposition ``index``; ``node`` is null at the root."""
    data = ProgressData(
        id=request_id,
        decomposition_index=index,
        stage=event.kind,
        step=event.step if event.kind == "step" else None,
        num_steps=event.num_steps or None,
        queue_position=event.queue_position,
        node=event.node,
        level=0 if event.node is None else len(path_parts(event.node)),
    )
    return {**data.model_dump(exclude_none=True), "node": event.node}


async def _outputs_unless_disconnected(request: Request, job: DecompositionJob) -> list[RequestOutput] | None:
    results = asyncio.ensure_future(job.results())
    gone = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not results.done():
            results.cancel()  # job.results() aborts the engine work when cancelled
    return results.result() if results in done else None


def _failure(e: BaseException, job: DecompositionJob) -> APIError:
    return outcome_error(e, job.request_id, cancelled_by_client=job.cancelled_by_client)
