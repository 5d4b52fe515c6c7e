"""DynamicBatcher's inline execution: a tiny model's batches run on the event loop itself while the
model is idle, batching what arrives in the same loop iteration, and never beside a worker.

The runner here answers at once (a gated one would block the loop). Tests of the fast path give the
batcher a limit no run can reach on a loaded machine (1 s); the slow model sleeps past a small one:
both are bounds, not races."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np

from pipeserve.batching.dynamic import DynamicBatcher
from pipeserve.errors import RequestCancelledError
from pipeserve.statistics import ModelStats
from tests.unit.batching_fakes import policy, request, run, spec

NEVER_SLOW_NS = 1_000_000_000


class ImmediateRunner:
    """y = x * 2 at once; records where each batch ran and checks no two ever overlap."""

    def __init__(self, inline_safe: bool = True) -> None:
        self.slot_count = 1
        self.inline_safe = inline_safe
        self.sleep_s = 0.0
        self.batches: list[tuple[bool, list[float]]] = []  # (ran on the loop thread, ids)
        self._active = 0
        self._lock = threading.Lock()

    def run(
        self, slot: int, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        with self._lock:
            self._active += 1
            assert self._active == 1, "two batches ran at once on a one-slot model"
        try:
            x = np.asarray(inputs["x"])
            on_loop = threading.current_thread() is threading.main_thread()
            self.batches.append((on_loop, [float(v) for v in x[:, 0]]))
            if self.sleep_s:
                time.sleep(self.sleep_s)
            return {"y": x * 2}
        finally:
            with self._lock:
                self._active -= 1

    def close(self) -> None:
        pass


def _batcher(
    text: str = "dynamic_batching { }", inline_safe: bool = True, limit_ns: int = NEVER_SLOW_NS
) -> tuple[DynamicBatcher, ImmediateRunner, ModelStats]:
    runner = ImmediateRunner(inline_safe)
    stats = ModelStats()
    batcher = DynamicBatcher(spec(), runner, stats, policy(text), inline_max_ns=limit_ns)
    return batcher, runner, stats


async def _measured(batcher: DynamicBatcher) -> None:
    """The first batch runs on a worker: nothing is known about the model before it."""
    np.testing.assert_array_equal((await batcher.submit(request(-1)))["y"][0], [-2, 0])


def test_a_tiny_model_runs_what_arrives_together_as_one_batch_on_the_loop() -> None:
    async def body() -> None:
        batcher, runner, stats = _batcher()
        await _measured(batcher)
        assert runner.batches == [(False, [-1.0])]
        futures = [batcher.submit(request(i)) for i in range(5)]  # one loop iteration
        results = await asyncio.gather(*futures)
        assert runner.batches[1:] == [(True, [0.0, 1.0, 2.0, 3.0, 4.0])]
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result["y"], request(i).inputs["x"] * 2)
        snap = stats.snapshot()
        assert (snap.inference_count, snap.execution_count) == (6, 2)
        await batcher.close()

    run(body())


def test_more_than_max_batch_size_at_once_runs_as_several_batches_in_order() -> None:
    async def body() -> None:
        batcher, runner, _ = _batcher()  # max_batch_size 8
        await _measured(batcher)
        await asyncio.gather(*[batcher.submit(request(i)) for i in range(11)])
        assert runner.batches[1:] == [
            (True, [float(i) for i in range(8)]),
            (True, [8.0, 9.0, 10.0]),
        ]
        await batcher.close()

    run(body())


def test_a_model_slower_than_the_limit_stays_on_its_worker() -> None:
    async def body() -> None:
        batcher, runner, _ = _batcher(limit_ns=2_000_000)
        runner.sleep_s = 0.005  # every run holds the slot >= 5 ms, over the 2 ms limit
        await _measured(batcher)
        await asyncio.gather(*[batcher.submit(request(i)) for i in range(3)])
        assert all(not on_loop for on_loop, _ in runner.batches), runner.batches
        await batcher.close()

    run(body())


def test_policies_with_waiting_priorities_or_timeouts_and_unsafe_runners_never_inline() -> None:
    cases = [
        ("dynamic_batching { max_queue_delay_microseconds: 100 }", True),
        ("dynamic_batching { priority_levels: 2 default_priority_level: 1 }", True),
        ("dynamic_batching { default_queue_policy { default_timeout_microseconds: 5000000 } }",
         True),
        ("dynamic_batching { preserve_ordering: true }", True),
        ("dynamic_batching { }", False),
    ]  # fmt: skip

    async def body(text: str, inline_safe: bool) -> None:
        batcher, runner, _ = _batcher(text, inline_safe)
        for _ in range(3):
            await asyncio.gather(*[batcher.submit(request(i)) for i in range(3)])
        assert all(not on_loop for on_loop, _ in runner.batches), (text, runner.batches)
        await batcher.close()

    for text, inline_safe in cases:
        run(body(text, inline_safe))


def test_a_request_cancelled_before_its_turn_is_not_run_and_counted_cancelled() -> None:
    async def body() -> None:
        batcher, runner, stats = _batcher()
        await _measured(batcher)
        gone, kept = batcher.submit(request(1)), batcher.submit(request(2))
        gone.cancel()
        await kept
        assert runner.batches[1:] == [(True, [2.0])]
        assert stats.snapshot().fail.count == 1
        await batcher.close()

    run(body())


def test_close_answers_requests_accepted_for_the_next_loop_turn() -> None:
    async def body() -> None:
        batcher, runner, _ = _batcher()
        await _measured(batcher)
        futures = [batcher.submit(request(i)) for i in range(3)]
        await batcher.close()
        assert [f.result()["y"][0, 0] for f in futures] == [0.0, 2.0, 4.0]

    run(body())


def test_loop_and_worker_batches_never_overlap_under_mixed_arrivals() -> None:
    """Groups of requests arrive across loop turns while worker batches run: the runner asserts
    that no two batches ever run at once, and every request is answered with its own rows."""

    async def body() -> None:
        batcher, runner, stats = _batcher()
        rng = np.random.default_rng(0)
        futures: list[tuple[int, asyncio.Future]] = []
        ident = 0
        for _ in range(60):
            for _ in range(int(rng.integers(1, 6))):
                futures.append((ident, batcher.submit(request(ident))))
                ident += 1
            if rng.integers(0, 3) == 0:  # the model goes idle: the next group may run inline
                await asyncio.gather(*(f for _, f in futures))
            for _ in range(int(rng.integers(0, 3))):
                await asyncio.sleep(0)
        for i, future in futures:
            assert (await future)["y"][0, 0] == i * 2
        on_loop = sum(1 for inline, _ in runner.batches if inline)
        assert 0 < on_loop < len(runner.batches)  # both paths were taken
        assert stats.snapshot().inference_count == ident
        await batcher.close()

    run(body())


def test_a_failed_inline_batch_answers_each_request_with_the_error() -> None:
    async def body() -> None:
        batcher, runner, _ = _batcher()
        await _measured(batcher)

        def broken(*_: object) -> dict[str, np.ndarray]:
            raise RuntimeError("kernel failed")

        runner.run = broken  # type: ignore[method-assign]
        futures = [batcher.submit(request(i)) for i in range(2)]
        for f in futures:
            try:
                await f
            except Exception as exc:
                assert "kernel failed" in str(exc) and not isinstance(exc, RequestCancelledError)
            else:
                raise AssertionError("a failed batch answered OK")
        await batcher.close()

    run(body())


def test_a_model_with_a_variable_dimension_never_runs_on_the_loop() -> None:
    """Without batching nothing groups shapes, and one large request could hold the loop."""

    async def body() -> None:
        runner = ImmediateRunner()
        model = spec(dims=(1, -1), max_batch_size=0)
        batcher = DynamicBatcher(
            model, runner, ModelStats(), policy("dynamic_batching { }", model),
            inline_max_ns=NEVER_SLOW_NS,
        )  # fmt: skip
        for i in range(3):
            req = request(i, width=1 + i)  # [1, 1 + i]: every request its own size
            assert (await batcher.submit(req))["y"][0, 0] == 2 * i
        assert runner.batches and all(not on_loop for on_loop, _ in runner.batches)
        await batcher.close()

    run(body())
