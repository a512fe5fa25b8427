"""A real redis-server on a free loopback port, for the tenant store tests (skips without the binary)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving.helpers import free_port

redis = pytest.importorskip("redis", reason="the redis client is not installed: pip install 'vllm-layered[redis]'")


class RedisServer:
    """``redis-server`` without persistence (or with an append-only file in ``data_dir``)."""

    def __init__(self, log_dir: Path, *, persistent: bool = False) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.persistent = persistent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--dir", str(self.log_dir), *persistence]
        with open(self.log_dir / f"redis-{self.port}.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start: {(self.log_dir / f'redis-{self.port}.log').read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # in case a test paused it
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The server frozen (SIGSTOP): connections stay open and every call waits, the worst case for a client."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def running_redis(log_dir: Path, *, persistent: bool = False) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server; .ci/run installs it)")
    server = RedisServer(log_dir, persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.stop()
