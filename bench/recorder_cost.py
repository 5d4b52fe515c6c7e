"""Per-request recording cost, in process: the four observer calls the scheduler makes for one
request (pending +1, execution_done, requests_succeeded, pending -1) on the recorder a served
version gets with metrics on. Before issue 11 that was FanOut(ModelStats, ModelMetrics); now it
is one ModelMetrics (a ModelStats). Point PYTHONPATH at a tree's server/ to time that tree:

    PYTHONPATH=<tree>/server .venv/bin/python bench/recorder_cost.py
"""

from __future__ import annotations

import statistics
import time

from pipeserve.observers import ExecutionTimings, FanOut
from pipeserve.statistics import ModelStats

try:
    from pipeserve.metrics.recorder import ModelMetrics
except ImportError:  # a tree from before metrics/ was a package
    from pipeserve.metrics import ModelMetrics  # type: ignore[no-redef]

ONE_RECORDER = issubclass(ModelMetrics, ModelStats)
REQUESTS = 100_000
EXECUTION = ExecutionTimings(1, 2_000, 50_000, 1_000)


def recorder() -> object:
    metrics = ModelMetrics("m", 1)
    return metrics if ONE_RECORDER else FanOut([ModelStats(), metrics])


def time_once() -> float:
    """Microseconds per request."""
    o = recorder()
    start = time.perf_counter_ns()
    for _ in range(REQUESTS):
        o.pending_changed(1)  # type: ignore[attr-defined]
        o.execution_done(EXECUTION)  # type: ignore[attr-defined]
        o.requests_succeeded(EXECUTION, [(1, 80_000, 5_000)])  # type: ignore[attr-defined]
        o.pending_changed(-1)  # type: ignore[attr-defined]
    return (time.perf_counter_ns() - start) / REQUESTS / 1000


def main() -> None:
    times = [time_once() for _ in range(7)]
    kind = "one ModelMetrics" if ONE_RECORDER else "FanOut(ModelStats, ModelMetrics)"
    print(
        f"{kind}: median {statistics.median(times):.2f} us per request "
        f"(7 timings of {REQUESTS}: {min(times):.2f}..{max(times):.2f})"
    )


if __name__ == "__main__":
    main()
