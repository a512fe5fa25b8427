"""What the API decides before the engine runs anything: queue room before the body is read, the body deadline,
the work cap, what a request keeps of its upload, request ids that the engine still holds, and a tree request's
refinements (every form they come in, their errors, the whole tree's work, one engine request and one slot).

The app is driven through ASGI directly, over an engine stand-in that records what it is given and ends
requests only when the test says, so that each case happens at a known moment (no model, no timing luck).
tests/serving/test_api_server.py checks the same behaviour end to end against a real server process.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from PIL import Image

from tests.serving.helpers import png_bytes
from vllm_layered.layer_tree import EmptyLayerError, Refinement
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

    def work_tokens(self) -> tuple[int, int]:
        return 0, 0

    def has_queue_room(self, tenant: str) -> bool:
        return self.room

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


def multipart_fields(fields: dict[str, str | list[str]], image: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart body in which a list value is sent as repeated fields, in order (as the openai SDK does)."""
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


TREE = {**FAST, "layers": "2", "refine": json.dumps([{"layer": "1", "layers": 2}, {"layer": "1.0", "layers": 2}])}
TREE_REFINE = (Refinement("1", 2), Refinement("1.0", 2))


@pytest.mark.parametrize("fields", [
    {"refine": json.dumps([{"layer": "1", "layers": 2}, {"layer": "1.0", "layers": 2, "prompt": "a cushion"}])},
    {"refine[][layer]": ["1", "1.0"], "refine[][layers]": ["2", "2"], "refine[][prompt]": ["", "a cushion"]},
    {"refine[]": ["1:2"], "refine[][layer]": "1.0", "refine[][layers]": "2", "refine[][prompt]": "a cushion"},
], ids=["json-string", "openai-sdk-list-of-dicts", "list-of-strings-and-dicts"])
def test_refine_arrives_in_every_form_a_client_sends(fields):
    """The openai SDK sends extra_body={"refine": [dict, ...]} field by field (refine[][layer], ...), a list of
    strings as refine[]; a JSON array string is one field. All give the same refinements."""
    engine = EngineStandIn()
    content, headers = multipart_fields({**FAST, "layers": "2", **fields}, png_bytes())
    assert asyncio.run(call_and_cancel(engine, make_app(engine), "/v1/images/edits", content, headers)).status == 503
    (submitted,) = engine.submitted
    assert [(r.path, r.layers) for r in submitted.refine] == [("1", 2), ("1.0", 2)]
    assert submitted.refine[0].prompt in (None, "") and submitted.refine[1].prompt == "a cushion"  # "": captioned


@pytest.mark.parametrize("fields, message", [
    ({"refine": "[1:2]"}, "refine is not a valid JSON array"),
    ({"refine": "2:2"}, r"refine 2: no such layer; the root decomposition has 2 layer\(s\)"),
    ({"refine": "1:2", "layers": "21"}, "layers must be between 1 and 20"),
    ({"refine[][layer]": ["1", "1.0"], "refine[][layers]": "2"}, "2 'layer' and 1 'layers' values"),
    ({"refine[]": ["1:2", "1.0:2"], "refine[][layer]": "1.0", "refine[][layers]": "3"}, "layer 1.0 is refined twice"),
])
def test_bad_refinements_are_400_naming_refine_before_any_work(fields, message):
    engine = EngineStandIn()
    content, headers = multipart_fields({**FAST, "layers": "2", **fields}, png_bytes())
    reply = asyncio.run(call(make_app(engine), "/v1/images/edits", content, headers))
    error = reply.error()
    assert reply.status == 400 and error["code"] == "invalid_value", error
    assert error["param"] == ("layers" if "between" in message else "refine")
    assert re.search(message, error["message"]), error["message"]
    assert engine.submitted == []


@pytest.mark.parametrize("endpoint", ["edits", "generations"])
def test_a_tree_is_one_engine_request_its_whole_work_checked_before_any(endpoint):
    """Root and refinements count at the root bucket's size: 3 decompositions of (2 + 2) frames of 40 x 40
    patches, one step, no CFG. One token-forward short of it is refused; at the cap the tree is ONE request."""
    work = request_work(layers=2, bucket=(640, 640), num_inference_steps=1, cfg=False, n=1, refine_layers=[2, 2])
    assert work == 3 * 4 * 40 * 40 == 3 * request_work(layers=2, bucket=(640, 640), num_inference_steps=1, cfg=False,
                                                       n=1)
    for cap, refused in [(work - 1, True), (work, False)]:
        engine = EngineStandIn()
        app = make_app(engine, ServerLimits(max_request_work=cap))
        if endpoint == "edits":
            content, headers = multipart(TREE, png_bytes(64, 64))
        else:
            body = {**FAST, "layers": 2, "num_inference_steps": 1, "true_cfg_scale": 1, "size": "64x64",
                    "refine": json.loads(TREE["refine"])}
            content, headers = json.dumps(body).encode(), {"content-type": "application/json"}
        reply = asyncio.run(call_and_cancel(engine, app, f"/v1/images/{endpoint}", content, headers))
        if refused:
            assert reply.status == 400 and reply.error()["code"] == "work_limit_exceeded"
            assert f"{work:,}" in reply.error()["message"] and engine.submitted == []
        else:
            assert reply.status == 503  # admitted: the stand-in then cancels it
            (submitted,) = engine.submitted
            assert submitted.refine == TREE_REFINE


def test_a_tree_holds_one_concurrency_slot():
    """Its refinements run inside its one engine request: a second request of a tenant with max_concurrency 1 is
    refused while the tree runs, and admitted once it has ended."""
    engine = EngineStandIn()
    app = make_app(engine, tenant=Tenant("default", max_concurrency=1))
    tree, tree_headers = multipart(TREE, png_bytes())
    plain, plain_headers = multipart(FAST, png_bytes())

    async def run() -> tuple[int, Reply, Reply, Reply]:
        first = asyncio.ensure_future(call(app, "/v1/images/edits", tree, tree_headers))
        while not engine.handles:
            await asyncio.sleep(0.01)
        in_flight = app.state.api.admission.in_flight("default")
        refused = await call(app, "/v1/images/edits", plain, plain_headers)
        engine.end_all()
        ended = await first
        return in_flight, refused, ended, await call_and_cancel(engine, app, "/v1/images/edits", plain, plain_headers)

    in_flight, refused, ended, later = asyncio.run(run())
    assert in_flight == 1 and len(engine.submitted) == 2 and engine.submitted[0].refine == TREE_REFINE
    assert refused.status == 429 and refused.error()["code"] == "concurrency_limited"
    assert ended.status == 503 and later.status == 503  # both admitted (the stand-in cancels them)


@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_layer_to_refine_is_a_400_naming_refine(stream):
    """Known only once the layer is decoded: the engine ends the tree with EmptyLayerError."""
    engine = EngineStandIn()
    app = make_app(engine)
    content, headers = multipart({**TREE, "stream": str(stream).lower()}, png_bytes())

    async def run() -> Reply:
        task = asyncio.ensure_future(call(app, "/v1/images/edits", content, headers))
        while not engine.handles:
            await asyncio.sleep(0.01)
        (handle,) = engine.handles.values()
        handle._finish(error=EmptyLayerError("1"))
        return await task

    reply = asyncio.run(run())
    if stream:
        assert reply.status == 200
        event, data = reply.body.decode().strip().split("\n\n")[-1].split("\n")
        assert event == "event: error"
        error = json.loads(data.removeprefix("data: "))
        assert error["status"] == 400
        error = error["error"]
    else:
        assert reply.status == 400
        error = reply.error()
    assert (error["code"], error["param"]) == ("empty_layer", "refine")
    assert error["message"] == "cannot refine layer 1: it is empty (fully transparent)"
