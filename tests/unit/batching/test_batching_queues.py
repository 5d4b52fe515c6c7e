"""Priority queues: service order, bounds, lazy removal, timeout actions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from pipeserve.batching.base import Pending
from pipeserve.batching.policy import QueuePolicy, TimeoutAction
from pipeserve.batching.queues import Entry, PriorityQueues, State
from pipeserve.errors import QueueFullError
from tests.unit.batching_fakes import request


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make(loop: asyncio.AbstractEventLoop, ident: int, level: int = 0, deadline: int = 0) -> Entry:
    pending = Pending(request(ident), loop.create_future(), loop)
    return Entry(pending, 1, (), level, enqueued_ns=ident, deadline_ns=deadline)


def idents(q: PriorityQueues) -> list[int]:
    return [int(e.pending.request.request_id.split(".")[0]) for e in q.in_service_order()]


def test_service_order_is_level_then_fifo(loop: asyncio.AbstractEventLoop) -> None:
    q = PriorityQueues((QueuePolicy(10), QueuePolicy(10)))
    for ident, level in [(1, 1), (2, 0), (3, 1), (4, 0)]:
        q.push(make(loop, ident, level))
    assert idents(q) == [2, 4, 1, 3]
    assert q.queued == 4


def test_push_refuses_beyond_max_queue_size(loop: asyncio.AbstractEventLoop) -> None:
    q = PriorityQueues((QueuePolicy(2),))
    q.push(make(loop, 1))
    q.push(make(loop, 2))
    with pytest.raises(QueueFullError):
        q.push(make(loop, 3))
    taken = next(q.in_service_order())
    q.take([taken])
    q.push(make(loop, 3))  # room again once one left for execution
    assert idents(q) == [2, 3]


def test_remove_only_while_queued(loop: asyncio.AbstractEventLoop) -> None:
    q = PriorityQueues((QueuePolicy(10),))
    a, b = make(loop, 1), make(loop, 2)
    q.push(a)
    q.push(b)
    assert q.remove(b) and not q.remove(b)
    q.take([a])
    assert not q.remove(a)
    assert (a.state, b.state, q.queued, idents(q)) == (State.TAKEN, State.GONE, 0, [])
    assert q.queued_items == 0


def test_queued_items_sum_batch_dimensions(loop: asyncio.AbstractEventLoop) -> None:
    q = PriorityQueues((QueuePolicy(10),))
    a, b = make(loop, 1), make(loop, 2)
    b.size = 3
    q.push(a)
    q.push(b)
    assert (q.queued, q.queued_items) == (2, 4)
    q.take([a])
    assert (q.queued, q.queued_items) == (1, 3)


def test_reject_expiry_returns_entries_and_frees_room(loop: asyncio.AbstractEventLoop) -> None:
    q = PriorityQueues((QueuePolicy(2, timeout_action=TimeoutAction.REJECT),))
    a, b = make(loop, 1, deadline=100), make(loop, 2, deadline=300)
    q.push(a)
    q.push(b)
    assert q.next_deadline_ns() == 100
    assert q.expire(99) == []
    assert q.expire(100) == [a]
    assert q.next_deadline_ns() == 300
    assert idents(q) == [2] and q.queued == 1


def test_delay_expiry_moves_behind_live_entries_of_its_level(
    loop: asyncio.AbstractEventLoop,
) -> None:
    delay = QueuePolicy(10, timeout_action=TimeoutAction.DELAY)
    q = PriorityQueues((delay, QueuePolicy(10)))
    q.push(make(loop, 1, deadline=50))
    q.push(make(loop, 2))
    q.push(make(loop, 3, level=1))
    assert q.expire(60) == []
    assert idents(q) == [2, 1, 3]  # behind level 1's live entries, ahead of level 2
    assert q.queued == 3 and q.next_deadline_ns() == 0


def test_dead_entries_do_not_accumulate(loop: asyncio.AbstractEventLoop) -> None:
    q = PriorityQueues((QueuePolicy(100_000),))
    keep = make(loop, 0)
    q.push(keep)
    for i in range(1, 5000):
        e = make(loop, i, deadline=10**12)
        q.push(e)
        q.remove(e)
    assert q.footprint() < 300
    assert idents(q) == [0]
