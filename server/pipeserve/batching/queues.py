"""The dynamic batcher's request queues: one FIFO per priority level, each with Triton's queue
policy (bounded size, queue timeout, REJECT or DELAY on expiry).

Not thread-safe: DynamicBatcher calls every method with its lock held.

Removal is lazy. A cancelled, rejected or taken entry stays in its deque marked not QUEUED and is
skipped (and popped once it reaches the front); when dead entries outnumber live ones the deques
are rebuilt, so memory stays proportional to the live requests. A DELAYed entry is appended to its
level's `delayed` deque and its stale copy in `main` is skipped the same way.

Service order: level 1 main, level 1 delayed, level 2 main, level 2 delayed, ... (Triton's
priority queue does the same: a delayed request waits behind every non-expired request of its own
level, not behind lower-priority levels).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from pipeserve.batching.base import Pending
from pipeserve.batching.policy import QueuePolicy, TimeoutAction
from pipeserve.errors import QueueFullError

# Rebuild a level's deques when they hold this many more dead entries than live ones.
_COMPACT_SLACK = 64


class State(enum.Enum):
    QUEUED = 0
    TAKEN = 1  # left the queue for execution
    GONE = 2  # cancelled or rejected while queued


@dataclass(slots=True, eq=False)
class Entry:
    pending: Pending
    size: int  # the request's own batch dimension
    # Requests may share a batch only when their keys are equal (input set, variable shapes).
    key: Hashable
    level: int  # 0-based priority level
    enqueued_ns: int  # monotonic; max_queue_delay is measured from the oldest of a batch
    deadline_ns: int = 0  # monotonic queue deadline; 0 = none
    state: State = State.QUEUED
    delayed: bool = False  # its timeout expired under TimeoutAction.DELAY


@dataclass(slots=True)
class _Level:
    policy: QueuePolicy
    main: deque[Entry] = field(default_factory=deque)
    delayed: deque[Entry] = field(default_factory=deque)
    queued: int = 0

    def compact_if_sparse(self) -> None:
        if len(self.main) + len(self.delayed) > 2 * self.queued + _COMPACT_SLACK:
            self.main = deque(e for e in self.main if e.state is State.QUEUED and not e.delayed)
            self.delayed = deque(e for e in self.delayed if e.state is State.QUEUED)

    def trim(self) -> None:
        main, delayed = self.main, self.delayed
        while main and (main[0].state is not State.QUEUED or main[0].delayed):
            main.popleft()
        while delayed and delayed[0].state is not State.QUEUED:
            delayed.popleft()


class PriorityQueues:
    def __init__(self, policies: tuple[QueuePolicy, ...]) -> None:
        self._levels = [_Level(p) for p in policies]
        # (deadline_ns, tie-breaker, entry) for entries that have a deadline; stale ones are
        # skipped when popped and dropped when the heap grows sparse.
        self._deadlines: list[tuple[int, int, Entry]] = []
        self._tie = itertools.count()
        self.queued = 0  # live entries over all levels
        self.queued_items = 0  # their batch dimensions summed

    def footprint(self) -> int:
        """References held, dead ones included: stays proportional to `queued`."""
        return sum(len(lv.main) + len(lv.delayed) for lv in self._levels) + len(self._deadlines)

    def policy(self, level: int) -> QueuePolicy:
        return self._levels[level].policy

    def push(self, entry: Entry) -> None:
        """Append to its level. Raises QueueFullError when the level holds max_queue_size."""
        lv = self._levels[entry.level]
        if lv.queued >= lv.policy.max_queue_size:
            raise QueueFullError()
        lv.compact_if_sparse()
        lv.main.append(entry)
        lv.queued += 1
        self.queued += 1
        self.queued_items += entry.size
        if entry.deadline_ns:
            if len(self._deadlines) > 2 * self.queued + _COMPACT_SLACK:
                self._deadlines = [d for d in self._deadlines if d[2].state is State.QUEUED]
                heapq.heapify(self._deadlines)
            heapq.heappush(self._deadlines, (entry.deadline_ns, next(self._tie), entry))

    def remove(self, entry: Entry) -> bool:
        """Drop a queued entry (cancelled). False when it already left the queue."""
        if entry.state is not State.QUEUED:
            return False
        self._drop(entry, State.GONE)
        return True

    def take(self, entries: list[Entry]) -> None:
        """Mark entries as leaving for execution (they must be QUEUED)."""
        for e in entries:
            self._drop(e, State.TAKEN)

    def _drop(self, entry: Entry, state: State) -> None:
        entry.state = state
        self._levels[entry.level].queued -= 1
        self.queued -= 1
        self.queued_items -= entry.size

    def expire(self, now_ns: int) -> list[Entry]:
        """Apply the timeout action to every entry whose deadline has passed.

        REJECT entries are removed and returned (the caller answers them); DELAY entries move
        behind their level's non-expired entries.
        """
        rejected: list[Entry] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now_ns:
            entry = heapq.heappop(heap)[2]
            if entry.state is not State.QUEUED or entry.delayed:
                continue
            lv = self._levels[entry.level]
            if lv.policy.timeout_action is TimeoutAction.DELAY:
                entry.delayed = True
                lv.delayed.append(entry)
            else:
                self._drop(entry, State.GONE)
                rejected.append(entry)
        return rejected

    def next_deadline_ns(self) -> int:
        """The earliest pending queue deadline, 0 when none."""
        heap = self._deadlines
        while heap and (heap[0][2].state is not State.QUEUED or heap[0][2].delayed):
            heapq.heappop(heap)
        return heap[0][0] if heap else 0

    def in_service_order(self) -> Iterator[Entry]:
        """Live entries, highest priority first, FIFO within a level, delayed ones last in their
        level. Do not push, take or remove while iterating."""
        for lv in self._levels:
            if not lv.queued:
                continue
            lv.trim()
            for e in lv.main:
                if e.state is State.QUEUED and not e.delayed:
                    yield e
            for e in lv.delayed:
                if e.state is State.QUEUED:
                    yield e
