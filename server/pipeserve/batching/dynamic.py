"""DynamicBatcher: the scheduler for models with `dynamic_batching` (Triton's semantics; the
rules for forming a batch live in forming.py, the queues and their policies in queues.py).

Threads and ownership:
- `submit`, cancellation callbacks and timeout timers run on the event loop; they touch the queues
  only under `_lock`, for a few list operations each.
- One worker thread per execution slot (runner.slot_count). A batch forms when a slot is free: the
  free worker that holds `_form_lock` is the only one that looks at the queues and, when the rules
  say wait, the only one waiting on `_cond`; the other free workers queue behind it on
  `_form_lock`. So two free slots never split what one batch could hold, and `submit` wakes at
  most one thread.
- After taking a batch the worker releases both locks and runs `execute_batch` (shared with
  DirectScheduler: gather, run, split, observer calls, cancellation drop, error fan-out).

Inline execution: when a model's batches take under INLINE_MAX_NS on average, every slot is idle
and nothing is queued, a request is not handed to a worker thread. It joins a batch that the
event loop itself runs at its next turn (loop.call_soon), so whatever else arrives in the same
loop iteration joins it too, and the answers are set on the loop directly: no Condition wake-up,
no call_soon_threadsafe, two thread switches fewer per batch. The loop blocks for a batch's
execution, which is why only tiny models qualify. While such a batch is pending, every request
joins one (never the queue), so a worker never runs beside it: a slot still runs one batch at a
time. Only for the plain policy (one priority level, no queue timeouts, no delay, no ordering,
no shape grouping, fixed mode), inputs without variable dims, and a runner that allows it
(batching.base: `inline_safe`).

Timeouts: a request's queue deadline comes from its level's policy (queues.py). REJECT deadlines
also get a loop timer, so a request is answered "Request timeout expired" on time even while every
slot is busy; the forming worker applies expiry again before every decision.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable

import numpy as np

from pipeserve.batching.adaptive import AdaptiveDelay
from pipeserve.batching.base import ModelRunner, Pending, Scheduler, join_all, start_workers
from pipeserve.batching.execute import execute_batch, fail
from pipeserve.batching.forming import DelayPolicy, FixedDelay, decide
from pipeserve.batching.ordering import OrderedRelease
from pipeserve.batching.policy import BatchingMode, BatchingPolicy, TimeoutAction
from pipeserve.batching.queues import Entry, PriorityQueues, State
from pipeserve.errors import (
    ExecutionError,
    ModelNotReadyError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
)
from pipeserve.inference import InferRequest, ModelSpec
from pipeserve.observers import InferenceObserver

log = logging.getLogger(__name__)

# A batch on average faster than this runs on the event loop when the model is idle (above).
# Two thread hand-offs cost ~30-60 us on the machines measured; a batch this short blocks the
# loop for less than the other clients' requests gain from not waiting behind those hand-offs.
INLINE_MAX_NS = 200_000
# Weight of the newest execution in the running average of batch execution time.
_AVERAGE_WEIGHT = 0.2


class DynamicBatcher(Scheduler):
    def __init__(
        self,
        spec: ModelSpec,
        runner: ModelRunner,
        observer: InferenceObserver,
        policy: BatchingPolicy,
        clock: Callable[[], int] = time.monotonic_ns,
        inline_max_ns: int = INLINE_MAX_NS,
    ) -> None:
        """`clock`: monotonic nanoseconds for enqueue times, queue deadlines and the batching
        delay (tests pass one they can step forward instead of sleeping past a timeout).
        `inline_max_ns`: batches faster than this on average may run on the loop (0: never)."""
        self._clock = clock
        self._inline_max_ns = inline_max_ns
        self._spec = spec
        self._runner = runner
        self._observer = observer
        self._policy = policy
        self._preferred = frozenset(policy.preferred_batch_sizes)
        self._queues = PriorityQueues(policy.queue_policies)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._form_lock = threading.Lock()
        self._former_waiting = False  # guarded by _lock
        self._executing = 0  # items taken for execution and not yet answered; under _lock
        self._closing = False  # written under _lock
        self._adaptive: AdaptiveDelay | None = None
        self._delay: DelayPolicy
        if policy.mode is BatchingMode.ADAPTIVE:
            self._adaptive = AdaptiveDelay(
                policy.max_preferred_batch_size, policy.max_queue_delay_ns, runner.slot_count
            )
            self._delay = self._adaptive
        else:
            self._delay = FixedDelay(policy.max_queue_delay_ns)
        self._ordered = OrderedRelease() if policy.preserve_ordering else None
        # Most models have neither optional inputs nor variable dims: then every request shares
        # one key and none is computed per request.
        self._keyed = bool(policy.equal_shape_inputs) or any(s.optional for s in spec.inputs)
        self._inline_capable = (
            getattr(runner, "inline_safe", False)
            and policy.mode is BatchingMode.FIXED
            and policy.max_queue_delay_ns == 0
            and not policy.preserve_ordering
            and policy.priority_levels == 1
            and not self._keyed
            # Fixed dims only: then a batch's size, so its run time, is bounded by
            # max_batch_size; a variable dim would let one large request hold the loop.
            and not any(-1 in s.dims for s in spec.inputs)
            and policy.queue_policies[0].default_timeout_us == 0
            and not policy.queue_policies[0].allow_timeout_override
        )
        # Running average of batch execution ns (0: none measured yet; workers and the loop
        # both write it, a float assignment).
        self._execution_ns = 0.0
        # Batches the loop will run at its next turn, in order; each at most max_batch_size.
        self._inline: list[list[Entry]] = []
        self._inline_items = 0  # in all of them
        self._inline_last = 0  # in the last one
        self._workers = start_workers(spec, runner, self._work)

    # --- event loop side --------------------------------------------------------------------

    def submit(self, request: InferRequest) -> asyncio.Future[dict[str, np.ndarray]]:
        if self._closing:
            raise ModelNotReadyError(f"model '{self._spec.name}' is unloading")
        loop = self._running_loop()
        now = self._clock()
        level = self._policy.level_of(request.priority)
        queue_policy = self._queues.policy(level)
        timeout_us = queue_policy.timeout_us(request.timeout_us)
        deadline = now + timeout_us * 1000 if timeout_us else 0
        pending = Pending(request, loop.create_future(), loop, deadline_ns=deadline)
        entry = Entry(pending, request.batch_size, self._key(request), level, now, deadline)
        if self._inline_capable and self._join_inline(entry, loop):
            self._observer.pending_changed(+1)
            return pending.future
        with self._lock:
            if self._closing:
                raise ModelNotReadyError(f"model '{self._spec.name}' is unloading")
            self._queues.push(entry)  # raises QueueFullError: nothing recorded, nothing queued
            if self._adaptive is not None:
                outstanding = self._queues.queued_items - request.batch_size + self._executing
                self._adaptive.record_arrival(request.batch_size, now, outstanding)
            if self._former_waiting:
                self._cond.notify()
        self._observer.pending_changed(+1)
        pending.future.add_done_callback(functools.partial(self._on_done, entry))
        if deadline and queue_policy.timeout_action is TimeoutAction.REJECT:
            loop.call_later(timeout_us / 1e6, self._expire, entry)
        if self._ordered is not None:
            return self._ordered.wrap(pending.future, loop)
        return pending.future

    def _join_inline(self, entry: Entry, loop: asyncio.AbstractEventLoop) -> bool:
        """Add `entry` to a batch the loop runs itself (module docstring); False: queue it.

        Only the first request of a loop turn looks at the workers' side (under the lock):
        from then on every request joins here and none is queued, so no worker can start a
        batch before _run_inline has run (the loop runs no submit meanwhile)."""
        if not self._inline:
            if not 0 < self._execution_ns < self._inline_max_ns:
                return False
            with self._lock:
                if self._closing or self._queues.queued or self._executing:
                    return False
            self._inline.append([])
            self._inline_last = 0
            loop.call_soon(self._run_inline)
        elif self._inline_items >= self._queues.policy(0).max_queue_size:
            raise QueueFullError()
        if self._inline_last + entry.size > self._policy.max_batch_size:
            self._inline.append([])
            self._inline_last = 0
        entry.state = State.TAKEN
        self._inline[-1].append(entry)
        self._inline_last += entry.size
        self._inline_items += entry.size
        return True

    def _run_inline(self) -> None:
        """On the loop: run the batches _join_inline formed, in order."""
        batches, self._inline, self._inline_items = self._inline, [], 0
        for batch in batches:
            started = self._clock()
            for e in batch:
                e.pending.dequeued_ns = started
            self._execute(0, [e.pending for e in batch], True, self._record_execution)

    def _execute(
        self,
        slot: int,
        pendings: list[Pending],
        on_loop: bool = False,
        release: Callable[[int], None] | None = None,
    ) -> None:
        try:
            execute_batch(
                self._runner, slot, pendings, self._spec, self._observer, on_loop, release
            )
        except Exception as exc:  # a bug in gather/split must not kill the slot
            log.exception("batch on model '%s' failed outside the runner", self._spec.name)
            for p in pendings:
                fail(
                    p,
                    ExecutionError(f"batch failed on model '{self._spec.name}': {exc}"),
                    self._observer,
                )

    def _release_once(self, items: int) -> Callable[[int], None]:
        """What a worker calls when its batch no longer holds the slot (only the first call
        counts): the time it held it joins the average, and `items` stop counting as executing,
        so the loop may run the next batch."""
        done = False

        def release(held_ns: int) -> None:
            nonlocal done
            if not done:
                done = True
                self._record_execution(held_ns)
                with self._lock:
                    self._executing -= items

        return release

    def _record_execution(self, ns: int) -> None:
        """Workers and the loop both call it; a lost update only delays the average. 0: nothing
        ran."""
        if not ns:
            return
        previous = self._execution_ns
        self._execution_ns = ns if not previous else previous + _AVERAGE_WEIGHT * (ns - previous)

    def _key(self, request: InferRequest) -> Hashable:
        if not self._keyed:
            return ()
        inputs = request.inputs
        equal = self._policy.equal_shape_inputs
        parts: list[object] = []
        for spec in self._spec.inputs:
            array = inputs.get(spec.name)
            if array is None:
                parts.append(None)
            else:
                parts.append(array.shape[1:] if spec.name in equal else True)
        return tuple(parts)

    def _on_done(self, entry: Entry, future: asyncio.Future[dict[str, np.ndarray]]) -> None:
        """A caller that cancels (client cancel, deadline) leaves the queue at once."""
        if not future.cancelled():
            return
        with self._lock:
            removed = self._queues.remove(entry)
        if removed:
            fail(
                entry.pending,
                RequestCancelledError("request was cancelled in the queue"),
                self._observer,
            )

    def _expire(self, timed: Entry) -> None:
        """Loop timer for `timed`'s REJECT deadline (applies every expiry due by now)."""
        now = self._clock()
        with self._lock:
            rejected = self._queues.expire(now)
            if self._former_waiting:
                self._cond.notify()  # a DELAY move may change what the next batch is
            early = timed.state is State.QUEUED and timed.deadline_ns > now
        for e in rejected:
            fail(e.pending, RequestTimeoutError(), self._observer)
        if early:  # a loop clock coarser than ours fired before the deadline: look again
            timed.pending.loop.call_later((timed.deadline_ns - now) / 1e9, self._expire, timed)

    async def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        # Workers drain every accepted request (no more waiting for batches to fill), then stop.
        await asyncio.to_thread(join_all, self._workers)
        if self._inline:  # accepted for the loop's next turn, which has not come yet
            self._run_inline()

    # --- worker side ------------------------------------------------------------------------

    def _work(self, slot: int) -> None:
        while True:
            with self._form_lock:
                batch = self._next_batch()
            if batch is None:
                return
            items = sum(e.size for e in batch)
            release = self._release_once(items)
            started = self._clock()
            self._execute(slot, [e.pending for e in batch], release=release)
            release(0)  # when execute_batch failed before it could
            ended = self._clock()
            if self._adaptive is not None:
                self._adaptive.record_execution(items, ended - started, ended)

    def _next_batch(self) -> list[Entry] | None:
        """Wait until the rules send a batch; None when draining is over. Holds _form_lock."""
        policy = self._policy
        with self._cond:
            while True:
                now = self._clock()
                for e in self._queues.expire(now):
                    fail(e.pending, RequestTimeoutError(), self._observer)
                decision = decide(
                    self._queues.in_service_order(),
                    max_batch_size=policy.max_batch_size,
                    preferred=self._preferred,
                    max_preferred=policy.max_preferred_batch_size,
                    delay=self._delay,
                    now_ns=now,
                    draining=self._closing,
                )
                if decision.batch:
                    self._queues.take(decision.batch)
                    self._executing += sum(e.size for e in decision.batch)
                    for e in decision.batch:
                        e.pending.dequeued_ns = now
                    return decision.batch
                if self._closing and not self._queues.queued:
                    return None
                wake = decision.wake_ns
                deadline = self._queues.next_deadline_ns()
                if deadline and (not wake or deadline < wake):
                    wake = deadline
                self._former_waiting = True
                self._cond.wait(None if not wake else max(wake - now, 0) / 1e9)
                self._former_waiting = False
