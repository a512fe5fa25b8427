"""API keys, per-tenant limits and tenant isolation against a real server started with --api-keys."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.serving.helpers import assert_error, png_bytes, start_server, wait_until
from vllm_layered.serving.tenants import hash_key

KEYS = {"alpha": "sk-alpha-0123456789", "beta": "sk-beta-0123456789"}
LONG = {"prompt": "long", "layers": "1", "num_inference_steps": "500", "true_cfg_scale": "1"}
# 1 layer, no CFG, on the 64x48 input's 736x544 bucket: 3 x 46 x 34 = 4692 image tokens per step
ALPHA_WORK_CAP = 4692 * 500
BODY_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenants")
    keys_file = folder / "keys.json"
    keys_file.write_text(json.dumps({"tenants": [
        {"name": "alpha", "api_key_sha256": [hash_key(KEYS["alpha"])], "max_concurrency": 1, "priority": 1,
         "max_request_work": ALPHA_WORK_CAP},
        {"name": "beta", "api_key_sha256": hash_key(KEYS["beta"]), "requests_per_minute": 2, "weight": 2.0},
    ]}))
    with start_server(tiny_checkpoint, folder, "--api-keys", str(keys_file),
                      "--body-timeout", str(BODY_TIMEOUT_S)) as server:
        yield server


def client(server, tenant: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    return httpx.Client(base_url=server.base_url, headers=headers, timeout=300)


def edit(http: httpx.Client, fields: dict | None = None, **kwargs) -> httpx.Response:
    files = {"image": ("input.png", png_bytes(), "image/png")}
    return http.post("/v1/images/edits", data=fields or {"prompt": "x"}, files=files, **kwargs)


@pytest.mark.parametrize("authorization", [None, "Bearer sk-wrong", "Basic c2stYWxwaGE=", "Bearer", KEYS["alpha"]])
def test_missing_or_wrong_key_is_401(server, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    with httpx.Client(base_url=server.base_url, headers=headers) as http:
        response = edit(http)
        assert_error(response, 401, code="invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(http.get("/v1/models"), 401)
        assert_error(http.delete("/v1/requests/anything"), 401)
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
    assert server.sample("vllm_layered:api_rejections_total", tenant="unauthenticated", reason="unauthorized") >= 1
    labels = dict(tenant="unauthenticated", endpoint="edits", status="401")
    assert server.sample("vllm_layered:api_requests_total", **labels) >= 1


def test_openai_sdk_with_a_wrong_key_gets_an_authentication_error(server, image_path):
    sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.images.edit(image=open(image_path, "rb"), prompt="x", extra_body={"layers": 1})
    sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEYS["alpha"], max_retries=0)
    assert [m.id for m in sdk.models.list().data] == [server.model]


def test_rate_limit_is_429_with_retry_after(server):
    with client(server, "beta") as beta:
        # Cheap requests (no image: 400 after admission) use up the bucket of two.
        for _ in range(2):
            assert_error(beta.post("/v1/images/edits", data={"prompt": "x"}, files={"mask": ("m", b"x")}), 400)
        response = edit(beta)
        assert_error(response, 429, code="rate_limited")
        assert 1 <= int(response.headers["retry-after"]) <= 30
    assert server.sample("vllm_layered:api_rejections_total", tenant="beta", reason="rate_limited") == 1
    with client(server, "alpha") as alpha:  # another tenant's bucket is its own
        assert_error(alpha.post("/v1/images/edits", data={"prompt": "x"}), 400, code="bad_body")


def test_concurrency_limit_and_tenant_isolation(server):
    with client(server, "alpha") as alpha, client(server, "beta") as beta, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(edit, alpha, LONG, headers={"X-Request-Id": "alpha-job"})
        wait_until(lambda: alpha.get("/health").json()["num_requests_running"] == 1,
                   what="alpha's request to reach the engine")
        response = edit(alpha, LONG)
        assert_error(response, 429, code="concurrency_limited")
        assert int(response.headers["retry-after"]) >= 1
        assert server.sample("vllm_layered:api_rejections_total", tenant="alpha", reason="concurrency_limited") == 1
        # beta can neither see nor cancel alpha's request: same answer as for an unknown id
        assert_error(beta.delete("/v1/requests/alpha-job"), 404, code="request_not_found")
        assert not pending.done()
        assert alpha.delete("/v1/requests/alpha-job").status_code == 200
        assert_error(pending.result(timeout=60), 409, code="request_cancelled")
    # the engine saw alpha's tenant name
    wait_until(lambda: server.sample("vllm_layered:request_failure_total", tenant="alpha", reason="cancelled") == 1,
               what="the cancellation in the engine metrics")


def test_a_tenant_work_cap_replaces_the_server_one(server):
    with client(server, "alpha") as alpha:
        error = assert_error(edit(alpha, {**LONG, "num_inference_steps": "501"}), 400, code="work_limit_exceeded")
    assert f"{4692 * 501:,}" in error["message"] and f"tenant 'alpha''s limit of {ALPHA_WORK_CAP:,}" in error["message"]
    assert server.sample("vllm_layered:api_rejections_total", tenant="alpha", reason="work_limit") == 1


def test_a_trickling_upload_is_408_and_frees_the_tenant_slot(server):
    """alpha may have one request in flight: a client sending its body a byte at a time must not keep it."""
    address = urlsplit(server.base_url)
    start = time.monotonic()
    with socket.create_connection((address.hostname, address.port), timeout=0.2) as sock:
        sock.sendall(f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['alpha']}\r\n"
                     "Content-Length: 100000\r\nContent-Type: multipart/form-data; boundary=b0\r\n\r\n"
                     '--b0\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'.encode())
        answer = b""
        while time.monotonic() - start < 30:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b"x")  # one more byte of the image every 0.2 s: the body never ends
                continue
            if not chunk:
                break
            answer += chunk
    elapsed = time.monotonic() - start
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), answer
    assert json.loads(body)["error"]["code"] == "body_timeout"
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 10
    with client(server, "alpha") as alpha:  # the slot is free again: not a 429
        assert edit(alpha, {**LONG, "num_inference_steps": "1"}).status_code == 200
    assert server.sample("vllm_layered:api_rejections_total", tenant="alpha", reason="body_timeout") == 1
    assert server.sample("vllm_layered:api_requests_total", tenant="alpha", endpoint="edits", status="408") == 1
