"""Server-sent events framing (text/event-stream), the server side; clients read it with clients/sse.py."""

from __future__ import annotations

import json
from typing import Any

HEARTBEAT = b": keep-alive\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """One event; the JSON has no newlines, so it fits one ``data:`` line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
