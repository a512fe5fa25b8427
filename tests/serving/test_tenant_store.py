"""Tenant stores: the in-process one (keys file reloads) and the Redis one against a real redis-server, with
two store instances standing for two replicas."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tests.serving.redis_server import running_redis
from tests.serving.test_tenants import write_keys
from vllm_layered.cli import build_parser
from vllm_layered.serving.launcher import build_tenant_store
from vllm_layered.serving.metrics import ServingMetrics
from vllm_layered.serving.redis_store import SETTINGS_KEY, RedisTenantStore, lease_key
from vllm_layered.serving.tenant_store import (
    KeysFile,
    LiveTenants,
    LocalTenantStore,
    TenantStoreUnavailableError,
)
from vllm_layered.serving.tenants import AdmissionError, AuthenticationError, Tenant, TenantRegistry, hash_key

TTL_S = 1.0  # the shortest lease TTL: the stores tick every TTL / 3


def tenant_entry(name: str, key: str, **limits) -> dict:
    return {"name": name, "api_key_sha256": [hash_key(key)], **limits}


def rewrite(path: Path, tenants: list[dict]) -> None:
    path.write_text(json.dumps({"tenants": tenants}))


def sample(metrics: ServingMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"vllm_layered:{name}", labels)


def eventually(predicate, timeout_s: float, what: str) -> float:
    """Seconds until ``predicate()`` held (polled every 20 ms); fails after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def up(store: RedisTenantStore) -> bool:
    return sample(store.metrics, "tenant_store_up", store="redis") == 1


def refused(store, tenant: Tenant, reason: str = "concurrency_limited") -> bool:
    """Whether ``store`` refuses ``tenant`` for ``reason`` now (an admission it grants is released at once)."""
    try:
        store.admit(tenant).release()
    except AdmissionError as e:
        assert e.reason == reason, e
        return True
    return False


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    if redis_server.process is None:  # a test left it stopped
        redis_server.start()
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def replicas(tmp_path, redis_url):
    """``replicas(tenants, n=2, **store_kwargs)``: n started stores on one Redis, each with its own copy of
    the keys file (a Secret mounted in each pod) and its own metrics, closed at the end."""
    stores = []

    def make(tenants: list[dict], n: int = 2, lease_ttl_s: float = TTL_S, **kwargs) -> list[RedisTenantStore]:
        for _ in range(n):
            path = tmp_path / f"keys-{len(stores)}.json"
            rewrite(path, tenants)
            store = RedisTenantStore(redis_url, KeysFile(path), lease_ttl_s=lease_ttl_s, metrics=ServingMetrics(),
                                     **kwargs)
            store.start()
            stores.append(store)
        return stores[-n:]

    yield make
    for store in stores:
        store.close()


# -- the Redis store: limits shared by replicas --------------------------------------------------------


def test_rate_limit_holds_across_replicas(replicas):
    a, b = replicas([tenant_entry("t", "k", requests_per_minute=60, burst=3)])
    tenant = a.tenants.tenants["t"]
    for store in (a, b, a):
        store.admit(tenant).release()
    with pytest.raises(AdmissionError) as e:
        b.admit(tenant)
    assert e.value.reason == "rate_limited" and 0.5 < e.value.retry_after_s <= 1.0
    assert refused(a, tenant, "rate_limited")
    time.sleep(e.value.retry_after_s + 0.05)  # 1 token per second
    b.admit(tenant).release()
    assert refused(a, tenant, "rate_limited")


def test_concurrency_limit_holds_across_replicas_and_refusals_take_no_token(replicas):
    a, b = replicas([tenant_entry("t", "k", max_concurrency=2, requests_per_minute=6, burst=3)])
    tenant = a.tenants.tenants["t"]
    first, second = a.admit(tenant), b.admit(tenant)
    for store in (a, b):
        with pytest.raises(AdmissionError) as e:
            store.admit(tenant)
        assert e.value.reason == "concurrency_limited" and e.value.status_code == 429
    first.release()
    first.release()  # idempotent
    third = b.admit(tenant)  # the third token: the two refusals took none
    assert refused(a, tenant)
    second.release()
    third.release()
    assert refused(a, tenant, "rate_limited")


def test_a_crashed_replicas_leases_expire_within_the_ttl(replicas):
    ttl_s = 2.0
    a, b = replicas([tenant_entry("t", "k", max_concurrency=2)], lease_ttl_s=ttl_s)
    tenant = a.tenants.tenants["t"]
    a.admit(tenant), a.admit(tenant)
    a.close()  # the replica dies: its requests are never released and nobody renews their leases
    crashed = time.monotonic()
    assert refused(b, tenant)
    time.sleep(ttl_s / 4)  # the last renewal was at most TTL / 3 before the crash
    assert refused(b, tenant), "freed before the TTL"
    eventually(lambda: not refused(b, tenant), ttl_s + 1.0, "the crashed replica's leases to expire")
    assert time.monotonic() - crashed <= ttl_s + 1.0


def test_a_running_request_keeps_its_lease_past_the_ttl(replicas, redis_server):
    a, b = replicas([tenant_entry("t", "k", max_concurrency=1)])
    tenant = a.tenants.tenants["t"]
    running = a.admit(tenant)
    time.sleep(2.5 * TTL_S)  # renewed every TTL / 3
    assert refused(b, tenant)
    assert redis_server.client().zcard(lease_key("t")) == 1  # one lease per request
    running.release()
    assert redis_server.client().zcard(lease_key("t")) == 0  # released at once, not at expiry
    b.admit(tenant).release()


def test_a_redis_restart_leaves_no_stuck_lease(replicas, redis_server):
    a, b = replicas([tenant_entry("t", "k", max_concurrency=1)])
    tenant = a.tenants.tenants["t"]
    running = a.admit(tenant)
    redis_server.restart()  # without persistence: the lease and the settings are gone
    # the holder's next renewal registers the running request again, and the settings come back
    eventually(lambda: refused(b, tenant), 3 * TTL_S, "the running request's lease to come back")
    assert redis_server.client().get(SETTINGS_KEY) == a.settings_text
    running.release()
    b.admit(tenant).release()  # nothing stuck


def test_a_lease_released_while_redis_was_down_expires_after_a_persistent_restart(tmp_path):
    ttl_s = 2.0
    with running_redis(tmp_path, persistent=True) as server:
        path = tmp_path / "keys.json"
        rewrite(path, [tenant_entry("t", "k", max_concurrency=1)])
        a, b = (RedisTenantStore(server.url, KeysFile(path), lease_ttl_s=ttl_s, metrics=ServingMetrics())
                for _ in range(2))
        try:
            a.start(), b.start()
            tenant = a.tenants.tenants["t"]
            running = a.admit(tenant)
            server.stop()  # the append-only file keeps the lease
            eventually(lambda: not up(a), ttl_s, "the holder to notice")
            running.release()  # cannot reach Redis: the lease stays there, unrenewed
            server.start()
            assert server.client().zcard(lease_key("t")) == 1
            eventually(lambda: up(b), ttl_s, "the other replica to reach Redis again")
            eventually(lambda: not refused(b, tenant), ttl_s + 1.0, "the persisted lease to expire")
        finally:
            a.close(), b.close()


def test_settings_changes_reach_every_replica(replicas, redis_server):
    keys = [tenant_entry("t", "k1", max_concurrency=1), tenant_entry("u", "k2")]
    a, b = replicas(keys)
    metrics = b.metrics
    assert b.tenants.authenticate("Bearer k2").name == "u"
    # only a's file changes: the key of "u" is removed and "t" may run two requests
    rewrite(a.keys_file.path, [tenant_entry("t", "k1", max_concurrency=2)])

    def removed_everywhere() -> bool:
        for store in (a, b):
            try:
                store.tenants.authenticate("Bearer k2")
            except AuthenticationError:
                continue
            return False
        return True

    assert eventually(removed_everywhere, 3.0, "the removed key to be refused by both replicas") < 3.0
    tenant = b.tenants.authenticate("Bearer k1")
    assert tenant.max_concurrency == 2
    held = [b.admit(tenant), a.admit(tenant)]
    assert refused(a, tenant)
    for admission in held:
        admission.release()
    assert sample(metrics, "tenant_settings_reloads_total", source="store", outcome="applied") == 1

    # an invalid file is refused where it is read, and never published
    a.keys_file.path.write_text('{"tenants": [{"name": "t", "max_concurrency": 0}]}')
    time.sleep(3 * a.tick_s)
    assert a.tenants.authenticate("Bearer k1").max_concurrency == 2
    assert json.loads(redis_server.client().get(SETTINGS_KEY))["tenants"][0]["max_concurrency"] == 2

    # settings written into the store directly reach every replica too; a bad one is refused and counted
    redis_server.client().set(SETTINGS_KEY, json.dumps({"tenants": [tenant_entry("v", "k3")]}))
    eventually(lambda: all("v" in s.tenants.tenants for s in (a, b)), 3.0, "settings set in Redis")
    redis_server.client().set(SETTINGS_KEY, "not json")
    eventually(lambda: sample(metrics, "tenant_settings_reloads_total", source="store", outcome="invalid") == 1,
               3.0, "the bad publication to be refused")
    assert set(b.tenants.tenants) == {"v"}


def test_refuse_policy_answers_503_while_redis_is_down_then_recovers(replicas, redis_server):
    (store,) = replicas([tenant_entry("t", "k")], n=1, fallback="refuse")
    metrics = store.metrics
    tenant = store.tenants.tenants["t"]
    store.admit(tenant).release()
    redis_server.stop()
    with pytest.raises(TenantStoreUnavailableError) as e:
        store.admit(tenant)
    assert e.value.status_code == 503 and e.value.reason == "tenant_store_unavailable"
    assert sample(metrics, "tenant_store_up", store="redis") == 0
    assert sample(metrics, "tenant_store_errors_total", operation="admit") == 1
    redis_server.start()
    eventually(lambda: sample(metrics, "tenant_store_up", store="redis") == 1, 3 * TTL_S, "recovery")
    store.admit(tenant).release()


def test_local_policy_applies_each_replicas_own_limits_while_redis_is_down(replicas, redis_server):
    a, b = replicas([tenant_entry("t", "k", max_concurrency=1)])
    tenant = a.tenants.tenants["t"]
    redis_server.stop()
    held = [a.admit(tenant), b.admit(tenant)]  # one each: the limit holds per replica
    assert refused(a, tenant) and refused(b, tenant)
    for admission in held:
        admission.release()
    redis_server.start()
    eventually(lambda: up(a) and up(b), 3 * TTL_S, "both replicas to reach Redis again")
    shared = a.admit(tenant)
    assert refused(b, tenant)  # shared again
    shared.release()


def test_an_unreachable_or_frozen_redis_never_blocks_a_request(tmp_path, replicas, redis_server):
    path = tmp_path / "keys.json"
    rewrite(path, [tenant_entry("t", "k")])
    tenant = Tenant("t")
    with socket.socket() as blackhole:  # accepts connections (backlog) and never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        closed_port = socket.socket()
        closed_port.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        for url in (f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0",
                    f"redis://127.0.0.1:{closed_port.getsockname()[1]}/0"):
            store = RedisTenantStore(url, KeysFile(path), lease_ttl_s=TTL_S, fallback="refuse")
            started = time.monotonic()
            store.start()
            assert time.monotonic() - started < 1.5, url
            started = time.monotonic()
            with pytest.raises(TenantStoreUnavailableError):
                store.admit(tenant)
            assert time.monotonic() - started < 0.05, url  # known down: Redis is not asked
            store.close()
        closed_port.close()

    (store,) = replicas([tenant_entry("t", "k")], n=1)
    with redis_server.paused():  # a frozen server: every call waits for its reply
        started = time.monotonic()
        store.admit(tenant).release()  # the first call times out, the local limits take over
        store.admit(tenant).release()
        assert time.monotonic() - started < 1.5


# -- the in-process store and the shared parts ------------------------------------------------------


def test_local_store_reloads_the_keys_file(tmp_path):
    path = Path(write_keys(tmp_path, [tenant_entry("t", "k1", max_concurrency=1),
                                      tenant_entry("u", "k2", requests_per_minute=5)]))
    metrics = ServingMetrics()
    keys_file = KeysFile(path)
    store = LocalTenantStore(keys_file.registry(), keys_file, metrics, tick_s=0.05)
    assert sample(metrics, "tenant_limit", tenant="u", limit="requests_per_minute") == 5
    seen = []
    store.tenants.subscribe(lambda registry: seen.append(registry.weights()))
    store.start()
    try:
        tenant = store.tenants.authenticate("Bearer k1")
        held = store.admit(tenant)
        assert refused(store, tenant)
        rewrite(path, [tenant_entry("t", "k1", max_concurrency=2, weight=3.0)])
        eventually(lambda: "u" not in store.tenants.tenants, 2.0, "the reload")
        with pytest.raises(AuthenticationError):
            store.tenants.authenticate("Bearer k2")
        tenant = store.tenants.authenticate("Bearer k1")
        assert tenant.max_concurrency == 2 and seen == [{"t": 3.0}]
        assert sample(metrics, "tenant_limit", tenant="t", limit="max_concurrency") == 2
        assert sample(metrics, "tenant_limit", tenant="u", limit="requests_per_minute") is None
        store.admit(tenant).release()  # the request in flight counts against the new limit
        held.release()
        path.write_text("{")
        eventually(lambda: sample(metrics, "tenant_settings_reloads_total", source="file", outcome="invalid") == 1,
                   2.0, "the invalid file to be refused")
        assert store.tenants.authenticate("Bearer k1").max_concurrency == 2  # the last good settings stay
        assert sample(metrics, "tenant_settings_reloads_total", source="file", outcome="applied") == 1
    finally:
        store.close()


def test_live_tenants_serve_the_current_registry():
    live = LiveTenants(TenantRegistry.open())
    assert live.authenticate(None).name == "default"
    live.replace(TenantRegistry([Tenant("a", weight=2.0)], {hash_key("k"): "a"}))
    assert live.authenticate("Bearer k").name == "a" and live.weights() == {"a": 2.0}
    with pytest.raises(AuthenticationError):  # keys are asked for from now on
        live.authenticate(None)


def test_build_tenant_store_checks_its_flags(tmp_path, redis_url):
    path = Path(write_keys(tmp_path, [tenant_entry("t", "k")]))
    assert isinstance(build_tenant_store(api_keys=None), LocalTenantStore)
    assert build_tenant_store(api_keys=None).tenants.authenticate(None).name == "default"  # open: no keys
    with pytest.raises(ValueError, match="--api-keys"):
        build_tenant_store(api_keys=None, url=redis_url)
    with pytest.raises(ValueError, match="redis://"):
        build_tenant_store(api_keys=path, url="http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="fallback"):
        build_tenant_store(api_keys=path, url=redis_url, fallback="open")
    with pytest.raises(ValueError, match="TTL"):
        build_tenant_store(api_keys=path, url=redis_url, lease_ttl_s=0.5)
    store = build_tenant_store(api_keys=path, url=redis_url, fallback="refuse", lease_ttl_s=5)
    assert isinstance(store, RedisTenantStore) and store.lease_ttl_ms == 5000 and store.tick_s == 1.0
    store.close()


def test_serve_flags_build_the_store(tmp_path, redis_url, monkeypatch):
    """The call `serve` makes: its flags straight into build_tenant_store."""
    path = write_keys(tmp_path, [tenant_entry("t", "k")])

    def store_of(*flags: str):
        args = build_parser().parse_args(["serve", "--api-keys", path, *flags])
        return build_tenant_store(api_keys=args.api_keys, url=args.tenant_store, fallback=args.tenant_store_fallback,
                                  lease_ttl_s=args.tenant_lease_ttl, metrics=ServingMetrics())

    local = store_of()
    assert isinstance(local, LocalTenantStore) and set(local.tenants.tenants) == {"t"}
    shared = store_of("--tenant-store", redis_url, "--tenant-store-fallback", "refuse", "--tenant-lease-ttl", "3")
    assert isinstance(shared, RedisTenantStore)
    assert (shared.fallback, shared.lease_ttl_ms, shared.tick_s) == ("refuse", 3000, 1.0)
    shared.close()
    monkeypatch.setenv("VLLM_LAYERED_TENANT_STORE", redis_url)  # a password stays out of the command line
    from_env = store_of()
    assert isinstance(from_env, RedisTenantStore) and from_env.fallback == "local"
    from_env.close()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tenant-store-fallback", "open"])
