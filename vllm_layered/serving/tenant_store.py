"""Where the tenants' settings and limits live while the server runs.

- ``LocalTenantStore`` (no ``--tenant-store``): each replica enforces the limits on its own, in process
  (tenants.AdmissionControl); a tenant's quota grows with the replica count.
- ``RedisTenantStore`` (``--tenant-store redis://HOST:PORT/DB``, serving/redis_store.py): rate buckets and
  concurrency leases in Redis, shared by every replica, and the keys file's content published there.

``serve`` picks one from its flags (serving/launcher.py: build_tenant_store).

Both re-read the keys file when it changes (polled every second by its (mtime, inode, size): Kubernetes
updates a mounted Secret by swapping a symlink, which a watch on the file itself misses) and swap the
registry at once: a removed key is refused from then on, new limits apply to the next request. A file that
does not parse is refused with a log line and the last good settings stay.

The server uses ``store.tenants`` (a ``LiveTenants``: who is calling) and ``store.admit(tenant)``
(``Admission`` with ``release()``, or AdmissionError), and calls ``start()`` / ``close()`` around serving.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from vllm_layered.serving.metrics import ServingMetrics
from vllm_layered.serving.tenants import Admission, AdmissionControl, AdmissionError, Tenant, TenantRegistry

logger = logging.getLogger(__name__)

FALLBACK_POLICIES = ("local", "refuse")
DEFAULT_LEASE_TTL_S = 15.0
POLL_S = 1.0


class TenantStoreUnavailableError(AdmissionError):
    """The shared store cannot be reached and the fallback policy is "refuse": a 503, not the tenant's fault."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__("tenant_store_unavailable", message, retry_after_s)


class LiveTenants:
    """The current TenantRegistry, replaced as a whole when the settings change (one reference assignment,
    so a request sees either the old or the new settings, never a mix)."""

    def __init__(self, registry: TenantRegistry) -> None:
        self._registry = registry
        self._listeners: list[Callable[[TenantRegistry], None]] = []

    def replace(self, registry: TenantRegistry) -> None:
        self._registry = registry
        for listener in self._listeners:
            listener(registry)

    def subscribe(self, listener: Callable[[TenantRegistry], None]) -> None:
        """Call ``listener(registry)`` after every change (e.g. to hand new fair-share weights to the engine)."""
        self._listeners.append(listener)

    @property
    def tenants(self) -> dict[str, Tenant]:
        return self._registry.tenants

    def authenticate(self, authorization: str | None) -> Tenant:
        return self._registry.authenticate(authorization)

    def weights(self) -> dict[str, float]:
        return self._registry.weights()


class KeysFile:
    """The ``--api-keys`` file, polled for changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = f"API keys file {self.path}"
        self._stamp = self._stat()
        self.text = self.path.read_text()

    def registry(self) -> TenantRegistry:
        """The registry of the content last read (ValueError if it is not a valid keys file)."""
        return TenantRegistry.from_json(self.text, self.name)

    def changed_text(self) -> str | None:
        """The file's content if it changed since the last call, else None (also while it cannot be read:
        an editor or Kubernetes may be swapping it)."""
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            text = self.path.read_text()
        except OSError:
            return None
        self._stamp = stamp
        if text == self.text:
            return None
        self.text = text
        return text

    def _stat(self) -> tuple[int, int, int]:
        stat = os.stat(self.path)
        return stat.st_mtime_ns, stat.st_ino, stat.st_size


class TenantStore(ABC):
    """The live settings and, in subclasses, the admission of image requests. With a keys file (whose content
    ``registry`` is) a daemon thread calls ``_tick`` every ``tick_s`` seconds until ``close``."""

    def __init__(self, registry: TenantRegistry, keys_file: KeysFile | None = None,
                 metrics: ServingMetrics | None = None, tick_s: float = POLL_S) -> None:
        self.settings_text = keys_file.text if keys_file is not None else None
        self.tenants = LiveTenants(registry)
        self.keys_file = keys_file
        self.metrics = metrics
        if metrics is not None:
            self.tenants.subscribe(self._export_limits)
            self._export_limits(registry)
        self.tick_s = tick_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @abstractmethod
    def admit(self, tenant: Tenant) -> Admission:
        """A slot for one image request of ``tenant``, or AdmissionError (nothing held, nothing counted)."""

    def start(self) -> None:
        if self.keys_file is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="tenant-store", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self._tick()
            except Exception:  # the thread keeps leases alive: it must outlive any one failure
                logger.exception("tenant store: background update failed")

    def _tick(self) -> None:
        text = self.keys_file.changed_text()
        if text is not None:
            self._apply(text, "file")

    def _apply(self, text: str, source: str) -> bool:
        """Swap in the settings of ``text`` (from the keys "file" or the shared "store"); False if invalid."""
        where = self.keys_file.name if source == "file" else "the tenant store's settings"
        try:
            registry = TenantRegistry.from_json(text, where)
        except ValueError as e:
            logger.warning("%s refused, the previous tenant settings stay: %s", where, e)
            self._count_reload(source, "invalid")
            return False
        self.settings_text = text
        self.tenants.replace(registry)
        logger.info("tenant settings reloaded from %s: %d tenants", where, len(registry.tenants))
        self._count_reload(source, "applied")
        return True

    def _export_limits(self, registry: TenantRegistry) -> None:
        self.metrics.export_tenant_limits({
            t.name: {"max_concurrency": t.max_concurrency, "requests_per_minute": t.requests_per_minute}
            for t in registry.tenants.values()
        })

    def _count_reload(self, source: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.tenant_settings_reloads.labels(source, outcome).inc()


class LocalTenantStore(TenantStore):
    """Limits held by this process alone: per-replica quotas. Without a keys file the settings never change."""

    def __init__(self, registry: TenantRegistry, keys_file: KeysFile | None = None,
                 metrics: ServingMetrics | None = None, tick_s: float = POLL_S) -> None:
        super().__init__(registry, keys_file, metrics, tick_s)
        self.admission = AdmissionControl()

    def admit(self, tenant: Tenant) -> Admission:
        return self.admission.admit(tenant)

    def in_flight(self, tenant: str) -> int:
        """Requests of ``tenant`` admitted here and not yet released."""
        return self.admission.in_flight(tenant)

