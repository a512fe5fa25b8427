"""What the API decides before the engine runs anything: queue room before the body is read, the body deadline,
the work cap, what a request keeps of its upload, and request ids that the engine still holds.

The app is driven through ASGI directly, over an engine stand-in that records what it is given and ends
requests only when the test says, so that each case happens at a known moment (no model, no timing luck).
tests/serving/test_api_server.py checks the same behaviour end to end against a real server process.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from PIL import Image

from tests.serving.helpers import png_bytes
from vllm_layered.model_executor.image_processing import BucketImage, bucket_size
from vllm_layered.serving.api_server import build_app
from vllm_layered.serving.engine.engine import EngineConfig
from vllm_layered.serving.engine.request import LayeredRequest, RequestCancelledError, RequestHandle
from vllm_layered.serving.limits import ServerLimits, request_work
from vllm_layered.serving.metrics import ServingMetrics
from vllm_layered.serving.tenants import Tenant, TenantRegistry

Receive = Callable[[], Awaitable[dict]]


class EngineStandIn:
    """The engine interface the API uses. Requests end only when the test calls ``end``; ``abort`` only asks."""

    model_name = "tiny"

    def __init__(self) -> None:
        self.config = EngineConfig(max_waiting=4)
        self.room = True
        self.handles: dict[str, RequestHandle] = {}
        self.submitted: list[LayeredRequest] = []
        self.aborted: list[str] = []

    def is_healthy(self) -> bool:
        return True

    num_running = num_waiting = 0

    def has_queue_room(self, tenant: str) -> bool:
        return self.room

    def work_tokens(self) -> tuple[int, int]:
        return 0, 0

    def submit(self, request: LayeredRequest) -> RequestHandle:
        if request.request_id in self.handles:  # as the engine: an id is taken until its request has ended
            raise ValueError(f"request id {request.request_id!r} is already in use")
        handle = self.handles[request.request_id] = RequestHandle(request, self.abort)
        self.submitted.append(request)
        return handle

    def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return request_id in self.handles

    def end_all(self) -> None:
        for request_id, handle in list(self.handles.items()):
            del self.handles[request_id]
            handle._finish(error=RequestCancelledError(f"request {request_id} was cancelled"))


@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def error(self) -> dict:
        return json.loads(self.body)["error"]


async def call(app, path: str, content: bytes, headers: dict[str, str], receive: Receive | None = None) -> Reply:
    """One POST through the ASGI app. By default the whole body arrives and the client then stays connected."""
    headers = {**headers, "content-length": str(len(content))}
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }
    reply = Reply()

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            reply.body += message.get("body", b"")

    await app(scope, receive or whole_body(content), send)
    return reply


async def call_and_cancel(engine: EngineStandIn, app, path: str, content: bytes, headers: dict[str, str],
                          decompositions: int = 1) -> Reply:
    """``call``, ending the request's engine requests (cancelled: a 503) once all were submitted."""
    task = asyncio.ensure_future(call(app, path, content, headers))
    while not task.done() and len(engine.handles) < decompositions:
        await asyncio.sleep(0.01)
    engine.end_all()
    return await task


def whole_body(content: bytes, then_disconnect: bool = False) -> Receive:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": content, "more_body": False}
        if not then_disconnect:
            await asyncio.Event().wait()  # connected until the test is over
        return {"type": "http.disconnect"}

    return receive


def multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, dict[str, str]]:
    request = httpx.Request("POST", "http://test/v1/images/edits", data=fields,
                            files={"image": ("input.png", image, "image/png")})
    return request.read(), {"content-type": request.headers["content-type"]}


def make_app(engine: EngineStandIn, limits: ServerLimits | None = None, tenant: Tenant | None = None):
    return build_app(engine, tenants=TenantRegistry.open(tenant), limits=limits or ServerLimits(),
                     metrics=ServingMetrics())


FAST = {"prompt": "a ball", "layers": "1", "num_inference_steps": "1", "true_cfg_scale": "1"}


def test_a_full_queue_answers_503_before_reading_the_body():
    engine = EngineStandIn()
    engine.room = False
    app = make_app(engine)
    content, headers = multipart(FAST, png_bytes())

    async def receive() -> dict:
        raise AssertionError("the body was read although the queue is full")

    reply = asyncio.run(call(app, "/v1/images/edits", content, headers, receive))
    assert reply.status == 503 and reply.error()["code"] == "engine_overloaded"
    assert reply.headers["retry-after"] == "1" and reply.headers["connection"] == "close"
    assert engine.submitted == [] and app.state.api.admission.in_flight("default") == 0


def test_a_body_that_does_not_arrive_in_time_is_408_and_frees_the_slot():
    engine = EngineStandIn()
    tenant = Tenant("default", max_concurrency=1)
    app = make_app(engine, ServerLimits(body_timeout_s=0.2), tenant)
    content, headers = multipart(FAST, png_bytes())
    reads = 0

    async def trickle() -> dict:  # half the body, then a byte now and then, never the end
        nonlocal reads
        reads += 1
        if reads > 1:
            await asyncio.sleep(0.05)
        return {"type": "http.request", "body": content[: len(content) // 2] if reads == 1 else b"x",
                "more_body": True}

    async def run() -> tuple[Reply, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        reply = await call(app, "/v1/images/edits", content, headers, trickle)
        return reply, loop.time() - start

    reply, elapsed = asyncio.run(run())
    assert reply.status == 408 and reply.error()["code"] == "body_timeout" and "0.2 s" in reply.error()["message"]
    assert reply.headers["connection"] == "close"
    assert 0.2 <= elapsed < 2 and reads > 2
    assert app.state.api.admission.in_flight("default") == 0 and engine.submitted == []


def test_a_request_keeps_only_its_bucket_image():
    engine = EngineStandIn()
    app = make_app(engine)
    upload = Image.new("RGBA", (2000, 1000), (10, 200, 30, 255))
    buffer = io.BytesIO()
    upload.save(buffer, format="PNG")
    content, headers = multipart({**FAST, "n": "2"}, buffer.getvalue())

    assert asyncio.run(call_and_cancel(engine, app, "/v1/images/edits", content, headers, 2)).status == 503
    first, second = engine.submitted
    assert isinstance(first.image, BucketImage) and first.image is second.image  # one copy for all n
    assert (first.image.width, first.image.height) == (2000, 1000)
    assert first.image.pixels.size == bucket_size(2000, 1000, 640) == (896, 448)
    assert first.image.pixels.getpixel((0, 0)) == (10, 200, 30, 255)


@pytest.mark.parametrize("endpoint", ["edits", "generations"])
def test_work_over_the_cap_is_refused_naming_the_limit_and_the_work(endpoint):
    engine = EngineStandIn()
    fields = {"prompt": "a ball", "layers": 3, "resolution": 640, "num_inference_steps": 10, "n": 2}
    work = request_work(layers=3, bucket=(640, 640), num_inference_steps=10, cfg=True, n=2)
    assert work == 5 * 40 * 40 * 2 * 10 * 2
    for cap, tenant_cap, refused in [(work - 1, None, True), (work, None, False), (None, work - 1, True),
                                     (work - 1, work, False)]:
        app = make_app(engine, ServerLimits(max_request_work=cap), Tenant("default", max_request_work=tenant_cap))
        if endpoint == "edits":
            content, headers = multipart({k: str(v) for k, v in fields.items()}, png_bytes(64, 64))
        else:
            content, headers = json.dumps({**fields, "size": "64x64"}).encode(), {"content-type": "application/json"}
        reply = asyncio.run(call_and_cancel(engine, app, f"/v1/images/{endpoint}", content, headers, 2))
        if refused:
            error = reply.error()
            assert reply.status == 400 and error["code"] == "work_limit_exceeded"
            assert f"{work:,}" in error["message"] and f"{work - 1:,}" in error["message"]
            assert ("tenant 'default'" in error["message"]) == (tenant_cap is not None)
        else:
            assert reply.status == 503  # admitted: the stand-in then cancels it


def test_the_work_cap_is_checked_from_the_image_header_before_decoding():
    engine = EngineStandIn()
    app = make_app(engine, ServerLimits(max_request_work=1000))
    broken = png_bytes(600, 400)[:100]  # a valid header, no pixel data: decoding it would be a corrupt_image
    content, headers = multipart(FAST, broken)
    reply = asyncio.run(call(app, "/v1/images/edits", content, headers))
    assert reply.status == 400 and reply.error()["code"] == "work_limit_exceeded"
    assert engine.submitted == []


def test_a_request_id_is_taken_until_the_engine_has_let_go_of_it():
    """A client hangs up; its request is aborted but still being torn down when the id comes again."""
    engine = EngineStandIn()
    app = make_app(engine)
    content, headers = multipart(FAST, png_bytes())
    headers = {**headers, "x-request-id": "job-1"}

    async def run() -> tuple[Reply, Reply, Reply]:
        gone = await call(app, "/v1/images/edits", content, headers, whole_body(content, then_disconnect=True))
        assert engine.aborted == ["default/job-1/0"] and "default/job-1/0" in engine.handles
        again = await call(app, "/v1/images/edits", content, headers)
        engine.end_all()  # the engine lets go of the first request
        for _ in range(100):
            if not app.state.api.jobs.get("default", "job-1"):
                break
            await asyncio.sleep(0.01)
        return gone, again, await call_and_cancel(engine, app, "/v1/images/edits", content, headers)

    gone, again, later = asyncio.run(run())
    assert gone.status == 499
    error = again.error()
    assert again.status == 409 and error["code"] == "duplicate_request_id" and error["type"] == "conflict_error"
    assert "'job-1'" in error["message"] and "default/" not in error["message"]
    assert later.status == 503 and len(engine.submitted) == 2  # accepted (the stand-in then cancels it)
