"""DynamicBatcher driven by a gated fake runner: every batch blocks until the test releases it, so
what queues meanwhile is known exactly. Nothing sleeps to prove anything."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from pipeserve.errors import (
    ExecutionError,
    ModelNotReadyError,
    QueueFullError,
    RequestTimeoutError,
)
from pipeserve.inference import TensorSpec
from tests.unit.batching_fakes import Call, Harness, request, run, spec


async def _start_blocked(h: Harness, ident: float = 0.0) -> tuple[asyncio.Future, Call]:
    """Submit one request and wait until it executes: the single slot is then busy."""
    future = h.batcher.submit(request(ident))
    call = await h.runner.next_call()
    assert call.column() == [ident]
    return future, call


def test_requests_queued_while_busy_form_one_batch_with_zero_delay() -> None:
    async def body() -> None:
        h = Harness("dynamic_batching { }")
        first, call = await _start_blocked(h)
        futures = [h.batcher.submit(request(i)) for i in (1, 2, 3)]
        call.release()
        batch = await h.runner.next_call()
        assert batch.column() == [1, 2, 3]
        batch.release()
        results = await asyncio.gather(first, *futures)
        for i, result in zip((0, 1, 2, 3), results, strict=True):
            np.testing.assert_array_equal(result["y"], request(i).inputs["x"] * 2)
        snap = h.stats.snapshot()
        assert (snap.inference_count, snap.execution_count) == (4, 2)
        assert sorted(snap.batch_stats) == [1, 3]
        await h.close()

    run(body())


def test_results_are_split_back_by_rows() -> None:
    async def body() -> None:
        h = Harness("dynamic_batching { }")
        first, call = await _start_blocked(h)
        a = h.batcher.submit(request(1, rows=2))
        b = h.batcher.submit(request(2, rows=3))
        call.release()
        batch = await h.runner.next_call()
        assert batch.rows == 5
        batch.release()
        ra, rb = await asyncio.gather(a, b)
        assert ra["y"].shape == (2, 2) and rb["y"].shape == (3, 2)
        assert set(ra["y"][:, 0]) == {2.0} and set(rb["y"][:, 0]) == {4.0}
        await first
        assert h.stats.snapshot().inference_count == 6
        await h.close()

    run(body())


def test_cut_at_largest_preferred_size_reached() -> None:
    async def body() -> None:
        h = Harness(
            "dynamic_batching { preferred_batch_size: [2, 4] "
            "max_queue_delay_microseconds: 60000000 }"
        )
        # 60 s delay: only the preferred-size rule can send anything while the test runs. A
        # 4-row blocker goes at once (preferred size) and keeps the slot busy while 5 queue.
        blocker = h.batcher.submit(request(0, rows=4))
        call = await h.runner.next_call()
        futures = [h.batcher.submit(request(i)) for i in range(1, 6)]
        call.release()
        call = await h.runner.next_call()
        assert call.column() == [1, 2, 3, 4]
        call.release()
        await asyncio.gather(blocker, *futures[:4])
        assert not futures[4].done()
        await h.close()  # draining sends the rest without waiting
        await futures[4]

    run(body())


def test_waits_for_the_delay_then_sends_what_it_has() -> None:
    async def body() -> None:
        h = Harness(
            "dynamic_batching { preferred_batch_size: [4] max_queue_delay_microseconds: 20000 }"
        )
        t0 = time.monotonic_ns()
        future = h.batcher.submit(request(7))
        call = await h.runner.next_call()
        waited = time.monotonic_ns() - t0
        assert call.column() == [7]
        assert waited >= 20_000_000  # a lower bound on a monotonic clock: cannot pass by luck
        call.release()
        await future
        await h.close()

    run(body())


def test_delay_lets_later_requests_join_the_oldest() -> None:
    async def body() -> None:
        h = Harness(
            "dynamic_batching { preferred_batch_size: [3] max_queue_delay_microseconds: 60000000 }"
        )
        futures = [h.batcher.submit(request(i)) for i in (1, 2, 3)]
        call = await h.runner.next_call()
        assert call.column() == [1, 2, 3]  # request 1 waited for 2 and 3 instead of going alone
        call.release()
        await asyncio.gather(*futures)
        await h.close()

    run(body())


def test_max_batch_size_is_never_exceeded_and_requests_never_split() -> None:
    async def body() -> None:
        h = Harness("dynamic_batching { }", model=spec(max_batch_size=4))
        first, call = await _start_blocked(h)
        sizes = {1: 3, 2: 2, 3: 1, 4: 4}
        futures = [h.batcher.submit(request(i, rows=n)) for i, n in sizes.items()]
        call.release()
        seen = []
        for _ in range(3):
            batch = await h.runner.next_call()
            seen.append(sorted(set(batch.column())))
            assert batch.rows <= 4
            batch.release()
        # 3 + 2 > 4 sends [1]; [2, 3] fill 3, the 4-row request does not fit: sent alone.
        assert seen == [[1], [2, 3], [4]]
        await asyncio.gather(first, *futures)
        await h.close()

    run(body())


def test_variable_dims_batch_only_equal_shapes_in_order() -> None:
    async def body() -> None:
        h = Harness("dynamic_batching { }", model=spec(dims=(-1,)))
        first, call = await _start_blocked(h)
        widths = [(1, 4), (2, 4), (3, 5), (4, 4)]
        futures = [h.batcher.submit(request(i, width=w)) for i, w in widths]
        call.release()
        seen = []
        for _ in range(3):
            batch = await h.runner.next_call()
            seen.append((batch.column(), batch.inputs["x"].shape[1]))
            batch.release()
        # FIFO is kept: the 5-wide request ends the first batch instead of being jumped.
        assert seen == [([1, 2], 4), ([3], 5), ([4], 4)]
        await asyncio.gather(first, *futures)
        await h.close()

    run(body())


def test_optional_inputs_batch_only_with_equal_input_sets() -> None:
    async def body() -> None:
        extra = TensorSpec("z", "FP32", (1,), optional=True)
        h = Harness("dynamic_batching { }", model=spec(extra_inputs=[extra]))
        first, call = await _start_blocked(h)
        z = np.ones((1, 1), dtype=np.float32)
        futures = [
            h.batcher.submit(request(1, z=z)),
            h.batcher.submit(request(2)),
            h.batcher.submit(request(3)),
        ]
        call.release()
        seen = []
        for _ in range(2):
            batch = await h.runner.next_call()
            seen.append((batch.column(), sorted(batch.inputs)))
            batch.release()
        assert seen == [([1], ["x", "z"]), ([2, 3], ["x"])]
        await asyncio.gather(first, *futures)
        await h.close()

    run(body())


def test_higher_priority_first_fifo_within_level_out_of_range_is_default() -> None:
    async def body() -> None:
        h = Harness(
            "dynamic_batching { priority_levels: 3 default_priority_level: 2 }",
            model=spec(max_batch_size=1),
        )
        first, call = await _start_blocked(h)
        order = [(1, 3), (2, 0), (3, 1), (4, 2), (5, 9), (6, 1)]  # (id, priority)
        futures = [h.batcher.submit(request(i, priority=p)) for i, p in order]
        call.release()
        seen = []
        for _ in order:
            batch = await h.runner.next_call()
            seen.extend(batch.column())
            batch.release()
        # level 1: 3, 6; level 2 (default; 0 and 9 map here): 2, 4, 5; level 3: 1
        assert seen == [3, 6, 2, 4, 5, 1]
        await asyncio.gather(first, *futures)
        await h.close()

    run(body())


def test_queue_full_rejects_at_once_per_level() -> None:
    async def body() -> None:
        h = Harness(
            "dynamic_batching { priority_levels: 2 default_priority_level: 2 "
            "priority_queue_policy { key: 1 value: { max_queue_size: 1 } } "
            "default_queue_policy { max_queue_size: 2 } }"
        )
        first, call = await _start_blocked(h)
        queued = [h.batcher.submit(request(1, priority=1))]
        with pytest.raises(QueueFullError, match="Exceeds maximum queue size"):
            h.batcher.submit(request(2, priority=1))
        queued += [h.batcher.submit(request(i)) for i in (3, 4)]
        with pytest.raises(QueueFullError):
            h.batcher.submit(request(5))
        call.release()
        await h.close()
        await asyncio.gather(first, *queued)
        snap = h.stats.snapshot()
        assert snap.inference_count == 4  # rejected requests never ran

    run(body())


def test_timeout_reject_answers_while_every_slot_is_busy() -> None:
    async def body() -> None:
        # The blocker goes to level 1 (no timeout), so it cannot expire before it runs.
        h = Harness(
            "dynamic_batching { priority_levels: 2 default_priority_level: 1 "
            "priority_queue_policy { key: 2 value: { default_timeout_microseconds: 1000 } } }"
        )
        first, call = await _start_blocked(h)
        late = h.batcher.submit(request(1, priority=2))
        # The only slot stays blocked, so only the queue timeout can answer this request.
        with pytest.raises(RequestTimeoutError, match="Request timeout expired"):
            await late
        assert not first.done()
        call.release()
        await first
        await h.close()
        snap = h.stats.snapshot()
        assert (snap.inference_count, snap.fail.count) == (1, 1)

    run(body())


def test_request_timeout_may_lower_the_default_only_when_allowed() -> None:
    async def body() -> None:
        h = Harness(
            "dynamic_batching { priority_levels: 2 default_priority_level: 1 "
            "priority_queue_policy { key: 1 value: { allow_timeout_override: true "
            "default_timeout_microseconds: 60000000 } } "
            "priority_queue_policy { key: 2 value: { default_timeout_microseconds: 60000000 } } }"
        )
        first, call = await _start_blocked(h)
        allowed = h.batcher.submit(request(1, priority=1, timeout_us=1000))
        with pytest.raises(RequestTimeoutError):
            await allowed  # its own 1 ms applied (the level default is 60 s)
        ignored = h.batcher.submit(request(2, priority=2, timeout_us=1000))
        h.clock.advance(2_000_000)  # its requested 1 ms has passed, by the batcher's clock
        call.release()
        batch = await h.runner.next_call()
        assert batch.column() == [2]  # still queued: level 2 may not override
        batch.release()
        await asyncio.gather(first, ignored)
        await h.close()

    run(body())


def test_timeout_delay_moves_expired_requests_behind_live_ones() -> None:
    async def body() -> None:
        h = Harness(
            "dynamic_batching { default_queue_policy { timeout_action: DELAY "
            "allow_timeout_override: true } }",
            model=spec(max_batch_size=1),
        )
        first, call = await _start_blocked(h)
        expiring = h.batcher.submit(request(1, timeout_us=1000))
        patient = [h.batcher.submit(request(i)) for i in (2, 3)]
        h.clock.advance(2_000_000)  # 1 ms has passed, by the batcher's clock
        call.release()
        seen = []
        for _ in range(3):
            batch = await h.runner.next_call()
            seen.extend(batch.column())
            batch.release()
        assert seen == [2, 3, 1]  # delayed, not rejected
        await asyncio.gather(first, expiring, *patient)
        await h.close()

    run(body())


def test_cancelled_request_leaves_the_queue_and_is_not_executed() -> None:
    async def body() -> None:
        h = Harness("dynamic_batching { }")
        first, call = await _start_blocked(h)
        gone = h.batcher.submit(request(1))
        kept = h.batcher.submit(request(2))
        gone.cancel()
        await asyncio.sleep(0)  # let the loop run the cancellation callback
        call.release()
        batch = await h.runner.next_call()
        assert batch.column() == [2]
        batch.release()
        await asyncio.gather(first, kept)
        with pytest.raises(asyncio.CancelledError):
            await gone
        await h.close()
        snap = h.stats.snapshot()
        assert (snap.inference_count, snap.fail.count) == (2, 1)

    run(body())


def test_execution_error_fails_the_whole_batch_and_the_batcher_goes_on() -> None:
    async def body() -> None:
        h = Harness("dynamic_batching { }")
        first, call = await _start_blocked(h)
        doomed = [h.batcher.submit(request(i)) for i in (1, 2)]
        call.release()
        batch = await h.runner.next_call()
        batch.release(RuntimeError("boom"))
        for future in doomed:
            with pytest.raises(ExecutionError, match="boom"):
                await future
        after = h.batcher.submit(request(3))
        call = await h.runner.next_call()
        call.release()
        await asyncio.gather(first, after)
        await h.close()
        snap = h.stats.snapshot()
        assert (snap.inference_count, snap.fail.count, snap.execution_count) == (2, 2, 3)

    run(body())


def test_different_requested_outputs_share_a_batch() -> None:
    async def body() -> None:
        extra = TensorSpec("z", "FP32", (1,))
        h = Harness("dynamic_batching { }", model=spec(extra_inputs=[extra]))
        z = np.ones((1, 1), dtype=np.float32)
        first = h.batcher.submit(request(0, z=z))
        call = await h.runner.next_call()
        only_y = h.batcher.submit(request(1, z=z, outputs=("y",)))
        only_z = h.batcher.submit(request(2, z=z, outputs=("z_out",)))
        call.release()
        batch = await h.runner.next_call()
        assert batch.column() == [1, 2] and sorted(batch.output_names) == ["y", "z_out"]
        batch.release()
        ry, rz = await asyncio.gather(only_y, only_z)
        assert list(ry) == ["y"] and list(rz) == ["z_out"]
        await first
        await h.close()

    run(body())


def _ordering_case(preserve: bool) -> list[str]:
    async def body() -> list[str]:
        text = "dynamic_batching { preserve_ordering: true }" if preserve else "dynamic_batching {}"
        h = Harness(text, slots=2)
        done: list[str] = []
        a = h.batcher.submit(request(1))
        call_a = await h.runner.next_call()
        b = h.batcher.submit(request(2))
        call_b = await h.runner.next_call()
        a.add_done_callback(lambda _: done.append("a"))
        b.add_done_callback(lambda _: done.append("b"))
        call_b.release()  # the later request finishes first
        # Wait until b's execution has been recorded, then give the loop a few turns.
        while h.stats.snapshot().inference_count < 1:
            await asyncio.sleep(0.001)
        for _ in range(5):
            await asyncio.sleep(0)
        b_done_before_a = b.done()
        call_a.release()
        await asyncio.gather(a, b)
        await h.close()
        done.append(f"b_first={b_done_before_a}")
        return done

    return run(body())  # type: ignore[no-any-return]


def test_preserve_ordering_releases_in_arrival_order() -> None:
    assert _ordering_case(preserve=True) == ["a", "b", "b_first=False"]
    # Control: without the option the later request is answered as soon as it is done.
    assert _ordering_case(preserve=False) == ["b", "a", "b_first=True"]


def test_preserve_ordering_cancel_still_drops_the_request() -> None:
    async def body() -> None:
        h = Harness("dynamic_batching { preserve_ordering: true }")
        first, call = await _start_blocked(h)
        gone = h.batcher.submit(request(1))
        kept = h.batcher.submit(request(2))
        gone.cancel()
        await asyncio.sleep(0)
        call.release()
        batch = await h.runner.next_call()
        assert batch.column() == [2]
        batch.release()
        await asyncio.gather(first, kept)
        await h.close()

    run(body())


def test_two_slots_run_two_batches_at_once() -> None:
    async def body() -> None:
        h = Harness("dynamic_batching { }", slots=2)
        a = h.batcher.submit(request(1))
        call_a = await h.runner.next_call()
        b = h.batcher.submit(request(2))
        call_b = await h.runner.next_call()  # arrives while call_a is still blocked
        assert {call_a.slot, call_b.slot} == {0, 1}
        call_a.release()
        call_b.release()
        await asyncio.gather(a, b)
        await h.close()

    run(body())


def test_close_drains_accepted_requests_and_refuses_new_ones() -> None:
    async def body() -> None:
        h = Harness("dynamic_batching { max_queue_delay_microseconds: 60000000 }")
        futures = [h.batcher.submit(request(i)) for i in (1, 2)]
        await h.close()
        await asyncio.gather(*futures)
        with pytest.raises(ModelNotReadyError):
            h.batcher.submit(request(3))

    run(body())


def test_cancelled_request_frees_its_queue_place_at_once() -> None:
    async def body() -> None:
        h = Harness("dynamic_batching { default_queue_policy { max_queue_size: 1 } }")
        first, call = await _start_blocked(h)
        gone = h.batcher.submit(request(1))
        gone.cancel()
        await asyncio.sleep(0)  # let the loop run the cancellation callback
        kept = h.batcher.submit(request(2))  # would be "Exceeds maximum queue size" otherwise
        call.release()
        batch = await h.runner.next_call()
        assert batch.column() == [2]
        batch.release()
        await asyncio.gather(first, kept)
        await h.close()
        assert h.stats.snapshot().fail.count == 1  # counted once, as cancelled

    run(body())
