"""The contract between the request path and whoever records it (statistics, Prometheus).

The scheduler calls an `InferenceObserver` from its worker threads and from the event loop;
implementations must be thread-safe and cheap (no lookups, no allocation beyond a few ints).
Observers are bound to one model version at load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ExecutionTimings:
    """One execution of the model on one (possibly batched) input. Durations in nanoseconds."""

    batch_size: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int


class InferenceObserver(Protocol):
    def requests_succeeded(
        self, execution: ExecutionTimings, requests: Sequence[tuple[int, int, int]]
    ) -> None:
        """Requests of one execution got their responses (one call per batch, not per
        request): each is (its own batch dimension, total ns, queue ns); `execution` is the
        batch they ran in (compute time is shared by every request of a batch)."""

    def request_failed(self, reason: str, total_ns: int) -> None:
        """A request was answered with an error.

        `reason` is REJECTED, CANCELED, BACKEND or OTHER."""

    def execution_done(self, execution: ExecutionTimings) -> None:
        """The runtime finished one execution (called once per batch, success or not)."""

    def pending_changed(self, delta: int) -> None:
        """Requests accepted but not yet answered went up (+n) or down (-n)."""


class FanOut:
    """Calls several observers in turn; the scheduler holds exactly one observer."""

    __slots__ = ("_observers",)

    def __init__(self, observers: Sequence[InferenceObserver]) -> None:
        self._observers = tuple(observers)

    def requests_succeeded(
        self, execution: ExecutionTimings, requests: Sequence[tuple[int, int, int]]
    ) -> None:
        for o in self._observers:
            o.requests_succeeded(execution, requests)

    def request_failed(self, reason: str, total_ns: int) -> None:
        for o in self._observers:
            o.request_failed(reason, total_ns)

    def execution_done(self, execution: ExecutionTimings) -> None:
        for o in self._observers:
            o.execution_done(execution)

    def pending_changed(self, delta: int) -> None:
        for o in self._observers:
            o.pending_changed(delta)
