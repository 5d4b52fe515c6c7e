"""The batch-forming rules as a pure function of queued entries and a clock reading."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pipeserve.batching.base import Pending
from pipeserve.batching.forming import Decision, FixedDelay, decide
from pipeserve.batching.queues import Entry
from tests.unit.batching_fakes import request

MS = 1_000_000


def entries(sizes: Sequence[int], keys: Sequence[object] | None = None, t0: int = 0) -> list[Entry]:
    loop = asyncio.new_event_loop()
    try:
        out = []
        for i, size in enumerate(sizes):
            pending = Pending(request(i, rows=size), loop.create_future(), loop)
            key = keys[i] if keys else ()
            out.append(Entry(pending, size, key, 0, enqueued_ns=t0 + i * MS))
        return out
    finally:
        loop.close()


def run_decide(
    es: list[Entry],
    *,
    max_batch: int = 8,
    preferred: Sequence[int] = (),
    delay_ms: float = 0,
    now_ms: float = 0,
    draining: bool = False,
) -> Decision:
    return decide(
        es,
        max_batch_size=max_batch,
        preferred=frozenset(preferred),
        max_preferred=max(preferred) if preferred else max_batch,
        delay=FixedDelay(int(delay_ms * MS)),
        now_ns=int(now_ms * MS),
        draining=draining,
    )


def sizes_of(d: Decision) -> list[int]:
    return [e.size for e in d.batch]


def test_empty_queue_waits_for_an_arrival() -> None:
    assert run_decide([]) == Decision([], 0)


def test_zero_delay_sends_whatever_is_queued() -> None:
    es = entries([1, 1, 1])
    assert sizes_of(run_decide(es)) == [1, 1, 1]


def test_nonzero_delay_waits_until_oldest_plus_delay() -> None:
    es = entries([1, 1], t0=10 * MS)
    d = run_decide(es, delay_ms=5, now_ms=11)
    assert d.batch == [] and d.wake_ns == 15 * MS  # measured from the oldest (enqueued at 10 ms)
    assert sizes_of(run_decide(es, delay_ms=5, now_ms=15)) == [1, 1]


def test_oldest_is_the_oldest_in_the_candidate_not_the_first() -> None:
    es = entries([1, 1], t0=10 * MS)
    es[1].enqueued_ns = 2 * MS  # e.g. a higher-priority level served first arrived later
    assert sizes_of(run_decide(es, delay_ms=5, now_ms=8)) == [1, 1]


def test_preferred_cut_at_largest_reached() -> None:
    es = entries([1, 1, 1, 1, 1])
    assert sizes_of(run_decide(es, preferred=[2, 4], delay_ms=100)) == [1, 1, 1, 1]
    # Only 3 queued: 2 is the largest preferred size reached.
    assert sizes_of(run_decide(entries([1, 1, 1]), preferred=[2, 4], delay_ms=100)) == [1, 1]


def test_preferred_cut_applies_with_zero_delay_too() -> None:
    es = entries([1, 1, 1, 1, 1])
    assert sizes_of(run_decide(es, preferred=[4])) == [1, 1, 1, 1]


def test_expired_delay_sends_everything_not_the_preferred_cut() -> None:
    es = entries([1, 1, 1, 1, 1])
    assert len(run_decide(es, preferred=[4], delay_ms=1, now_ms=50).batch) == 5


def test_outgrowing_every_preferred_size_cuts_before_the_overshoot() -> None:
    es = entries([3, 3, 3])
    # 3 and 6 are not preferred; 9 > 8 = largest preferred: cut before the third request.
    assert sizes_of(run_decide(es, max_batch=16, preferred=[4, 8], delay_ms=100)) == [3, 3]


def test_first_request_larger_than_every_preferred_size_goes_alone() -> None:
    es = entries([6, 1])
    assert sizes_of(run_decide(es, max_batch=8, preferred=[4], delay_ms=100)) == [6]
    # Alone in the queue it goes too: it can never grow into a preferred size.
    assert sizes_of(run_decide(entries([6]), max_batch=8, preferred=[4], delay_ms=100)) == [6]


def test_not_yet_preferred_waits() -> None:
    d = run_decide(entries([1]), preferred=[4], delay_ms=100, now_ms=1)
    assert d.batch == [] and d.wake_ns == 100 * MS


def test_full_batch_goes_at_once() -> None:
    es = entries([4, 4, 1])
    assert sizes_of(run_decide(es, max_batch=8, delay_ms=100)) == [4, 4]


def test_a_request_that_does_not_fit_ends_the_candidate() -> None:
    es = entries([5, 4])
    # 5 + 4 > 8: the 4 waits for the next batch, the 5 goes now (it cannot grow).
    assert sizes_of(run_decide(es, max_batch=8, delay_ms=100)) == [5]


def test_key_mismatch_ends_the_candidate_and_keeps_fifo() -> None:
    es = entries([1, 1, 1], keys=["a", "b", "a"])
    assert sizes_of(run_decide(es, delay_ms=100)) == [1]


def test_draining_sends_at_once() -> None:
    assert sizes_of(run_decide(entries([1]), delay_ms=100, draining=True)) == [1]
