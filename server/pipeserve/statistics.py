"""Per-model-version counters behind the ModelStatistics RPC (Triton's semantics).

- success/fail/queue/compute_* are per request: count and cumulative nanoseconds; a request in a
  batch of n is charged the whole batch's compute time, as Triton does.
- inference_count sums the batch sizes of successful requests; execution_count counts executions.
- batch_stats are keyed by executed batch size.

One recorder per model version: with metrics on, the version's recorder is
metrics.recorder.ModelMetrics, a ModelStats that also keeps what Prometheus needs besides
(failures by reason, histograms, pending, stages), so the ModelStatistics RPC and the Prometheus
families read the same counts, written under one lock per event. With metrics off it is a plain
ModelStats.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeserve.observers import ExecutionTimings


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class StatsSnapshot:
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batch_stats: dict[int, BatchStats]


class ModelStats:
    """Thread-safe; implements InferenceObserver. Read with `snapshot()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._success = Duration()
        self._fail = Duration()
        self._queue = Duration()
        self._compute_input = Duration()
        self._compute_infer = Duration()
        self._compute_output = Duration()
        self._batch: dict[int, BatchStats] = {}

    def requests_succeeded(
        self, execution: ExecutionTimings, requests: Sequence[tuple[int, int, int]]
    ) -> None:
        now_ms = time.time_ns() // 1_000_000  # wall clock on purpose: a timestamp, not a duration
        with self._lock:
            self._count_success(now_ms, execution, requests)

    def request_failed(self, reason: str, total_ns: int) -> None:
        with self._lock:
            self._fail.add(total_ns)

    def execution_done(self, execution: ExecutionTimings) -> None:
        with self._lock:
            self._count_execution(execution)

    # Callers hold self._lock (a subclass adds its own counts under the same acquisition).

    def _count_success(
        self, now_ms: int, execution: ExecutionTimings, requests: Sequence[tuple[int, int, int]]
    ) -> None:
        n = len(requests)
        items = total = queue = 0
        for batch_size, total_ns, queue_ns in requests:
            items += batch_size
            total += total_ns
            queue += queue_ns
        self._last_inference_ms = now_ms
        self._inference_count += items
        self._success.add(total, n)
        self._queue.add(queue, n)
        # Every request of the batch is counted with the batch's compute time (as Triton does).
        self._compute_input.add(execution.compute_input_ns * n, n)
        self._compute_infer.add(execution.compute_infer_ns * n, n)
        self._compute_output.add(execution.compute_output_ns * n, n)

    def _count_execution(self, execution: ExecutionTimings) -> None:
        self._execution_count += 1
        stats = self._batch.get(execution.batch_size)
        if stats is None:
            stats = self._batch[execution.batch_size] = BatchStats()
        stats.compute_input.add(execution.compute_input_ns)
        stats.compute_infer.add(execution.compute_infer_ns)
        stats.compute_output.add(execution.compute_output_ns)

    def pending_changed(self, delta: int) -> None:
        pass

    def statistics(self) -> StatsSnapshot:
        """The ModelStatistics RPC's view, copied under the lock."""
        with self._lock:
            return StatsSnapshot(
                last_inference_ms=self._last_inference_ms,
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                success=Duration(self._success.count, self._success.ns),
                fail=Duration(self._fail.count, self._fail.ns),
                queue=Duration(self._queue.count, self._queue.ns),
                compute_input=Duration(self._compute_input.count, self._compute_input.ns),
                compute_infer=Duration(self._compute_infer.count, self._compute_infer.ns),
                compute_output=Duration(self._compute_output.count, self._compute_output.ns),
                batch_stats={
                    size: BatchStats(
                        Duration(b.compute_input.count, b.compute_input.ns),
                        Duration(b.compute_infer.count, b.compute_infer.ns),
                        Duration(b.compute_output.count, b.compute_output.ns),
                    )
                    for size, b in sorted(self._batch.items())
                },
            )

    # The name the batcher's tests and benchmarks read it by; ModelMetrics redefines `snapshot`
    # as its Prometheus view, so the data plane calls `statistics()`.
    snapshot = statistics
