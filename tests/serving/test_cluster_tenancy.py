"""Two real `serve` replicas sharing one real redis-server (--tenant-store): tenant limits hold cluster-wide,
a killed replica's leases free within the TTL, a Redis restart leaves no stuck lease, and a key removed
from one replica's keys file is refused by both."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serving.helpers import assert_error, png_bytes, start_server, wait_until
from tests.serving.redis_server import running_redis
from vllm_layered.serving.redis_store import lease_key
from vllm_layered.serving.tenants import hash_key

TTL_S = 2.0
KEYS = {"pair": "sk-pair-0123456789", "rate": "sk-rate-0123456789", "solo": "sk-solo-0123456789",
        "gone": "sk-gone-0123456789"}
TENANTS = [
    {"name": "pair", "api_key_sha256": [hash_key(KEYS["pair"])], "max_concurrency": 2},
    {"name": "rate", "api_key_sha256": [hash_key(KEYS["rate"])], "requests_per_minute": 2, "burst": 2},
    {"name": "solo", "api_key_sha256": [hash_key(KEYS["solo"])], "max_concurrency": 1},
    {"name": "gone", "api_key_sha256": [hash_key(KEYS["gone"])]},
]
LONG = {"prompt": "long", "layers": "1", "num_inference_steps": "500", "true_cfg_scale": "1"}


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, tmp_path_factory):
    """(redis, [replica A, replica B], start_replica): each replica reads its own copy of the keys file."""
    folder = tmp_path_factory.mktemp("cluster")
    with running_redis(folder) as redis_server, contextlib.ExitStack() as stack:

        def start_replica():
            keys = folder / f"keys-{time.monotonic_ns()}.json"
            keys.write_text(json.dumps({"tenants": TENANTS}))
            server = stack.enter_context(start_server(
                tiny_checkpoint, folder, "--api-keys", str(keys), "--tenant-store", redis_server.url,
                "--tenant-lease-ttl", str(TTL_S),
            ))
            server.keys_file = keys
            return server

        with ThreadPoolExecutor(2) as pool:  # the two start side by side
            replicas = list(pool.map(lambda _: start_replica(), range(2)))
        yield redis_server, replicas, start_replica


def client(server, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=300)


def admitted_cheaply(server, tenant: str) -> httpx.Response:
    """A request that passes admission and fails at once after it (400: no image): takes a rate token,
    holds a concurrency slot only for an instant."""
    with client(server, tenant) as http:
        return http.post("/v1/images/edits", data={"prompt": "x"}, files={"mask": ("m", b"x")})


def is_refused(server, tenant: str, code: str = "concurrency_limited") -> bool:
    response = admitted_cheaply(server, tenant)
    if response.status_code == 429:
        assert_error(response, 429, code=code)
        return True
    assert_error(response, 400)
    return False


def start_long(pool: ThreadPoolExecutor, server, tenant: str, request_id: str):
    """A long request in the background, once the replica runs it (a concurrency slot held)."""

    def edit():
        with client(server, tenant) as http:
            files = {"image": ("input.png", png_bytes(), "image/png")}
            return http.post("/v1/images/edits", data=LONG, files=files, headers={"X-Request-Id": request_id})

    running_before = httpx.get(f"{server.base_url}/health").json()["num_requests_running"]
    pending = pool.submit(edit)
    wait_until(lambda: httpx.get(f"{server.base_url}/health").json()["num_requests_running"] > running_before,
               what=f"{request_id} to run")
    return pending


def cancel(server, tenant: str, request_id: str, pending) -> None:
    with client(server, tenant) as http:
        assert http.delete(f"/v1/requests/{request_id}").status_code == 200
    assert_error(pending.result(timeout=60), 409, code="request_cancelled")


def test_third_concurrent_request_is_429_whichever_replica_it_hits(cluster):
    _, (a, b), _ = cluster
    with ThreadPoolExecutor(2) as pool:
        held = [(a, "pair-a", start_long(pool, a, "pair", "pair-a")),
                (b, "pair-b", start_long(pool, b, "pair", "pair-b"))]
        assert is_refused(a, "pair") and is_refused(b, "pair")
        for server, request_id, pending in held:
            cancel(server, "pair", request_id, pending)
    assert not is_refused(a, "pair") and not is_refused(b, "pair")  # both slots came back


def test_rate_limit_holds_across_replicas(cluster):
    _, (a, b), _ = cluster
    assert not is_refused(a, "rate") and not is_refused(b, "rate")  # the bucket of two, one token on each
    for server in (a, b):
        response = admitted_cheaply(server, "rate")
        assert_error(response, 429, code="rate_limited")
        assert 1 <= int(response.headers["retry-after"]) <= 30


def test_a_killed_replicas_lease_frees_within_the_ttl(cluster):
    _, (a, _), start_replica = cluster
    doomed = start_replica()
    with ThreadPoolExecutor(1) as pool:
        pending = start_long(pool, doomed, "solo", "solo-doomed")
        assert is_refused(a, "solo")
        doomed.process.kill()  # SIGKILL: no release, no more renewals
        killed = time.monotonic()
        with pytest.raises(httpx.HTTPError):
            pending.result(timeout=60)
    assert is_refused(a, "solo"), "the lease outlives its holder until the TTL"
    wait_until(lambda: not is_refused(a, "solo"), timeout_s=TTL_S + 3, what="the dead replica's lease to expire")
    assert time.monotonic() - killed <= TTL_S + 3


def test_a_redis_restart_leaves_no_stuck_lease(cluster):
    redis_server, (a, b), _ = cluster
    with ThreadPoolExecutor(1) as pool:
        pending = start_long(pool, a, "solo", "solo-restart")
        redis_server.restart()  # no persistence: every lease and the settings are gone
        # replica A's renewal registers its running request again; until then B may admit by its own limits
        wait_until(lambda: is_refused(b, "solo"), timeout_s=3 * TTL_S, what="the running request's lease")
        cancel(a, "solo", "solo-restart", pending)
    assert not is_refused(b, "solo") and not is_refused(a, "solo")
    assert redis_server.client().zcard(lease_key("solo")) == 0
    assert a.sample("vllm_layered:tenant_store_up", store="redis") == 1


def test_a_key_removed_from_one_replicas_file_is_refused_by_both(cluster):
    _, (a, b), _ = cluster
    for server in (a, b):
        with client(server, "gone") as http:
            assert http.get("/v1/models").status_code == 200
    a.keys_file.write_text(json.dumps({"tenants": [t for t in TENANTS if t["name"] != "gone"]}))
    started = time.monotonic()
    for server in (a, b):  # B's file is unchanged: the settings reach it through Redis
        with client(server, "gone") as http:
            wait_until(lambda http=http: http.get("/v1/models").status_code == 401, timeout_s=5,
                       what=f"{server.base_url} to refuse the removed key")
    assert time.monotonic() - started < 5
    assert b.sample("vllm_layered:tenant_settings_reloads_total", source="store", outcome="applied") >= 1
    with client(b, "pair") as http:  # the others keep their keys
        assert http.get("/v1/models").status_code == 200


def test_refuse_policy_answers_503_while_the_store_is_unreachable(tiny_checkpoint, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"tenants": TENANTS}))
    with socket.socket() as closed:  # bound, never listening: nothing answers there
        closed.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"
        with start_server(tiny_checkpoint, tmp_path, "--api-keys", str(keys), "--tenant-store", url,
                          "--tenant-store-fallback", "refuse") as server:
            started = time.monotonic()
            response = admitted_cheaply(server, "pair")
            assert time.monotonic() - started < 5
            assert_error(response, 503, code="tenant_store_unavailable")
            assert int(response.headers["retry-after"]) >= 1
            assert httpx.get(f"{server.base_url}/health").status_code == 200
            assert server.sample("vllm_layered:tenant_store_up", store="redis") == 0
            labels = dict(tenant="pair", reason="tenant_store_unavailable")
            assert server.sample("vllm_layered:api_rejections_total", **labels) == 1
