"""API keys -> tenants, and each tenant's admission limits.

The keys file is JSON (no YAML dependency); keys are stored only as SHA-256 hex digests
(``vllm-layered hash-key KEY`` prints one)::

    {"tenants": [
        {"name": "acme", "api_key_sha256": ["<64 hex digits>"],
         "max_concurrency": 4, "requests_per_minute": 120, "burst": 20,
         "max_request_work": 10000000, "weight": 2.0, "priority": 0}
    ]}

- max_concurrency: image requests of the tenant in flight at once (an n > 1 request counts once).
- requests_per_minute: a token bucket refilled at rpm / 60 per second, holding ``burst`` tokens
  (default: one minute's worth); each image request takes one.
- max_request_work: the most work one request of the tenant may ask for, in image token-forwards
  (serving/limits.py: request_work); replaces the server's ``--max-request-work`` for this tenant.
- weight: the tenant's share in the engine's fair scheduling; priority: higher runs first.

Without a keys file the server is open: every caller is tenant "default", without per-tenant limits
(the server-wide ones, such as ``--max-request-work``, still apply).

AdmissionControl enforces the limits within one process; serving/tenant_store.py re-reads the keys file
while serving and can share the limits between replicas (Redis).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TENANT = "default"
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_TENANT_FIELDS = {
    "name", "api_key_sha256", "max_concurrency", "requests_per_minute", "burst", "max_request_work", "weight",
    "priority",
}


class AuthenticationError(Exception):
    """Missing or unknown API key."""


class AdmissionError(Exception):
    """A tenant is over one of its limits; ``reason`` is 'rate_limited' or 'concurrency_limited'.
    ``status_code``: the HTTP status it deserves (429; a subclass for an unreachable tenant store says 503)."""

    status_code = 429

    def __init__(self, reason: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


def hash_key(api_key: str) -> str:
    """The SHA-256 hex digest under which a key is stored in the keys file."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    max_concurrency: int | None = None
    requests_per_minute: float | None = None
    burst: int | None = None
    max_request_work: int | None = None
    weight: float = 1.0
    priority: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("tenant name must not be empty")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"tenant {self.name}: max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.requests_per_minute is not None and self.requests_per_minute <= 0:
            raise ValueError(f"tenant {self.name}: requests_per_minute must be > 0, got {self.requests_per_minute}")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"tenant {self.name}: burst must be >= 1, got {self.burst}")
        work = self.max_request_work
        if work is not None and (isinstance(work, bool) or not isinstance(work, int) or work < 1):
            raise ValueError(f"tenant {self.name}: max_request_work must be an integer >= 1, got {work!r}")
        if not self.weight > 0:
            raise ValueError(f"tenant {self.name}: weight must be > 0, got {self.weight}")


class TenantRegistry:
    """Who is calling: Bearer key -> Tenant. ``key_hashes`` None means open mode."""

    def __init__(self, tenants: list[Tenant], key_hashes: dict[str, str] | None) -> None:
        self.tenants = {t.name: t for t in tenants}
        if len(self.tenants) != len(tenants):
            raise ValueError("tenant names must be unique")
        self._key_hashes = key_hashes
        for digest, name in (key_hashes or {}).items():
            if name not in self.tenants:
                raise ValueError(f"key {digest[:8]}... maps to unknown tenant {name!r}")

    @classmethod
    def open(cls, tenant: Tenant | None = None) -> TenantRegistry:
        return cls([tenant or Tenant(DEFAULT_TENANT)], None)

    @classmethod
    def from_file(cls, path: str | Path) -> TenantRegistry:
        return cls.from_json(Path(path).read_text(), f"API keys file {path}")

    @classmethod
    def from_json(cls, text: str, source: str = "API keys") -> TenantRegistry:
        """The registry of a keys file's content; ``source`` names where it came from in error messages."""
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON: {e}") from e
        entries = config.get("tenants") if isinstance(config, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f'{source} needs a non-empty "tenants" list')
        tenants, key_hashes = [], {}
        for entry in entries:
            if not isinstance(entry, dict) or "name" not in entry:
                raise ValueError(f"{source}: every tenant must be an object with a name, got {entry!r}")
            unknown = set(entry) - _TENANT_FIELDS
            if unknown:
                raise ValueError(f"{source}: unknown tenant fields {sorted(unknown)}")
            digests = entry.get("api_key_sha256", [])
            digests = [digests] if isinstance(digests, str) else digests
            try:
                tenant = Tenant(**{k: v for k, v in entry.items() if k != "api_key_sha256"})
            except TypeError as e:  # a field of the wrong type
                raise ValueError(f"{source}: tenant {entry['name']!r}: {e}") from e
            for digest in digests:
                digest = digest.lower()
                if not _HEX_DIGEST.match(digest):
                    raise ValueError(f"tenant {tenant.name}: {digest!r} is not a SHA-256 hex digest")
                if digest in key_hashes:
                    raise ValueError(f"tenant {tenant.name}: key {digest[:8]}... is also another tenant's")
                key_hashes[digest] = tenant.name
            tenants.append(tenant)
        return cls(tenants, key_hashes)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer KEY`` header value; AuthenticationError if none."""
        if self._key_hashes is None:
            return next(iter(self.tenants.values()))
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        name = self._key_hashes.get(hash_key(key.strip()))
        if name is None:
            raise AuthenticationError("invalid API key")
        return self.tenants[name]

    def weights(self) -> dict[str, float]:
        return {name: t.weight for name, t in self.tenants.items()}


def bucket_limits(tenant: Tenant) -> tuple[float, float] | None:
    """The tenant's token bucket as (refill rate per second, capacity), None without a rate limit."""
    rpm = tenant.requests_per_minute
    if rpm is None:
        return None
    return rpm / 60.0, tenant.burst if tenant.burst is not None else max(1, math.floor(rpm))


def concurrency_limited(tenant: Tenant) -> AdmissionError:
    return AdmissionError(
        "concurrency_limited", f"tenant {tenant.name!r} already has {tenant.max_concurrency} requests in flight", 1.0
    )


def rate_limited(tenant: Tenant, wait_s: float) -> AdmissionError:
    return AdmissionError(
        "rate_limited", f"tenant {tenant.name!r} is over {tenant.requests_per_minute:g} requests per minute", wait_s
    )


class TokenBucket:
    def __init__(self, rate_per_s: float, capacity: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._last = clock()

    def retune(self, rate_per_s: float, capacity: float) -> None:
        """New limits (the keys file changed): the tokens earned so far stay, up to the new capacity."""
        self._refill()
        self.rate_per_s, self.capacity = rate_per_s, capacity
        self._tokens = min(capacity, self._tokens)

    def take(self) -> float:
        """Take a token: 0.0 if one was there, else the seconds until one will be (nothing taken)."""
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate_per_s

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate_per_s)
        self._last = now


@dataclass
class Admission:
    """A held concurrency slot; ``release`` may be called any number of times."""

    _release: Callable[[], None]
    _released: bool = field(default=False, init=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release()


class AdmissionControl:
    """Per-tenant concurrency slots and request-rate buckets."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)

    def admit(self, tenant: Tenant) -> Admission:
        """A concurrency slot for one image request, or AdmissionError (nothing held, no token taken)."""
        with self._lock:
            if tenant.max_concurrency is not None and self.in_flight(tenant.name) >= tenant.max_concurrency:
                raise concurrency_limited(tenant)
            limits = bucket_limits(tenant)
            if limits is not None:
                wait_s = self._bucket(tenant.name, *limits).take()
                if wait_s > 0:
                    raise rate_limited(tenant, wait_s)
            self._in_flight[tenant.name] = self.in_flight(tenant.name) + 1
        return Admission(lambda: self._release(tenant.name))

    def _release(self, name: str) -> None:
        with self._lock:
            self._in_flight[name] -= 1

    def _bucket(self, name: str, rate_per_s: float, capacity: float) -> TokenBucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(rate_per_s, capacity, self._clock)
        elif (bucket.rate_per_s, bucket.capacity) != (rate_per_s, capacity):
            bucket.retune(rate_per_s, capacity)
        return bucket
