"""The scheduler for models without `dynamic_batching`: each request executes on its own, in
arrival order, on the first free slot (Triton's default scheduler)."""

from __future__ import annotations

import asyncio
import queue
import time

import numpy as np

from pipeserve.batching.base import ModelRunner, Pending, Scheduler, join_all, start_workers
from pipeserve.batching.execute import execute_batch
from pipeserve.errors import ModelNotReadyError, QueueFullError
from pipeserve.inference import InferRequest, ModelSpec
from pipeserve.observers import InferenceObserver

_STOP = None


class DirectScheduler(Scheduler):
    def __init__(
        self,
        spec: ModelSpec,
        runner: ModelRunner,
        observer: InferenceObserver,
        max_queue_size: int = 4096,
    ) -> None:
        self._spec = spec
        self._runner = runner
        self._observer = observer
        # Bounded: overload is answered at once with "Exceeds maximum queue size".
        self._queue: queue.Queue[Pending | None] = queue.Queue(maxsize=max_queue_size)
        self._closing = False
        self._workers = start_workers(spec, runner, self._work)

    def submit(self, request: InferRequest) -> asyncio.Future[dict[str, np.ndarray]]:
        if self._closing:
            raise ModelNotReadyError(f"model '{self._spec.name}' is unloading")
        loop = self._running_loop()
        pending = Pending(request, loop.create_future(), loop)
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            raise QueueFullError() from None
        self._observer.pending_changed(+1)
        return pending.future

    def _work(self, slot: int) -> None:
        while True:
            pending = self._queue.get()
            if pending is _STOP:
                return
            pending.dequeued_ns = time.monotonic_ns()
            execute_batch(self._runner, slot, [pending], self._spec, self._observer)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        # FIFO: every accepted request is taken before a worker sees its stop marker.
        for _ in self._workers:
            await asyncio.to_thread(self._queue.put, _STOP)
        await asyncio.to_thread(join_all, self._workers)
