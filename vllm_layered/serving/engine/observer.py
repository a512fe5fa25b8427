"""Hooks the engine calls at its step and request boundaries (metrics implement them).

Every method has a no-op default so an observer overrides only what it records. Hooks run on the
engine loop: they must be cheap and must not raise.
"""

from __future__ import annotations


class EngineObserver:
    def on_request_queued(self, tenant: str) -> None:
        """A request entered the waiting queue."""

    def on_request_rejected(self, tenant: str, reason: str) -> None:
        """A request was refused before queueing (reason: 'overloaded', 'shutting_down', ...)."""

    def on_request_started(self, tenant: str, queue_time_s: float) -> None:
        """A request left the waiting queue and started preprocessing."""

    def on_step(self, step_time_s: float, num_requests: int, num_tokens: int) -> None:
        """One packed transformer forward (plus sampler step) over ``num_requests`` requests and
        ``num_tokens`` tokens (text + image, all CFG branches) finished."""

    def on_request_finished(
        self, tenant: str, outcome: str, e2e_time_s: float, layers: int, num_steps: int
    ) -> None:
        """A request left the engine. outcome: 'success', 'cancelled', 'deadline', 'error'."""

    def on_queue_state(self, num_running: int, num_waiting: int) -> None:
        """The sizes of the running set and waiting queue after a scheduling decision."""
