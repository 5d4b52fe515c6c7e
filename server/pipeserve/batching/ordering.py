"""`preserve_ordering`: hand results to callers in the order their requests were accepted, even
when batches finish out of order (several execution slots, priorities, delayed timeouts).

Event-loop only. Each accepted request gets an inner future (answered by the worker) and an outer
one (returned to the caller); an outer future is completed only once every earlier request's
inner future is done. Cancelling the outer future cancels the inner one, so a caller that leaves
still drops its request from the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np

_Result = dict[str, np.ndarray]


class OrderedRelease:
    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        # Bounded by the batcher's queues: holds only accepted, not yet released requests.
        self._waiting: deque[tuple[asyncio.Future[_Result], asyncio.Future[_Result]]] = deque()

    def wrap(
        self, inner: asyncio.Future[_Result], loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[_Result]:
        """Return the caller's future for `inner`; call in acceptance order."""
        outer: asyncio.Future[_Result] = loop.create_future()
        self._waiting.append((inner, outer))
        inner.add_done_callback(self._release)
        outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
        return outer

    def _release(self, _: object) -> None:
        waiting = self._waiting
        while waiting and waiting[0][0].done():
            inner, outer = waiting.popleft()
            if outer.done():
                continue
            if inner.cancelled():
                outer.cancel()
            elif (error := inner.exception()) is not None:
                outer.set_exception(error)
            else:
                outer.set_result(inner.result())
