"""Tenant limits shared by every replica, in Redis (``serve --tenant-store redis://HOST:PORT/DB``).

Keys (``{tenant}`` is a Redis Cluster hash tag, so one tenant's keys share a slot):

- ``vllm-layered:{tenant}:leases``: a sorted set with one member per request in flight (``replica:n``),
  scored by when it expires (Redis' clock, ms). The holder renews its leases every tick while the request
  runs; a crashed replica's leases expire after the TTL on their own.
- ``vllm-layered:{tenant}:bucket``: the tenant's token bucket, ``{tokens, ts}``.
- ``vllm-layered:settings``: the keys file's content, as last published.

Admission is one Lua script, atomic on the server and timed by Redis' clock (replica clocks never matter):
drop expired leases, refuse if the tenant holds ``max_concurrency`` of them, take a token or refuse, add
the lease. A refused request holds nothing and takes no token, as in tenants.AdmissionControl.

Settings: a replica publishes its keys file at start and whenever the file changes; every replica reads
the published settings every tick and applies them when they differ (so a change reaches every replica
within a second or two); when the key is gone (Redis restarted without persistence) a replica publishes
its own again. Operators may also set them directly: ``redis-cli -x SET vllm-layered:settings < keys.json``.

Redis unreachable: calls give up after ``TIMEOUT_S`` (``socket_timeout`` / ``socket_connect_timeout`` in
the URL's query override it) and the store counts as down (``tenant_store_up`` 0, a log line). Until a tick
reaches Redis again, admission does not call Redis and follows the fallback policy: ``local`` admits by
this replica's own limits (tenants.AdmissionControl: each tenant gets its quota per replica), ``refuse``
answers TenantStoreUnavailableError (503). Leases that could not be released expire within the TTL. When
Redis answers again: a log line, ``tenant_store_up`` 1, and the next renewal re-registers the leases of
the requests still running (an empty Redis learns them again).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import threading
from collections import defaultdict
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from vllm_layered.serving.metrics import ServingMetrics
from vllm_layered.serving.tenant_store import (
    DEFAULT_LEASE_TTL_S,
    FALLBACK_POLICIES,
    POLL_S,
    KeysFile,
    TenantStore,
    TenantStoreUnavailableError,
)
from vllm_layered.serving.tenants import (
    Admission,
    AdmissionControl,
    Tenant,
    bucket_limits,
    concurrency_limited,
    rate_limited,
)

logger = logging.getLogger(__name__)

PREFIX = "vllm-layered:"
SETTINGS_KEY = PREFIX + "settings"
TIMEOUT_S = 0.25
MIN_LEASE_TTL_S = 1.0

# KEYS: leases, bucket. ARGV: max_concurrency (-1: none), refill per ms (-1: no rate limit), capacity,
# lease id, lease TTL ms. Returns {0, 0} admitted, {1, 0} over the concurrency limit, {2, ms} over the rate.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local max_concurrency = tonumber(ARGV[1])
if max_concurrency >= 0 and redis.call('ZCARD', KEYS[1]) >= max_concurrency then
  return {1, 0}
end
local rate = tonumber(ARGV[2])
if rate > 0 then
  local capacity = tonumber(ARGV[3])
  local bucket = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  local tokens = tonumber(bucket[1]) or capacity
  local last = tonumber(bucket[2]) or now
  tokens = math.min(capacity, tokens + math.max(0, now - last) * rate)
  if tokens < 1 then
    return {2, math.ceil((1 - tokens) / rate)}
  end
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'ts', now)
  redis.call('PEXPIRE', KEYS[2], math.ceil(capacity / rate))
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
return {0, 0}
"""

# KEYS: leases. ARGV: lease TTL ms, then the ids of the leases this replica holds (re-added if Redis lost them).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl)
return #ARGV - 1
"""


def connect(url: str) -> redis.Redis:
    """A client that never waits long: ``TIMEOUT_S`` per connect and per reply, one retry (a connection that
    a Redis restart closed), no backoff."""
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"--tenant-store must be a redis://HOST:PORT/DB URL, got {url!r}")
    return redis.Redis.from_url(
        url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S, retry=Retry(NoBackoff(), 1),
        decode_responses=True,
    )


def lease_key(tenant: str) -> str:
    return f"{PREFIX}{{{tenant}}}:leases"


def bucket_key(tenant: str) -> str:
    return f"{PREFIX}{{{tenant}}}:bucket"


class RedisTenantStore(TenantStore):
    def __init__(
        self,
        url: str,
        keys_file: KeysFile,
        *,
        fallback: str = "local",
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        metrics: ServingMetrics | None = None,
    ) -> None:
        if fallback not in FALLBACK_POLICIES:
            choices = ", ".join(FALLBACK_POLICIES)
            raise ValueError(f"unknown tenant store fallback {fallback!r}; choose one of {choices}")
        if not lease_ttl_s >= MIN_LEASE_TTL_S:
            raise ValueError(f"the lease TTL must be at least {MIN_LEASE_TTL_S:g} s, got {lease_ttl_s}")
        super().__init__(keys_file.registry(), keys_file, metrics, tick_s=min(POLL_S, lease_ttl_s / 3))
        self.fallback = fallback
        self.lease_ttl_ms = round(lease_ttl_s * 1000)
        self._client = connect(url)
        parts = urlsplit(url)
        self.address = f"{parts.scheme}://{parts.hostname or ''}:{parts.port or 6379}{parts.path}"  # no password
        self._admit_script = self._client.register_script(_ADMIT)
        self._renew_script = self._client.register_script(_RENEW)
        self._local = AdmissionControl()
        self._replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._ids = itertools.count()
        self._held: dict[str, str] = {}  # lease id -> tenant name, the leases to renew
        self._held_lock = threading.Lock()  # guards _held
        self._lease_lock = threading.Lock()  # orders a renewal and a release: no released lease comes back
        self._up: bool | None = None  # None until the first call tells
        self._up_lock = threading.Lock()  # one log line per transition
        self._unpublished = True  # the file's settings still have to reach Redis
        self._refused_text: str | None = None
        if metrics is not None:
            metrics.tenant_store_up.labels("redis").set(0)

    def start(self) -> None:
        """Reach Redis once (publish the settings, or learn that it is down), then keep in sync in a thread."""
        if self._thread is None:
            self._tick()
        super().start()

    def close(self) -> None:
        super().close()
        self._client.close()

    # -- admission (the server's event loop) -----------------------------------------------------

    def admit(self, tenant: Tenant) -> Admission:
        if self._up:
            try:
                return self._admit_shared(tenant)
            except redis.RedisError as e:
                self._mark_down("admit", e)
        if self.fallback == "refuse":
            raise TenantStoreUnavailableError(
                "the shared tenant store is unreachable and this server refuses requests until it is back"
            )
        return self._local.admit(tenant)

    def _admit_shared(self, tenant: Tenant) -> Admission:
        limits = bucket_limits(tenant)
        refill_per_ms, capacity = (limits[0] / 1000.0, limits[1]) if limits is not None else (-1, 0)
        lease = f"{self._replica}:{next(self._ids)}"
        code, wait_ms = self._admit_script(
            keys=[lease_key(tenant.name), bucket_key(tenant.name)],
            args=[tenant.max_concurrency or -1, refill_per_ms, capacity, lease, self.lease_ttl_ms],
        )
        if code == 1:
            raise concurrency_limited(tenant)
        if code == 2:
            raise rate_limited(tenant, wait_ms / 1000.0)
        with self._held_lock:
            self._held[lease] = tenant.name
        return Admission(lambda: self._release(tenant.name, lease))

    def _release(self, tenant: str, lease: str) -> None:
        with self._lease_lock:
            with self._held_lock:
                self._held.pop(lease, None)
            if not self._up:
                return  # not renewed any more: it expires within the TTL
            try:
                self._client.zrem(lease_key(tenant), lease)
            except redis.RedisError as e:
                self._mark_down("release", e)

    # -- background thread -----------------------------------------------------------------------

    def _tick(self) -> None:
        text = self.keys_file.changed_text()
        if text is not None and self._apply(text, "file"):
            self._unpublished = True
        for operation, step in (("settings", self._sync_settings), ("renew", self._renew)):
            try:
                step()
            except redis.RedisError as e:
                self._mark_down(operation, e)
                return
        self._mark_up()

    def _sync_settings(self) -> None:
        if self._unpublished:
            self._client.set(SETTINGS_KEY, self.settings_text)
            self._unpublished = False
            return
        stored = self._client.get(SETTINGS_KEY)
        if stored is None:  # Redis lost its data (restarted without persistence): publish ours again
            self._client.set(SETTINGS_KEY, self.settings_text)
        elif stored not in (self.settings_text, self._refused_text) and not self._apply(stored, "store"):
            self._refused_text = stored  # log and count a bad publication once

    def _renew(self) -> None:
        with self._lease_lock:
            with self._held_lock:
                held = list(self._held.items())
            if not held:
                return
            by_tenant: dict[str, list[str]] = defaultdict(list)
            for lease, tenant in held:
                by_tenant[tenant].append(lease)
            pipe = self._client.pipeline(transaction=False)
            for tenant, leases in by_tenant.items():
                self._renew_script(keys=[lease_key(tenant)], args=[self.lease_ttl_ms, *leases], client=pipe)
            pipe.execute()

    # -- reachability ----------------------------------------------------------------------------

    def _mark_down(self, operation: str, error: Exception) -> None:
        if self.metrics is not None:
            self.metrics.tenant_store_errors.labels(operation).inc()
        with self._up_lock:
            was_up, self._up = self._up, False
        if was_up is not False:
            policy = "this replica's own limits apply" if self.fallback == "local" else "image requests get 503"
            logger.warning("tenant store %s unreachable (%s: %s); %s until it answers", self.address, operation,
                           error, policy)
            if self.metrics is not None:
                self.metrics.tenant_store_up.labels("redis").set(0)

    def _mark_up(self) -> None:
        with self._up_lock:
            was_up, self._up = self._up, True
        if was_up is not True:
            if was_up is False:
                logger.warning("tenant store %s reachable again: tenant limits are shared again", self.address)
            if self.metrics is not None:
                self.metrics.tenant_store_up.labels("redis").set(1)
