"""The pipeline executor: micro-batches stream through stages, one thread per stage.

`run` (a scheduler worker thread, one per slot) cuts its batch into micro-batches along the first
dimension (numpy views) and puts them on stage 0's queue; stage k's thread runs micro-batch i
while stage k+1's runs i-1. Each micro-batch carries an environment of named values: the batch
slice of every graph input, then every stage's outputs; a stage reads its inputs from it and adds
its outputs, and values no later stage reads are dropped on the way. The last stage hands the
micro-batch's outputs back; `run` concatenates them in order.

`slot_count` batches may be in the pipeline at once (default: one per stage), so that while one
batch drains the next fills the stages it leaves idle.

Errors: an exception in a stage fails that micro-batch's batch only (its later micro-batches are
skipped as they arrive); other batches and the stage threads go on. Every queue is bounded: a full
queue blocks its producer (back-pressure up to the scheduler's workers). `close` sends a stop
marker behind everything queued, so work already accepted finishes first.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeserve.errors import ExecutionError, PipeserveError
from pipeserve.inference import ModelSpec
from pipeserve.partition.hints import PROFILED_UNIT
from pipeserve.partition.partitioner import Plan, partition_model
from pipeserve.progress import LoadProgress
from pipeserve.runtime.devices import place
from pipeserve.runtime.pipeline.config import PipelineConfig, parse_pipeline_config
from pipeserve.runtime.pipeline.stage import StageRunner, to_numpy
from pipeserve.runtime.sessions import DEFAULT_SETTINGS, OrtSettings, thread_budget

log = logging.getLogger(__name__)

# on_stage(stage index, device, compute ns, transfer ns): once per micro-batch per stage, from
# that stage's thread. ModelMetrics.stage_done has this signature.
StageCallback = Callable[[int, str, int, int], None]


@dataclass(frozen=True, slots=True)
class StageStats:
    stage: int
    device: str
    micro_batches: int
    compute_ns: int  # running the stage's session
    queue_wait_ns: int  # micro-batches waiting in this stage's input queue
    transfer_ns: int  # binding / copying inputs to the device
    utilisation: float  # compute_ns / time since the pipeline started


@dataclass(frozen=True, slots=True)
class PipelineStats:
    stages: tuple[StageStats, ...]
    batches: int
    micro_batches: int
    # 1 - busy / (stages x span), summed over batches: the idle share of the stage-time each
    # batch occupied. Theory for m equal micro-batches and p equal stages: (p-1)/(m+p-1).
    bubble_fraction: float


class _Batch:
    """One `run` call in flight. Results are written by the last stage's thread; `error` by
    whichever stage fails first (later writers see it set and skip)."""

    __slots__ = (
        "results",
        "remaining",
        "error",
        "done",
        "lock",
        "first_ns",
        "last_ns",
        "busy_ns",
    )

    def __init__(self, micro_batches: int) -> None:
        self.results: list[dict[str, Any] | None] = [None] * micro_batches
        self.remaining = micro_batches
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.first_ns = 0
        self.last_ns = 0
        self.busy_ns = 0

    def record(self, start_ns: int, end_ns: int) -> None:
        with self.lock:
            if self.first_ns == 0 or start_ns < self.first_ns:
                self.first_ns = start_ns
            self.last_ns = max(self.last_ns, end_ns)
            self.busy_ns += end_ns - start_ns

    def finish(
        self, index: int, result: dict[str, Any] | None, error: BaseException | None
    ) -> bool:
        """One micro-batch left the pipeline; True when it was the batch's last."""
        with self.lock:
            if error is not None and self.error is None:
                self.error = error
            if result is not None:
                self.results[index] = result
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.done.set()
        return last


_Item = tuple[_Batch, int, dict[str, Any], int]  # batch, micro-batch index, env, enqueued ns
_STOP = None


class _StageCounters:
    """Written by one stage thread only; read (racily, ints) by stage_stats()."""

    __slots__ = ("micro_batches", "compute_ns", "queue_wait_ns", "transfer_ns")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.micro_batches = 0
        self.compute_ns = 0
        self.queue_wait_ns = 0
        self.transfer_ns = 0


class PipelineRunner:
    """A ModelRunner (see batching.base) over stage runners, in order."""

    def __init__(
        self,
        stages: Sequence[StageRunner],
        graph_outputs: Sequence[str],
        *,
        micro_batch_size: int | None = None,
        batching: bool = True,
        in_flight: int | None = None,
        queue_capacity: int | None = None,
        on_stage: StageCallback | None = None,
        model_name: str = "",
    ) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self._stages = list(stages)
        self._graph_outputs = tuple(graph_outputs)
        self._micro = micro_batch_size
        self._batching = batching
        self._slots = in_flight or len(stages)
        self._on_stage = on_stage
        self._name = model_name
        # keep[k]: values a micro-batch still needs after stage k (later inputs, graph outputs).
        self._keep: list[frozenset[str]] = []
        for k in range(len(stages)):
            later = {n for s in stages[k + 1 :] for n in s.inputs}
            self._keep.append(frozenset(later | set(graph_outputs)))
        capacity = queue_capacity or max(2, 2 * self._slots)
        self._queues: list[queue.Queue[_Item | None]] = [
            queue.Queue(maxsize=capacity) for _ in stages
        ]
        self._counters = [_StageCounters() for _ in stages]
        self._stats_lock = threading.Lock()
        self._batches = 0
        self._micro_batches = 0
        self._span_ns = 0  # sum over batches of stages x span
        self._busy_ns = 0
        self._started_ns = time.monotonic_ns()
        self._closed = False
        self._admit_lock = threading.Lock()
        self._threads = [
            threading.Thread(
                target=self._stage_loop, args=(k,), name=f"{model_name}-stage{k}", daemon=True
            )
            for k in range(len(stages))
        ]
        for thread in self._threads:
            thread.start()

    @property
    def slot_count(self) -> int:
        return self._slots

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(str(s.device) for s in self._stages)

    def run(
        self, slot: int, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        wanted = list(output_names) or list(self._graph_outputs)
        bounds = self._micro_bounds(inputs)
        batch = _Batch(len(bounds))
        # Under the lock a batch is queued whole, before or after the stop marker, never across.
        with self._admit_lock:
            if self._closed:
                raise ExecutionError(f"pipeline of model '{self._name}' is closed")
            for index, (start, end) in enumerate(bounds):
                if len(bounds) == 1:
                    env: dict[str, Any] = dict(inputs)
                else:
                    env = {name: array[start:end] for name, array in inputs.items()}
                self._queues[0].put((batch, index, env, time.monotonic_ns()))
        batch.done.wait()
        with self._stats_lock:
            self._batches += 1
            self._micro_batches += len(bounds)
            if batch.last_ns > batch.first_ns:
                self._span_ns += len(self._stages) * (batch.last_ns - batch.first_ns)
                self._busy_ns += batch.busy_ns
        if batch.error is not None:
            raise batch.error
        results = [r for r in batch.results if r is not None]
        if len(results) == 1:
            return {name: to_numpy(results[0][name]) for name in wanted}
        return {name: np.concatenate([to_numpy(r[name]) for r in results]) for name in wanted}

    def _micro_bounds(self, inputs: Mapping[str, np.ndarray]) -> list[tuple[int, int]]:
        first = next(iter(inputs.values()), None)
        if not self._batching or first is None or first.ndim == 0:
            return [(0, 0)]
        rows = int(first.shape[0])
        size = self._micro or -(-rows // len(self._stages))
        if size >= rows:
            return [(0, rows)]
        return [(start, min(start + size, rows)) for start in range(0, rows, size)]

    def _stage_loop(self, k: int) -> None:
        stage = self._stages[k]
        inbox = self._queues[k]
        outbox = self._queues[k + 1] if k + 1 < len(self._stages) else None
        counters = self._counters[k]
        keep = self._keep[k]
        device = str(stage.device)
        while True:
            item = inbox.get()
            if item is _STOP:
                if outbox is not None:
                    outbox.put(_STOP)
                return
            batch, index, env, queued_ns = item
            start = time.monotonic_ns()
            counters.queue_wait_ns += start - queued_ns
            if batch.error is not None:  # an earlier micro-batch failed: skip the rest
                batch.finish(index, None, None)
                continue
            try:
                outputs, compute_ns, transfer_ns = stage.run(env)
            except Exception as exc:  # fails this batch only; the stage thread goes on
                message = exc.message if isinstance(exc, PipeserveError) else str(exc)
                error = ExecutionError(
                    f"pipeline stage {k} ({device}) of model '{self._name}' failed: {message}"
                )
                batch.finish(index, None, error)
                continue
            end = time.monotonic_ns()
            batch.record(start, end)
            counters.micro_batches += 1
            counters.compute_ns += compute_ns
            counters.transfer_ns += transfer_ns
            if self._on_stage is not None:
                try:
                    self._on_stage(k, device, compute_ns, transfer_ns)
                except Exception:  # metrics must never break execution
                    log.exception("on_stage callback failed")
            env.update(outputs)
            if outbox is None:
                batch.finish(index, env, None)
                continue
            for name in [n for n in env if n not in keep]:
                del env[name]
            outbox.put((batch, index, env, time.monotonic_ns()))

    def stage_stats(self) -> PipelineStats:
        elapsed = max(1, time.monotonic_ns() - self._started_ns)
        stages = tuple(
            StageStats(
                stage=k,
                device=str(s.device),
                micro_batches=c.micro_batches,
                compute_ns=c.compute_ns,
                queue_wait_ns=c.queue_wait_ns,
                transfer_ns=c.transfer_ns,
                utilisation=min(1.0, c.compute_ns / elapsed),
            )
            for k, (s, c) in enumerate(zip(self._stages, self._counters, strict=True))
        )
        with self._stats_lock:
            bubble = 1.0 - self._busy_ns / self._span_ns if self._span_ns else 0.0
            return PipelineStats(stages, self._batches, self._micro_batches, max(0.0, bubble))

    def reset_stats(self) -> None:
        """Start a new measuring window (benchmarks call it after warm-up)."""
        with self._stats_lock:
            # In place: each stage thread holds its own counters object.
            for counters in self._counters:
                counters.reset()
            self._batches = self._micro_batches = self._span_ns = self._busy_ns = 0
            self._started_ns = time.monotonic_ns()

    def close(self) -> None:
        """Finish everything queued, stop the stage threads, release the sessions."""
        with self._admit_lock:
            if self._closed:
                return
            self._closed = True
            self._queues[0].put(_STOP)
        for thread in self._threads:
            thread.join()
        for stage in self._stages:
            stage.close()


def create_pipeline_runner(
    model_path: Path,
    parameters: Mapping[str, str],
    spec: ModelSpec,
    on_stage: StageCallback | None = None,
    settings: OrtSettings = DEFAULT_SETTINGS,
    progress: LoadProgress | None = None,
) -> PipelineRunner | None:
    """The runner for a pipelined model version, or None when `parameters` ask for no pipeline.

    Slow (partitions the graph, maybe profiles it, opens one session per stage): call off the
    event loop. Raises ConfigError for bad pipeline parameters, ModelLoadError when a stage
    cannot be loaded.
    """
    config = parse_pipeline_config(parameters)
    if config is None:
        return None
    return pipeline_runner(model_path, config, spec, on_stage, settings, progress)


def pipeline_runner(
    model_path: Path,
    config: PipelineConfig,
    spec: ModelSpec,
    on_stage: StageCallback | None = None,
    settings: OrtSettings = DEFAULT_SETTINGS,
    progress: LoadProgress | None = None,
) -> PipelineRunner:
    """Partition the model as `config` says and open its stages (see create_pipeline_runner)."""
    plan = partition_model(
        model_path,
        config.stages,
        cuts=config.cuts,
        cost=config.cost,
        batch_hint=max(1, config.micro_batch_size or 1),
    )
    return build_pipeline_runner(plan, config, spec, on_stage, settings, progress)


def build_pipeline_runner(
    plan: Plan,
    config: PipelineConfig,
    spec: ModelSpec,
    on_stage: StageCallback | None = None,
    settings: OrtSettings = DEFAULT_SETTINGS,
    progress: LoadProgress | None = None,
) -> PipelineRunner:
    """Open a session per stage of `plan` on the configured devices and start the threads."""
    runners: list[StageRunner] = []
    devices = place(config.devices, f"model '{spec.name}' pipeline stages")
    cpu_stages = sum(1 for d in devices if d.kind == "cpu")
    # threads_per_stage was split over the requested CPU stages: it stands unless stages moved.
    keep = config.threads_given or devices == config.devices
    try:
        for stage, device in zip(plan.stages, devices, strict=True):
            given = config.threads_per_stage if device.kind == "cpu" and keep else None
            threads = thread_budget(device, cpu_stages, given).intra_op
            runners.append(
                StageRunner(
                    stage, device, plan.base_dir, threads, model_name=spec.name, settings=settings
                )
            )
            if progress is not None:
                progress.step("stage", stage.index + 1, len(plan.stages), f"on {device}")
    except BaseException:
        for runner in runners:
            runner.close()
        raise
    log.info(
        "model '%s' v%d: %d pipeline stages on %s, %s; cut by %s%s",
        spec.name,
        spec.version,
        len(runners),
        ", ".join(str(r.device) for r in runners),
        "; ".join(
            f"stage {s.index}: {len(s.nodes)} nodes, {s.weight_bytes} weight bytes"
            for s in plan.stages
        ),
        plan.cost_unit,
        # Measured costs can move the cuts from one load to the next: say how to pin them.
        ' measured at load (cuts can differ between loads; pipeline_cost "estimate" or '
        "pipeline_cuts fix them)"
        if plan.cost_unit == PROFILED_UNIT
        else "",
    )
    return PipelineRunner(
        runners,
        plan.graph_outputs,
        micro_batch_size=config.micro_batch_size,
        batching=spec.batching,
        in_flight=config.in_flight,
        on_stage=on_stage,
        model_name=spec.name,
    )
