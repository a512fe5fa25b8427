"""``vllm-layered serve``: from parsed arguments to a listening server.

In order: the tenant store (--api-keys, --tenant-store), the server's limits, the pipeline (model_args.py), the
engine, the app (api_server.build_app); then uvicorn serves until interrupted. cli.py parses and calls
``run_server``; the HTTP module only builds the app.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import uvicorn

from vllm_layered.model_args import load_pipeline, quantization
from vllm_layered.model_executor.summary import describe_pipeline
from vllm_layered.serving.api_server import build_app
from vllm_layered.serving.engine.engine import EngineConfig, ThreadedEngine
from vllm_layered.serving.limits import ServerLimits
from vllm_layered.serving.metrics import ServingMetrics
from vllm_layered.serving.tenant_store import DEFAULT_LEASE_TTL_S, KeysFile, LocalTenantStore, TenantStore
from vllm_layered.serving.tenants import TenantRegistry

logger = logging.getLogger(__name__)


def run_server(args: argparse.Namespace) -> int:
    """``vllm-layered serve``: load the model, build the engine and serve until interrupted."""
    # our loggers (start-up, the tenant store) print at --log-level beside uvicorn's own
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    metrics = ServingMetrics()
    store = build_tenant_store(
        api_keys=args.api_keys, url=args.tenant_store, fallback=args.tenant_store_fallback,
        lease_ttl_s=args.tenant_lease_ttl, metrics=metrics,
    )
    limits = ServerLimits(
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_pixels=args.max_pixels,
        max_n=args.max_n,
        request_timeout_s=args.request_timeout,
        body_timeout_s=args.body_timeout,
        max_request_work=args.max_request_work,
    )
    pipeline, root = load_pipeline(args)
    served_names = args.served_model_name or [args.model or Path(root).name]
    logger.info("serving %s", describe_pipeline(pipeline, model=args.model, quantization=quantization(args)))
    config = EngineConfig(
        model_name=served_names[0],
        max_waiting=args.max_queue,
        max_running=args.max_running,
        step_order=args.step_order,
        tenant_weights=store.tenants.weights(),
    )
    engine = ThreadedEngine(pipeline, config, observer=metrics)
    app = build_app(
        engine, tenants=store, limits=limits, metrics=metrics,
        served_model_names=served_names, shutdown_grace_s=args.shutdown_grace,
    )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=not args.no_access_log,
        timeout_graceful_shutdown=args.shutdown_grace,
    )
    return 0


def build_tenant_store(
    *,
    api_keys: Path | None,
    url: str | None = None,
    fallback: str = "local",
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    metrics: ServingMetrics | None = None,
) -> TenantStore:
    """The store of ``vllm-layered serve``: ``--api-keys``, ``--tenant-store``, ``--tenant-store-fallback``,
    ``--tenant-lease-ttl``. ValueError for a bad combination; the store is not started."""
    if api_keys is None:
        if url is not None:
            raise ValueError("--tenant-store shares tenant limits and needs the tenants: give --api-keys too")
        return LocalTenantStore(TenantRegistry.open(), metrics=metrics)
    keys_file = KeysFile(api_keys)
    if url is None:
        return LocalTenantStore(keys_file.registry(), keys_file, metrics)
    try:  # the redis extra is optional
        from vllm_layered.serving.redis_store import RedisTenantStore
    except ImportError as e:
        raise ValueError(f"--tenant-store needs the redis client: pip install 'vllm-layered[redis]' ({e})") from e
    return RedisTenantStore(url, keys_file, fallback=fallback, lease_ttl_s=lease_ttl_s, metrics=metrics)
