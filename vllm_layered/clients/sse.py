"""Reading server-sent events (text/event-stream): the clients' and the bench tool's side of serving/sse.py."""

from __future__ import annotations

import json
from typing import Any


class SSEDecoder:
    """Server-sent events from text lines: feed lines, get (event, data) at each blank line."""

    def __init__(self) -> None:
        self._event, self._data = "message", []

    def feed(self, line: str) -> tuple[str, Any] | None:
        if line.startswith("event:"):
            self._event = line[6:].strip()
        elif line.startswith("data:"):
            self._data.append(line[5:].lstrip())
        elif not line and self._data:
            event, data = self._event, json.loads("\n".join(self._data))
            self._event, self._data = "message", []
            return event, data
        return None
