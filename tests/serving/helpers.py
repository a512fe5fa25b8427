"""Helpers of the API tests: a real server process (`python -m vllm_layered.cli serve` on a free loopback
port), its metrics, input images and the error-body check."""

from __future__ import annotations

import contextlib
import io
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

STARTUP_TIMEOUT_S = 180


@dataclass
class Server:
    base_url: str
    model: str
    log: Path
    process: subprocess.Popen | None = None

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics as {(name, sorted labels): value}, parsed by prometheus-client."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(process: subprocess.Popen, url: str, log: Path, timeout_s: float, *, poll_s: float,
                       name: str) -> None:
    """Poll GET {url}/health until it answers 200; fail the test with the log's tail if ``process`` exits
    or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"{name} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{name} did not become healthy in {timeout_s}s:\n{log.read_text()[-4000:]}")
        time.sleep(poll_s)


@contextlib.contextmanager
def start_server(checkpoint: Path | None, log_dir: Path, *args: str) -> Iterator[Server]:
    """`serve --model checkpoint` (None: no --model, the server's default) with ``args``, until the block ends."""
    port = free_port()
    log = log_dir / f"server-{port}.log"
    model = ["--model", str(checkpoint)] if checkpoint is not None else []
    command = [
        sys.executable, "-m", "vllm_layered.cli", "serve", *model, "--port", str(port),
        "--no-access-log", "--log-level", "warning", "--shutdown-grace", "1", *args,
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", str(checkpoint), log, process)
    try:
        wait_until_healthy(process, server.base_url, log, STARTUP_TIMEOUT_S, poll_s=0.2, name="server")
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def png_bytes(width: int = 64, height: int = 48) -> bytes:
    image = Image.new("RGBA", (width, height), (30, 90, 200, 255))
    ImageDraw.Draw(image).ellipse((8, 8, width // 2, height - 8), fill=(220, 40, 40, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_error(response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    """The response is an OpenAI-style error body with this status (and param / code when given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def wait_until(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)
