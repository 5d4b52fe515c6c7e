"""Contracts between the registry (which owns a scheduler per loaded model version), the
scheduler, and the runtime (which executes batches).

Threading: `Scheduler.submit` and `Scheduler.close` are called on the event loop. A scheduler owns
one worker thread per execution slot; each worker calls `ModelRunner.run` for its own slot index
only, so a runner may keep per-slot state (an onnxruntime session) without locks. Futures are
resolved from workers with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeserve.inference import InferRequest, ModelSpec


class ModelRunner(Protocol):
    """The runtime side: executes one batch synchronously on one slot."""

    @property
    def slot_count(self) -> int:
        """How many batches may execute at once (instance_group count; pipeline depth)."""
        ...

    def run(
        self, slot: int, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Run one batch on `slot`; called only from that slot's worker thread. Raises on failure
        (any exception fails every request of the batch)."""
        ...

    def close(self) -> None:
        """Release sessions and mappings; called once, after every worker has stopped."""
        ...


# A runner may also say `inline_safe = True`: `run(0, ...)` may then be called on the event loop
# while every worker is idle (dynamic.py's inline execution of tiny batches). Runners without the
# attribute (a pipeline, whose slots are its stages' threads) are only run by their workers.


@dataclass(slots=True, eq=False)
class Pending:
    """An accepted request waiting for (or in) execution."""

    request: InferRequest
    future: asyncio.Future[dict[str, np.ndarray]]
    loop: asyncio.AbstractEventLoop
    # Monotonic ns when it left the queue for execution (0 while queued).
    dequeued_ns: int = 0
    # Absolute monotonic deadline in ns for leaving the queue (0 = none).
    deadline_ns: int = 0

    def cancelled(self) -> bool:
        # Read from worker threads: a stale "not done" only means we execute a request whose
        # client already left, and its result is then discarded by resolve().
        return self.future.done()


class Scheduler(ABC):
    """Accepts validated requests for one model version and answers each exactly once."""

    _loop: asyncio.AbstractEventLoop | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop `submit` runs on, looked up once: on Python 3.11 get_running_loop() costs a
        getpid() syscall, and a server runs one loop (a test may run the next on a new one)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    @abstractmethod
    def submit(self, request: InferRequest) -> asyncio.Future[dict[str, np.ndarray]]:
        """Queue a validated request (request.batch_size set). Called on the event loop.

        Returns a future with the output arrays (only those requested, or all). Raises
        UnavailableError subclasses at once when the request cannot be accepted (queue full,
        scheduler closing). Cancelling the future drops the request if it has not executed yet.
        """

    @abstractmethod
    async def close(self) -> None:
        """Stop accepting, finish every accepted request, stop the workers. Idempotent."""


def start_workers(
    spec: ModelSpec, runner: ModelRunner, work: Callable[[int], None]
) -> list[threading.Thread]:
    """One daemon thread per execution slot running `work(slot)`, named after the model version
    (thread names show up in py-spy and in tracebacks)."""
    workers = [
        threading.Thread(
            target=work, args=(slot,), name=f"{spec.name}-v{spec.version}-slot{slot}", daemon=True
        )
        for slot in range(runner.slot_count)
    ]
    for w in workers:
        w.start()
    return workers


def join_all(threads: Sequence[threading.Thread]) -> None:
    """Join every worker thread (schedulers call it through asyncio.to_thread at close)."""
    for t in threads:
        t.join()
