"""The adaptive delay as a function of synthetic observations (no clocks, no threads)."""

from __future__ import annotations

import pytest

from pipeserve.batching.adaptive import AdaptiveDelay, _fit_affine
from pipeserve.batching.forming import decide
from tests.unit.batching.test_batching_forming import entries
from tests.unit.batching_fakes import Harness, request, run

US = 1_000
MS = 1_000_000


def trained(fixed_ms: float = 1.0, per_item_ms: float = 0.1, cap_ns: int = 0) -> AdaptiveDelay:
    d = AdaptiveDelay(max_preferred=32, cap_ns=cap_ns)
    for size in (1, 4, 16):
        for _ in range(3):
            d.record_execution(size, int((fixed_ms + per_item_ms * size) * MS))
    return d


def arrivals(d: AdaptiveDelay, gap_ns: int, count: int, start: int = 0) -> int:
    t = start
    for _ in range(count):
        t += gap_ns
        d.record_arrival(1, t)
    return t


def test_fit_recovers_fixed_and_per_item_cost() -> None:
    fit = _fit_affine({1: (1.1e6, 3), 4: (1.4e6, 3), 16: (2.6e6, 3)})
    assert fit is not None
    a, c = fit
    assert a == pytest.approx(1.0e6) and c == pytest.approx(0.1e6)
    assert _fit_affine({4: (1.0, 1)}) is None  # one size cannot separate a from c


def test_fixed_cost_never_exceeds_the_cheapest_execution() -> None:
    # Stale large-batch timings (a busier period) imply a fixed cost above what a batch of one
    # costs now.
    fit = _fit_affine({1: (1.0e6, 3), 8: (5.7e6, 3), 16: (6.6e6, 3)})  # unclamped: 1.37 ms
    assert fit is not None and fit[0] <= 1.0e6


def test_untrained_never_waits() -> None:
    d = AdaptiveDelay(max_preferred=32)
    now = arrivals(d, 10 * US, 50)
    assert d.send_by(1, now, now) == now
    assert not d.expired(now - 10 * MS, now)


def test_single_client_rate_never_waits() -> None:
    d = trained()  # a = 1 ms
    # One closed-loop client: one request per execution + round trip (> a).
    now = arrivals(d, 1_500 * US, 50)
    assert d.send_by(1, now, now) == now


def test_high_rate_waits_while_fewer_than_rate_times_fixed_cost_are_queued() -> None:
    d = trained()  # a = 1 ms
    now = arrivals(d, 50 * US, 100)  # 20 per ms: a*L = 20
    wake = d.send_by(5, now, now)
    assert now < wake <= now + 1 * MS
    assert d.send_by(25, now, now) == now  # more queued than arrive per fixed cost: go


def test_closed_loop_bursts_are_not_taken_for_the_rate() -> None:
    # 32 closed-loop clients, one slot: each answered batch of 16 sends 16 requests back at once
    # (10 us apart), one burst per execution (~3.6 ms). The rate is ~4.4 per ms, so a*L ~ 3.5:
    # with 16 queued right after a burst, waiting would only idle the slot.
    d = trained(fixed_ms=0.8, per_item_ms=0.14)
    t = 0
    for _ in range(12):
        t = arrivals(d, 10 * US, 16, start=t + 3_450 * US)
    assert d.send_by(16, t - 150 * US, t) == t
    # A steady stream at the same mean rate still waits while fewer than a*L are queued.
    s = trained(fixed_ms=0.8, per_item_ms=0.14)
    now = arrivals(s, 227 * US, 200)
    assert s.send_by(2, now, now) > now


def test_silence_ends_the_wait() -> None:
    d = trained()
    last = arrivals(d, 50 * US, 100)
    wake = d.send_by(5, last, last)
    # a*m/S after the last arrival: 1 ms / 5 = 200 us.
    assert wake == last + 200 * US
    assert d.send_by(5, last, wake) == wake  # once that much silence passed: go


def test_cap_bounds_the_wait_from_the_oldest() -> None:
    d = trained(cap_ns=100 * US)
    now = arrivals(d, 10 * US, 200)
    assert d.send_by(1, now - 50 * US, now) == now + 50 * US
    assert d.expired(now - 100 * US, now)
    # Without a configured cap: one execution at the largest preferred size (1 + 3.2 ms).
    assert not trained().expired(now - 4 * MS, now)
    assert trained().expired(now - 5 * MS, now)


def host_bound(overlapping: bool, busy_share: float) -> tuple[AdaptiveDelay, int]:
    """Executions of 1 and 4 items, one per 1 ms cycle, busy `busy_share` of it on average
    (T(1) = share/2, T(4) = 3*share/2 ms: a = share/6, c = share/3 ms); then 100 arrivals every
    500 us, each finding others outstanding or not."""
    d = AdaptiveDelay(max_preferred=32)
    t = 0
    for i in range(40):
        t += MS
        size = 1 + 3 * (i % 2)
        d.record_execution(size, int(busy_share * MS * (0.5 if size == 1 else 1.5)), end_ns=t)
    for _ in range(100):
        t += 500 * US
        d.record_arrival(1, t, outstanding=3 if overlapping else 0)
    return d, t


def test_host_bound_waits_while_arrivals_keep_coming_up_to_the_cap() -> None:
    d, now = host_bound(overlapping=True, busy_share=0.2)
    assert d.host_bound()
    # The slot rule alone would send (a = 33 us, 2 per ms: a*L < 1 queued); here it waits two
    # mean gaps past the last arrival ...
    assert d.send_by(1, now, now) == now + 1 * MS
    # ... but never past the cap from the oldest (one execution at 32: about 2.2 ms here).
    cap = d.send_by(1, now - 2 * MS, now) - (now - 2 * MS)
    assert cap == pytest.approx(0.2 / 6 * MS + 0.2 / 3 * MS * 32, rel=0.01)


def test_a_pause_in_traffic_is_not_taken_for_idle_slots() -> None:
    # Busy slots (90%), then two seconds without requests, then the load returns: judged by a
    # window that spans the pause, the slots would look idle and the batch would wait for every
    # client seen lately.
    d = AdaptiveDelay(max_preferred=32)
    t = 0
    for i in range(64):
        t += MS
        size = 1 + 3 * (i % 2)
        d.record_execution(size, int(0.9 * MS), end_ns=t)
    assert not d.host_bound()
    t += 2_000 * MS
    for _ in range(4):
        t += MS
        d.record_execution(16, int(0.9 * MS), end_ns=t)
    for _ in range(40):
        t += 50 * US
        d.record_arrival(1, t, outstanding=12)
    assert not d.host_bound()


def test_host_bound_goes_once_everything_seen_in_flight_is_queued() -> None:
    d, now = host_bound(overlapping=True, busy_share=0.2)  # arrivals found 3 others: peak 4
    assert d.send_by(3, now, now) > now
    assert d.send_by(4, now, now) == now  # a 5th would only come after these are answered


def test_a_lone_client_never_waits_even_when_slots_idle() -> None:
    d, now = host_bound(overlapping=False, busy_share=0.2)
    assert not d.host_bound()
    assert d.send_by(1, now, now) == now


def test_busy_slots_use_the_slot_rule() -> None:
    d, now = host_bound(overlapping=True, busy_share=0.9)
    assert not d.host_bound()
    assert d.send_by(1, now, now) == now  # slot rule: a*L = 0.15 ms * 2 per ms < 1 queued
    assert d.send_by(1, now, now + 10 * MS) == now + 10 * MS


def test_forming_rules_use_the_adaptive_wait() -> None:
    d = trained()
    now = arrivals(d, 50 * US, 100)
    es = entries([1, 1], t0=now)
    common = dict(max_batch_size=32, preferred=frozenset(), max_preferred=32, draining=False)
    waiting = decide(es, delay=d, now_ns=now, **common)  # type: ignore[arg-type]
    assert waiting.batch == [] and waiting.wake_ns > now
    slow = trained()
    now = arrivals(slow, 5 * MS, 20)
    going = decide(es, delay=slow, now_ns=now, **common)  # type: ignore[arg-type]
    assert len(going.batch) == 2


def test_adaptive_batcher_learns_from_executions() -> None:
    """End to end through DynamicBatcher: before any timing it behaves like delay 0."""

    async def body() -> None:
        h = Harness(
            'dynamic_batching { }\nparameters { key: "batching_mode" value: '
            '{ string_value: "adaptive" } }'
        )
        first = h.batcher.submit(request(1))
        call = await h.runner.next_call()
        assert call.column() == [1]  # untrained: sent at once, alone
        call.release()
        await first
        await h.close()

    run(body())
