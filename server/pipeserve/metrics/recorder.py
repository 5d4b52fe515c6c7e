"""Prometheus metrics: Triton's series, named, labelled and typed exactly as Triton exposes them,
plus the latency histograms, batch-size histogram and pipeline-stage series Triton lacks.

Shape:
- `ServerMetrics` is one collector registered on an injected `CollectorRegistry` (never the global
  one). The registry calls `collect()` at scrape time; that is the only place families, label dicts
  and floats are built.
- `ModelMetrics` is bound once per model version at load and handed to the scheduler as its
  `InferenceObserver`. The request path only adds ints under one uncontended lock: no label lookup,
  no float conversion, no allocation. Histograms are per-bucket int counts of nanoseconds, made
  cumulative at scrape time; a histogram's sum is the same int that feeds Triton's cumulative
  microsecond counter, so each duration is stored once.

Why not prometheus_client's Counter/Histogram children: prometheus_client always exposes a counter
as `<name>_total`, while Triton's counters carry no suffix and existing dashboards query
`nv_inference_request_success`; and each child takes its own lock, about a dozen per request.
Triton-style counters are `TritonCounterFamily`, which `pipeserve.metrics.http.render_metrics`
writes without the suffix.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from pipeserve.metrics.cpu import CpuCollector
from pipeserve.metrics.gpu import GpuCollector
from pipeserve.observers import ExecutionTimings
from pipeserve.statistics import ModelStats

# Latency bucket upper bounds in nanoseconds: 10 us .. 60 s on a 1-2.5-5 ladder, so that p50/p95/p99
# interpolate within 2.5x anywhere from a tiny CPU model to a multi-second pipeline.
LATENCY_BOUNDS_NS: tuple[int, ...] = tuple(
    int(us * 1_000)
    for us in (
        10, 25, 50, 100, 250, 500,
        1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
        1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
    )
)  # fmt: skip
BATCH_BOUNDS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Bucket label values, formatted once rather than at every scrape.
_LATENCY_LE = (*(floatToGoString(ns / 1e9) for ns in LATENCY_BOUNDS_NS), "+Inf")
_BATCH_LE = (*(floatToGoString(b) for b in BATCH_BOUNDS), "+Inf")

# Triton's failure reasons, in the order its counters are kept. Anything else is counted as OTHER
# so a new error class can never add a label value (cardinality stays bounded).
FAILURE_REASONS: tuple[str, ...] = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
_REASON_INDEX = {reason: i for i, reason in enumerate(FAILURE_REASONS)}
_OTHER = _REASON_INDEX["OTHER"]

_MODEL_LABELS = ("model", "version")
_STAGE_LABELS = ("model", "version", "stage", "device")

# (name, help) of Triton's per-model counters, in Triton's exposition order. Help texts are
# Triton's own, so a diff of the two servers' /metrics shows only values.
_TRITON_COUNTERS: tuple[tuple[str, str], ...] = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)"),
    (
        "nv_inference_exec_count",
        "Number of model executions performed (does not include cached requests)",
    ),
    (
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds (includes cached requests)",
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds (does not include cached requests)",
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds (does not include cached "
        "requests)",
    ),
)
_PENDING_HELP = "Instantaneous number of pending requests awaiting execution per-model."
_LOAD_HELP = "Model load time in seconds"


class TritonCounterFamily(Metric):
    """A counter exposed under its bare name, as Triton does (`nv_inference_count`, no `_total`).

    prometheus_client's own text writer would rename it; `render_metrics` writes it as is."""

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(name, documentation, "counter")

    def add(self, labels: dict[str, str], value: int) -> None:
        self.add_sample(self.name, labels, value)


class Labels(dict[str, str]):
    """A label dict that carries its exposition text (`k="v",...`, sorted, escaped), made once at
    bind time; `render_metrics` writes it without formatting labels again."""

    __slots__ = ("text",)

    def __init__(self, labels: dict[str, str]) -> None:
        super().__init__(labels)
        self.text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sorted(labels.items()))


def escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


@dataclass(frozen=True, slots=True)
class LabelSets:
    """The label dicts of one model version's (or stage's) samples, built once at bind and reused
    by every scrape, so a scrape allocates no label dicts. Readers must not mutate them."""

    base: Labels
    latency_le: tuple[Labels, ...]  # base + le, one per latency bucket, "+Inf" last
    batch_le: tuple[Labels, ...] = ()
    by_reason: tuple[Labels, ...] = ()  # base + reason, in FAILURE_REASONS order

    @classmethod
    def for_model(cls, name: str, version: int) -> LabelSets:
        base = {"model": name, "version": str(version)}
        return cls(
            Labels(base),
            tuple(Labels({**base, "le": le}) for le in _LATENCY_LE),
            tuple(Labels({**base, "le": le}) for le in _BATCH_LE),
            tuple(Labels({**base, "reason": reason}) for reason in FAILURE_REASONS),
        )

    @classmethod
    def for_stage(cls, model: dict[str, str], stage: int, device: str) -> LabelSets:
        base = {**model, "stage": str(stage), "device": device}
        return cls(Labels(base), tuple(Labels({**base, "le": le}) for le in _LATENCY_LE))


@dataclass(frozen=True, slots=True)
class Histogram:
    """A point-in-time copy of one histogram: per-bucket counts (last is +Inf) and the sum."""

    counts: tuple[int, ...]
    total: int

    @property
    def count(self) -> int:
        return sum(self.counts)


class StageMetrics:
    """One pipeline stage on one device. Called from that stage's thread only, but the lock keeps
    it correct if an executor ever shares a stage between threads."""

    __slots__ = (
        "stage", "device", "labels", "_lock",
        "_compute", "_compute_ns", "_transfer", "_transfer_ns",
    )  # fmt: skip

    def __init__(self, stage: int, device: str, model_labels: dict[str, str]) -> None:
        self.stage = stage
        self.device = device
        self.labels = LabelSets.for_stage(model_labels, stage, device)
        self._lock = threading.Lock()
        self._compute = [0] * (len(LATENCY_BOUNDS_NS) + 1)
        self._compute_ns = 0
        self._transfer = [0] * (len(LATENCY_BOUNDS_NS) + 1)
        self._transfer_ns = 0

    def observe(self, compute_ns: int, transfer_ns: int) -> None:
        """One micro-batch went through this stage: `compute_ns` running the stage's session,
        `transfer_ns` moving its input activations onto this stage's device."""
        ci = bisect_left(LATENCY_BOUNDS_NS, compute_ns)
        ti = bisect_left(LATENCY_BOUNDS_NS, transfer_ns)
        with self._lock:
            self._compute[ci] += 1
            self._compute_ns += compute_ns
            self._transfer[ti] += 1
            self._transfer_ns += transfer_ns

    def snapshot(self) -> tuple[Histogram, Histogram]:
        with self._lock:
            return (
                Histogram(tuple(self._compute), self._compute_ns),
                Histogram(tuple(self._transfer), self._transfer_ns),
            )


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """Everything one model version has recorded, copied under its lock."""

    success: int
    failure: tuple[int, ...]  # by FAILURE_REASONS
    inference_count: int
    exec_count: int
    request: Histogram  # per successful request; total is Triton's request duration
    queue: Histogram  # per successful request
    compute_input_ns: int  # per request, each charged its batch's time (Triton's semantics)
    compute_infer_ns: int
    compute_output_ns: int
    compute: Histogram  # per execution: input + infer + output
    batch_size: Histogram  # per execution
    pending: int
    load_seconds: float | None


class ModelMetrics(ModelStats):
    """The one recorder of a loaded model version (an `InferenceObserver`): ModelStats' counts,
    which the ModelStatistics RPC reads, plus what only Prometheus needs: failures by reason,
    latency and batch-size histograms, pending requests, load time, pipeline stages. Triton's
    counters and the histograms' sums are read from the shared counts, so each is kept once.

    Thread-safe: called from scheduler workers and the event loop. Each call takes one lock once.
    """

    def __init__(self, name: str, version: int) -> None:
        super().__init__()
        self.name = name
        self.version = version
        self.labels = LabelSets.for_model(name, version)
        self._failure = [0] * len(FAILURE_REASONS)
        self._request_buckets = [0] * (len(LATENCY_BOUNDS_NS) + 1)
        self._queue_buckets = [0] * (len(LATENCY_BOUNDS_NS) + 1)
        self._compute_buckets = [0] * (len(LATENCY_BOUNDS_NS) + 1)
        self._batch_buckets = [0] * (len(BATCH_BOUNDS) + 1)
        self._pending = 0
        self._load_seconds: float | None = None
        # Written under _lock (rarely: once per stage); read without it on the pipeline's hot
        # path, which is safe because a dict is replaced, never mutated, once published.
        self._stages: dict[tuple[int, str], StageMetrics] = {}

    # -- InferenceObserver -------------------------------------------------------------------

    def requests_succeeded(
        self, execution: ExecutionTimings, requests: Sequence[tuple[int, int, int]]
    ) -> None:
        slots = [
            (bisect_left(LATENCY_BOUNDS_NS, total_ns), bisect_left(LATENCY_BOUNDS_NS, queue_ns))
            for _, total_ns, queue_ns in requests
        ]
        now_ms = time.time_ns() // 1_000_000  # ModelStatistics' last_inference: a timestamp
        with self._lock:
            self._count_success(now_ms, execution, requests)
            request_buckets, queue_buckets = self._request_buckets, self._queue_buckets
            for ri, qi in slots:
                request_buckets[ri] += 1
                queue_buckets[qi] += 1

    def request_failed(self, reason: str, total_ns: int) -> None:
        index = _REASON_INDEX.get(reason, _OTHER)
        with self._lock:
            self._fail.add(total_ns)
            self._failure[index] += 1

    def execution_done(self, execution: ExecutionTimings) -> None:
        compute_ns = (
            execution.compute_input_ns + execution.compute_infer_ns + execution.compute_output_ns
        )
        ci = bisect_left(LATENCY_BOUNDS_NS, compute_ns)
        bi = bisect_left(BATCH_BOUNDS, execution.batch_size)
        with self._lock:
            self._count_execution(execution)
            self._compute_buckets[ci] += 1
            self._batch_buckets[bi] += 1

    def pending_changed(self, delta: int) -> None:
        with self._lock:
            self._pending += delta

    # -- pipeline stages ---------------------------------------------------------------------

    def bind_stages(self, stages: Iterable[tuple[int, str]]) -> list[StageMetrics]:
        """Create the series of each (stage index, device) now, so they show zeros before the
        first request; returns their recorders in the given order."""
        return [self.stage(stage, device) for stage, device in stages]

    def stage(self, stage: int, device: str) -> StageMetrics:
        """The recorder of one stage, created on first use; hold it to skip even the dict get."""
        key = (stage, device)
        found = self._stages.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._stages.get(key)
            if found is None:
                found = StageMetrics(stage, device, self.labels.base)
                self._stages = {**self._stages, key: found}
            return found

    def stage_done(self, stage: int, device: str, compute_ns: int, transfer_ns: int) -> None:
        """One micro-batch finished `stage` on `device` (see StageMetrics.observe)."""
        recorder = self._stages.get((stage, device)) or self.stage(stage, device)
        recorder.observe(compute_ns, transfer_ns)

    # -- read side ---------------------------------------------------------------------------

    def set_load_seconds(self, seconds: float) -> None:
        with self._lock:
            self._load_seconds = seconds

    def snapshot(self) -> ModelSnapshot:  # type: ignore[override]
        """The Prometheus view (the ModelStatistics view is `statistics()`)."""
        with self._lock:
            per_size = self._batch.items()
            return ModelSnapshot(
                success=self._success.count,
                failure=tuple(self._failure),
                inference_count=self._inference_count,
                exec_count=self._execution_count,
                request=Histogram(tuple(self._request_buckets), self._success.ns),
                queue=Histogram(tuple(self._queue_buckets), self._queue.ns),
                compute_input_ns=self._compute_input.ns,
                compute_infer_ns=self._compute_infer.ns,
                compute_output_ns=self._compute_output.ns,
                compute=Histogram(
                    tuple(self._compute_buckets),
                    sum(
                        b.compute_input.ns + b.compute_infer.ns + b.compute_output.ns
                        for _, b in per_size
                    ),
                ),
                batch_size=Histogram(
                    tuple(self._batch_buckets),
                    sum(size * b.compute_infer.count for size, b in per_size),
                ),
                pending=self._pending,
                load_seconds=self._load_seconds,
            )

    def stage_snapshots(self) -> list[tuple[StageMetrics, Histogram, Histogram]]:
        return [(s, *s.snapshot()) for _, s in sorted(self._stages.items())]


class ServerMetrics:
    """Owns every bound model version's recorder and exposes them on `registry`.

    Registers on `registry`: itself (model series), prometheus_client's ProcessCollector (CPU
    seconds, resident memory, open fds), the host's CPU and memory (CpuCollector, where /proc is
    readable) and, where NVML finds a GPU, a GpuCollector.

    Binding a version that is already bound (a reload of the same version, whose new copy loads
    while the old one serves) returns the same recorder, so its counters run on without a reset;
    `unbind_model` at unload removes the version's series whoever bound it.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        process_metrics: bool = True,
        gpu_collector: GpuCollector | None = None,
        detect_gpus: bool = True,
    ) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, int], ModelMetrics] = {}
        registry.register(self)
        if process_metrics:
            ProcessCollector(registry=registry)
            cpu_collector = CpuCollector.open()
            if cpu_collector is not None:
                registry.register(cpu_collector)
        if gpu_collector is None and detect_gpus:
            gpu_collector = GpuCollector.open()
        self.gpu_collector = gpu_collector
        if gpu_collector is not None:
            registry.register(gpu_collector)

    def bind_model(self, name: str, version: int) -> ModelMetrics:
        """Create the recorder of a model version (or return the bound one); its series appear at
        once, at zero."""
        with self._lock:
            metrics = self._models.get((name, version))
            if metrics is None:
                metrics = self._models[(name, version)] = ModelMetrics(name, version)
            return metrics

    def unbind_model(self, name: str, version: int) -> None:
        """Remove every series of that version. A version that is not bound is ignored (unload
        paths may run after a failed load)."""
        with self._lock:
            self._models.pop((name, version), None)

    def observe_load(self, name: str, version: int, seconds: float) -> None:
        """Set `nv_model_load_duration_secs` of a bound model version."""
        with self._lock:
            metrics = self._models.get((name, version))
        if metrics is None:
            raise ValueError(
                f"model '{name}' version {version} is not bound: call bind_model before "
                f"observe_load"
            )
        metrics.set_load_seconds(seconds)

    def bound(self) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(self._models)

    def close(self) -> None:
        """Release NVML if it was opened."""
        if self.gpu_collector is not None:
            self.gpu_collector.close()

    # -- prometheus_client Collector ---------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        # Names only, so the registry can refuse a second collector with the same series.
        return iter(_Families().all())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            models = [m for _, m in sorted(self._models.items())]
        families = _Families()
        for m in models:
            families.add_model(m.labels, m.snapshot(), m.stage_snapshots())
        return iter(families.all())


class _Families:
    """The families of one scrape, filled model by model."""

    def __init__(self) -> None:
        self.counters = {name: TritonCounterFamily(name, text) for name, text in _TRITON_COUNTERS}
        self.pending = GaugeMetricFamily(
            "nv_inference_pending_request_count", _PENDING_HELP, labels=_MODEL_LABELS
        )
        self.load = GaugeMetricFamily(
            "nv_model_load_duration_secs", _LOAD_HELP, labels=_MODEL_LABELS
        )
        self.request = HistogramMetricFamily(
            "pipeserve_request_duration_seconds",
            "Successful request latency, arrival to response ready, per model version",
            labels=_MODEL_LABELS,
        )
        self.queue = HistogramMetricFamily(
            "pipeserve_queue_duration_seconds",
            "Time successful requests waited in the scheduler queue",
            labels=_MODEL_LABELS,
        )
        self.compute = HistogramMetricFamily(
            "pipeserve_compute_duration_seconds",
            "Time of one model execution (gather inputs, run, split outputs)",
            labels=_MODEL_LABELS,
        )
        self.batch = HistogramMetricFamily(
            "pipeserve_batch_size",
            "Batch size of each model execution (sum of its requests' batch dimensions)",
            labels=_MODEL_LABELS,
        )
        self.stage_compute = HistogramMetricFamily(
            "pipeserve_stage_compute_duration_seconds",
            "Compute time of one micro-batch in one pipeline stage",
            labels=_STAGE_LABELS,
        )
        self.stage_transfer = HistogramMetricFamily(
            "pipeserve_stage_transfer_duration_seconds",
            "Time moving one micro-batch's activations onto a pipeline stage's device",
            labels=_STAGE_LABELS,
        )
        self.stage_busy = CounterMetricFamily(
            "pipeserve_stage_busy_seconds",
            "Seconds a pipeline stage spent computing; rate() of it is the stage's utilisation",
            labels=_STAGE_LABELS,
        )

    def add_model(
        self,
        labels: LabelSets,
        s: ModelSnapshot,
        stages: list[tuple[StageMetrics, Histogram, Histogram]],
    ) -> None:
        base = labels.base
        c = self.counters
        c["nv_inference_request_success"].add(base, s.success)
        for reason_labels, n in zip(labels.by_reason, s.failure, strict=True):
            c["nv_inference_request_failure"].add(reason_labels, n)
        c["nv_inference_count"].add(base, s.inference_count)
        c["nv_inference_exec_count"].add(base, s.exec_count)
        c["nv_inference_request_duration_us"].add(base, s.request.total // 1_000)
        c["nv_inference_queue_duration_us"].add(base, s.queue.total // 1_000)
        c["nv_inference_compute_input_duration_us"].add(base, s.compute_input_ns // 1_000)
        c["nv_inference_compute_infer_duration_us"].add(base, s.compute_infer_ns // 1_000)
        c["nv_inference_compute_output_duration_us"].add(base, s.compute_output_ns // 1_000)
        self.pending.add_sample(self.pending.name, base, s.pending)
        if s.load_seconds is not None:
            self.load.add_sample(self.load.name, base, s.load_seconds)
        _add_histogram(self.request, labels.latency_le, base, s.request, 1e-9)
        _add_histogram(self.queue, labels.latency_le, base, s.queue, 1e-9)
        _add_histogram(self.compute, labels.latency_le, base, s.compute, 1e-9)
        _add_histogram(self.batch, labels.batch_le, base, s.batch_size, 1)
        for stage, compute, transfer in stages:
            sl = stage.labels
            _add_histogram(self.stage_compute, sl.latency_le, sl.base, compute, 1e-9)
            _add_histogram(self.stage_transfer, sl.latency_le, sl.base, transfer, 1e-9)
            self.stage_busy.add_sample(
                self.stage_busy.name + "_total", sl.base, compute.total / 1e9
            )

    def all(self) -> list[Metric]:
        return [
            *self.counters.values(),
            self.pending,
            self.load,
            self.request,
            self.queue,
            self.compute,
            self.batch,
            self.stage_compute,
            self.stage_transfer,
            self.stage_busy,
        ]


def _add_histogram(
    family: Metric,
    le_labels: tuple[dict[str, str], ...],
    base: dict[str, str],
    h: Histogram,
    scale: float,
) -> None:
    """Append one labelled histogram (cumulative buckets, count, sum) to `family`."""
    bucket = family.name + "_bucket"
    running = 0
    for labels, n in zip(le_labels, h.counts, strict=True):
        running += n
        family.add_sample(bucket, labels, running)
    family.add_sample(family.name + "_count", base, running)
    family.add_sample(family.name + "_sum", base, h.total * scale)
