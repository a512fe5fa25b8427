"""The HTTP API against a real server process (open mode, tiny model, 1-2 steps per request).

The server denoises one request at a time with a queue of two (--max-running 1 --max-queue 2), so the
overload case is reachable; the other tests send one request at a time anyway.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import zipfile
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from PIL import Image

from tests.serving.helpers import assert_error, png_bytes, start_server, wait_until

MAX_UPLOAD_MB = 1
MAX_PIXELS = 4_000_000
FAST = {"num_inference_steps": "1", "true_cfg_scale": "1"}  # one step, no CFG: the cheapest request
LONG = {"layers": "1", "num_inference_steps": "500", "prompt": "long"}  # aborted long before it ends
FAST_BYTES = {k: v.encode() for k, v in FAST.items()}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    args = ["--max-upload-mb", str(MAX_UPLOAD_MB), "--max-pixels", str(MAX_PIXELS), "--max-n", "2",
            "--max-running", "1", "--max-queue", "2", "--log-level", "info"]
    with start_server(tiny_checkpoint, tmp_path_factory.mktemp("logs"), *args) as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        yield client


def edit(http: httpx.Client, fields: dict, image: bytes | None = None, **kwargs) -> httpx.Response:
    files = {"image": ("input.png", image if image is not None else png_bytes(), "image/png")}
    return http.post("/v1/images/edits", data={"prompt": "a red ball", **fields}, files=files, **kwargs)


def decode(entry: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(entry["b64_json"])))


def health(http: httpx.Client) -> dict:
    return http.get("/health").json()


def test_openai_sdk_gets_rgba_layers_bottom_first(server, image_path):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    response = client.images.edit(
        model=server.model,
        image=open(image_path, "rb"),
        prompt="a red ball in front of a blue wall",
        extra_body={"layers": 3, "num_inference_steps": 2, "seed": 7},
    )
    assert len(response.data) == 3
    body = response.model_dump()
    assert body["layer_order"] == "bottom_to_top" and body["num_layers"] == 3
    for index, entry in enumerate(body["data"]):
        image = decode(entry)
        assert image.format == "PNG" and image.mode == "RGBA"
        assert f"{image.width}x{image.height}" == body["size"]
        assert entry["layer_index"] == index
        assert entry["role"] == ("background" if index == 0 else "layer")
        assert entry["seed"] == 7 and entry["revised_prompt"] == "a red ball in front of a blue wall"


def test_raw_multipart_with_vllm_omni_field_names(server, http):
    fields = {
        "model": server.model, "n": "1", "size": "640x640", "response_format": "b64_json", "layers": "2",
        "resolution": "640", "num_inference_steps": "1", "guidance_scale": "4.0", "negative_prompt": " ",
        "seed": "3", "cfg_normalize": "false", "use_en_prompt": "true",
    }
    response = edit(http, fields)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == response.json()["id"]
    data = response.json()["data"]
    assert [e["layer_index"] for e in data] == [0, 1]
    assert all(decode(e).mode == "RGBA" for e in data)


def test_n_decompositions_are_grouped_with_consecutive_seeds_and_webp(http):
    response = edit(http, {"n": "2", "layers": "1", "seed": "10", "output_format": "webp", **FAST})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(e["decomposition_index"], e["layer_index"], e["seed"]) for e in body["data"]] == [(0, 0, 10), (1, 0, 11)]
    assert [d["seed"] for d in body["decompositions"]] == [10, 11]
    assert body["output_format"] == "webp"
    for entry in body["data"]:
        image = decode(entry)
        assert entry["mime_type"] == "image/webp" and image.format == "WEBP" and image.mode == "RGBA"


def test_psd_package_opens_with_psd_tools(http):
    from psd_tools import PSDImage

    response = edit(http, {"layers": "2", "package": "psd", **FAST})
    assert response.status_code == 200, response.text
    (entry,) = response.json()["data"]
    assert entry["package"] == "psd" and entry["num_layers"] == 2 and "layer_index" not in entry
    psd = PSDImage.open(io.BytesIO(base64.b64decode(entry["b64_json"])))
    assert len(list(psd)) == 2


def test_pptx_package_opens_with_python_pptx(http):
    from pptx import Presentation

    response = edit(http, {"layers": "2", "package": "pptx", **FAST})
    assert response.status_code == 200, response.text
    (entry,) = response.json()["data"]
    slides = list(Presentation(io.BytesIO(base64.b64decode(entry["b64_json"]))).slides)
    assert len(slides) == 1 and len(slides[0].shapes) == 2


def test_zip_package_holds_layers_and_composite(http):
    response = edit(http, {"layers": "1", "package": "zip", **FAST})
    assert response.status_code == 200, response.text
    names = zipfile.ZipFile(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).namelist()
    assert names == ["layer_00.png", "composite.png"]


def test_stream_sends_progress_before_the_result(http):
    files = {"image": ("input.png", png_bytes(), "image/png")}
    fields = {"prompt": "a ball", "layers": "1", "num_inference_steps": "2", "stream": "true"}
    events = []
    with http.stream("POST", "/v1/images/edits", data=fields, files=files) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line.split(":", 1)[1])))
    kinds = [e for e, _ in events]
    assert kinds[-1] == "result" and kinds.count("result") == 1 and set(kinds[:-1]) == {"progress"}
    stages = [d["stage"] for e, d in events if e == "progress"]
    assert stages[0] == "queued" and events[0][1]["queue_position"] == 0
    steps = [(d["step"], d["num_steps"]) for e, d in events if e == "progress" and d["stage"] == "step"]
    assert steps == [(1, 2), (2, 2)]
    result = events[-1][1]
    assert result["type"] == "result" and len(result["data"]) == 1 and decode(result["data"][0]).mode == "RGBA"


def test_generations_are_marked_experimental(http):
    body = {"prompt": "a cat on a sofa", "layers": 1, "size": "1024x512", "num_inference_steps": 1, "true_cfg_scale": 1}
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["experimental"] is True and len(result["data"]) == 1
    width, height = decode(result["data"][0]).size
    assert width == 2 * height  # the canvas keeps the requested aspect ratio


def test_metrics_parse_and_count_traffic(server, http):
    before = server.metrics()
    edit(http, {"layers": "1", **FAST})
    edit(http, {"layers": "0"})
    after = server.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("vllm_layered:request_success_total", tenant="default") == 1
    assert delta("vllm_layered:api_requests_total", tenant="default", endpoint="edits", status="200") == 1
    assert delta("vllm_layered:api_requests_total", tenant="default", endpoint="edits", status="400") == 1
    assert delta("vllm_layered:api_rejections_total", tenant="default", reason="invalid_request") == 1
    assert delta("vllm_layered:e2e_request_latency_seconds_count", tenant="default") == 1
    assert delta("vllm_layered:request_queue_time_seconds_count", tenant="default") == 1
    assert delta("vllm_layered:layers_per_request_count", tenant="default") == 1
    assert delta("vllm_layered:step_time_seconds_count") == 1
    assert delta("vllm_layered:denoised_tokens_total") > 0
    assert after[("vllm_layered:num_requests_running", ())] == 0
    assert after[("vllm_layered:num_requests_waiting", ())] == 0


def _big_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


TRUNCATED_PNG = png_bytes()[:60]
BAD_FIELDS = [
    ({"layers": "0"}, 400, "layers", "invalid_value"),
    ({"layers": "21"}, 400, "layers", "invalid_value"),
    ({"layers": "three"}, 400, "layers", "invalid_value"),
    ({"resolution": "700"}, 400, "resolution", "invalid_value"),
    ({"num_inference_steps": "0"}, 400, "num_inference_steps", "invalid_value"),
    ({"num_inference_steps": "1001"}, 400, "num_inference_steps", "invalid_value"),
    ({"n": "0"}, 400, "n", "invalid_value"),
    ({"n": "3"}, 400, "n", "invalid_value"),
    ({"layers": "9" * 5000}, 400, "layers", "invalid_value"),
    ({"resolution": "0"}, 400, "resolution", "invalid_value"),
    ({"seed": "-1"}, 400, "seed", "invalid_value"),
    ({"seed": str(2**63)}, 400, "seed", "invalid_value"),
    ({"size": "huge"}, 400, "size", "invalid_value"),
    ({"size": "0x0"}, 400, "size", "invalid_value"),
    ({"true_cfg_scale": "inf"}, 400, "true_cfg_scale", "invalid_value"),
    ({"true_cfg_scale": "nan"}, 400, "true_cfg_scale", "invalid_value"),
    ({"true_cfg_scale": "101"}, 400, "true_cfg_scale", "invalid_value"),
    ({"guidance_scale": "-inf"}, 400, "guidance_scale", "invalid_value"),
    ({"prompt": "x" * 16385}, 400, "prompt", "invalid_value"),
    ({"layers": "20", "resolution": "1024", "num_inference_steps": "1000"}, 400, None, "work_limit_exceeded"),
    ({"model": "someone/else"}, 404, "model", "model_not_found"),
    ({"output_format": "jpeg"}, 400, "output_format", "invalid_value"),
    ({"package": "rar"}, 400, "package", "invalid_value"),
    ({"true_cfg_scale": "2", "guidance_scale": "3"}, 400, "guidance_scale", "invalid_value"),
]


@pytest.mark.parametrize(("fields", "status", "param", "code"), BAD_FIELDS, ids=[str(c[0])[:60] for c in BAD_FIELDS])
def test_bad_fields_are_4xx_with_the_error_body(http, fields, status, param, code):
    assert_error(edit(http, fields), status, param=param, code=code)


def test_url_response_format_explains_itself(http):
    error = assert_error(edit(http, {"response_format": "url"}), 400, param="response_format", code="invalid_value")
    assert "b64_json" in error["message"]


def test_work_over_the_cap_names_the_limit_and_the_work(http):
    fields = {"layers": "20", "resolution": "1024", "num_inference_steps": "100", "seed": "1"}
    error = assert_error(edit(http, fields, image=png_bytes(64, 64)), 400, code="work_limit_exceeded")
    assert "18,022,400 image token-forwards" in error["message"]  # 22 x 64 x 64 x 2 (CFG) x 100
    assert "limit of 10,000,000" in error["message"]


def _multipart(fields: dict[str, bytes], charset: str) -> tuple[bytes, dict[str, str]]:
    """A multipart body whose text fields are in ``charset`` (starlette decodes them with it)."""
    parts = [b'--b0\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (k.encode(), v)
             for k, v in fields.items()]
    parts.append(b'--b0\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                 b"Content-Type: image/png\r\n\r\n" + png_bytes() + b"\r\n--b0--\r\n")
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary=b0; charset={charset}"}


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_text_the_tokenizer_cannot_take_is_400_naming_the_field(server, http, field):
    errors = server.sample("vllm_layered:request_failure_total", tenant="default", reason="error")
    body = {"prompt": "a cat", "layers": 1, field: "a \ud800 b"}  # JSON spells a lone surrogate as an escape
    response = http.post("/v1/images/generations", content=json.dumps(body), headers=JSON)
    error = assert_error(response, 400, param=field, code="invalid_value")
    assert "lone surrogate U+D800" in error["message"]
    # a form may declare a charset that spells one too
    content, headers = _multipart({"prompt": b"a cat", field: b"a \\ud800 b", **FAST_BYTES}, "unicode-escape")
    error = assert_error(http.post("/v1/images/edits", content=content, headers=headers), 400, param=field)
    assert "lone surrogate U+D800" in error["message"]
    assert server.sample("vllm_layered:request_failure_total", tenant="default", reason="error") == errors


JSON_FAULTS = [
    (b"{bad json", None, "bad_body"),
    (b"[" * 100000 + b"]" * 100000, None, "bad_body"),
    (b'{"prompt": "x", "layers": ' + b"9" * 5000 + b"}", None, "bad_body"),
    (b'{"prompt": "x", "true_cfg_scale": NaN}', None, "bad_body"),
    (b'{"prompt": "x", "true_cfg_scale": 1e999}', "true_cfg_scale", "invalid_value"),
    (b'{"prompt": "x", "layers": true}', "layers", "invalid_value"),
    (b'"a string"', None, "bad_body"),
]


def _client_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_json_faults_are_400_and_the_connection_stays_usable(server):
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        ports = set()
        for body, param, code in JSON_FAULTS:
            response = client.post("/v1/images/generations", content=body, headers=JSON)
            assert_error(response, 400, param=param, code=code)
            ports.add(_client_port(response))
        good = {"prompt": "a cat", "layers": 1, "num_inference_steps": 1, "true_cfg_scale": 1}
        response = client.post("/v1/images/generations", json=good)
        assert response.status_code == 200, response.text
        ports.add(_client_port(response))
    assert len(ports) == 1  # one keep-alive connection served them all


BAD_IMAGES = [
    (b"this is not an image", 400, "not_an_image"),
    (TRUNCATED_PNG, 400, "corrupt_image"),
    (_big_png(2100, 2000), 413, "too_many_pixels"),
    (_big_png(1000, 20), 400, "bad_aspect_ratio"),
    (b"", 400, "empty_image"),
]


@pytest.mark.parametrize(("image", "status", "code"), BAD_IMAGES, ids=[c[2] for c in BAD_IMAGES])
def test_bad_images_are_4xx(http, image, status, code):
    assert_error(edit(http, {}, image=image), status, param="image", code=code)


def test_missing_image_is_400(http):
    response = http.post("/v1/images/edits", data={"prompt": "x"}, files={"mask": ("m.png", png_bytes())})
    assert_error(response, 400, param="image", code="missing_image")


def test_oversized_upload_is_413_with_and_without_content_length(http):
    blob = b"\0" * (MAX_UPLOAD_MB * (1 << 20) + 1)
    assert_error(edit(http, {}, image=blob), 413, code="upload_too_large")

    def chunked():  # a generator body is sent chunked: the server has no length to check up front
        boundary = b"--xx\r\n"
        yield boundary + b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(2 * MAX_UPLOAD_MB * 16):
            yield b"\0" * (1 << 16)

    response = http.post(
        "/v1/images/edits", content=chunked(), headers={"Content-Type": "multipart/form-data; boundary=xx"}
    )
    assert_error(response, 413, code="upload_too_large")


def test_malformed_bodies_are_400(http):
    garbage = http.post(
        "/v1/images/edits", content=b"garbage", headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert_error(garbage, 400, code="bad_multipart")
    assert_error(http.post("/v1/images/edits", json={"prompt": "x"}), 400, code="bad_body")
    assert_error(edit(http, {}, headers={"X-Request-Id": "not a valid id!"}), 400, code="bad_request_id")
    assert_error(http.post("/v1/images/generations", json={"prompt": "  "}), 400, param="prompt")
    assert_error(http.get("/v1/no-such-route"), 404, code="http_404")
    assert_error(http.get("/v1/images/edits"), 405, code="http_405")


def test_the_server_still_serves_after_bad_requests(http):
    assert health(http)["status"] == "ok"
    response = edit(http, {"layers": "1", **FAST})
    assert response.status_code == 200 and len(response.json()["data"]) == 1


def _wait_idle(server, http) -> None:
    wait_until(lambda: health(http)["num_requests_running"] + health(http)["num_requests_waiting"] == 0,
               what="the engine to drop the request")


def test_client_disconnect_aborts_the_engine_request(server, http):
    cancelled = server.sample("vllm_layered:request_failure_total", tenant="default", reason="cancelled")
    gone = server.sample("vllm_layered:api_requests_total", tenant="default", endpoint="edits", status="499")
    with pytest.raises(httpx.ReadTimeout):
        edit(http, LONG, timeout=httpx.Timeout(300, read=3))
    _wait_idle(server, http)
    with http.stream("POST", "/v1/images/edits", data={**LONG, "stream": "true"},
                     files={"image": ("a.png", png_bytes())}) as response:
        next(response.iter_lines())  # the first progress event, then hang up
    _wait_idle(server, http)
    wait_until(lambda: server.sample("vllm_layered:request_failure_total", tenant="default", reason="cancelled")
               == cancelled + 2, what="two cancellations")
    status_499 = server.sample("vllm_layered:api_requests_total", tenant="default", endpoint="edits", status="499")
    assert status_499 == gone + 2


def test_delete_cancels_a_request_in_flight(server, http):
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(edit, http, LONG, headers={"X-Request-Id": "cancel-me"})
        wait_until(lambda: health(http)["num_requests_running"] == 1, what="the request to start")
        assert_error(edit(http, LONG, headers={"X-Request-Id": "cancel-me"}), 409, code="duplicate_request_id")
        response = http.delete("/v1/requests/cancel-me")
        assert response.status_code == 200 and response.json()["cancelled"] is True
        assert_error(pending.result(timeout=60), 409, code="request_cancelled")
    # the id stays taken until the engine has let go of the cancelled work (docs/serving.md), then it is unknown
    wait_until(lambda: http.delete("/v1/requests/cancel-me").status_code == 404, what="the id to be released")
    assert_error(http.delete("/v1/requests/cancel-me"), 404, code="request_not_found")


def test_full_queue_is_503_with_retry_after(server, http):
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(edit, http, LONG, headers={"X-Request-Id": "running"})
        wait_until(lambda: health(http)["num_requests_running"] == 1, what="the first request to start")
        waiting = pool.submit(edit, http, LONG, headers={"X-Request-Id": "waiting"})
        wait_until(lambda: health(http)["num_requests_waiting"] == 1, what="the second request to queue")
        response = edit(http, {"n": "2", "layers": "1", **FAST})  # one decomposition fits, the other does not
        assert_error(response, 503, code="engine_overloaded")
        assert int(response.headers["retry-after"]) >= 1
        assert health(http)["num_requests_waiting"] == 1  # all or nothing: the one that fitted was withdrawn
        for request_id in ("waiting", "running"):
            assert http.delete(f"/v1/requests/{request_id}").status_code == 200
        assert running.result(timeout=60).status_code == 409 and waiting.result(timeout=60).status_code == 409
    assert server.sample("vllm_layered:request_failure_total", tenant="default", reason="overloaded") >= 1


def test_models_and_docs(server, http):
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [server.model]
    schema = http.get("/openapi.json").json()
    assert {"/v1/images/edits", "/v1/images/generations", "/v1/models", "/health"} <= set(schema["paths"])
    assert http.get("/docs").status_code == 200


def test_a_full_queue_answers_at_once_without_reading_the_upload(server, http):
    with ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(edit, http, LONG, headers={"X-Request-Id": "q-running"})]
        wait_until(lambda: health(http)["num_requests_running"] == 1, what="the first request to start")
        pending += [pool.submit(edit, http, LONG, headers={"X-Request-Id": f"q-waiting-{i}"}) for i in range(2)]
        wait_until(lambda: health(http)["num_requests_waiting"] == 2, what="the queue to fill")
        address = urlsplit(server.base_url)
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            # the headers of a 900 kB upload and none of its body: a server that read it would wait for it
            sock.sendall(b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n"
                         b"Content-Type: multipart/form-data; boundary=b0\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):  # the server closes the connection after answering
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "engine_overloaded"
        for request_id in ("q-waiting-1", "q-waiting-0", "q-running"):
            assert http.delete(f"/v1/requests/{request_id}").status_code == 200
        assert [p.result(timeout=60).status_code for p in pending] == [409, 409, 409]


def test_the_startup_log_names_the_model_device_and_dtype(server):
    """An operator reading the log sees what is served, where and how."""
    line = next(line for line in server.log.read_text().splitlines() if "serving " in line)
    assert "tiny-qwen-image-layered" in line and "cpu" in line and "float32" in line, line
