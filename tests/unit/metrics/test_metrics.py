"""ServerMetrics and ModelMetrics: Triton's series and the histograms, each on its own registry."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pipeserve.batching.direct import DirectScheduler
from pipeserve.errors import ExecutionError
from pipeserve.inference import InferRequest, ModelSpec, TensorSpec
from pipeserve.metrics.http import render_metrics
from pipeserve.metrics.recorder import (
    BATCH_BOUNDS,
    LATENCY_BOUNDS_NS,
    ModelMetrics,
    ServerMetrics,
)
from pipeserve.observers import ExecutionTimings, FanOut
from pipeserve.statistics import ModelStats

TRITON_COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)


def new_metrics(**kwargs: object) -> tuple[CollectorRegistry, ServerMetrics]:
    registry = CollectorRegistry()
    return registry, ServerMetrics(registry, detect_gpus=False, **kwargs)  # type: ignore[arg-type]


def scrape(registry: CollectorRegistry) -> dict[str, object]:
    """Parsed families by name. (prometheus_client's parser reports counter samples as
    `<name>_total` even when the exposed line has no suffix; the raw-text tests check the lines.)"""
    return {f.name: f for f in text_string_to_metric_families(render_metrics(registry).decode())}


def value(registry: CollectorRegistry, family: str, sample: str, **labels: str) -> float:
    for f in text_string_to_metric_families(render_metrics(registry).decode()):
        if f.name != family:
            continue
        for s in f.samples:
            if s.name == sample and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"no sample {sample}{labels} in family {family}")


def timings(
    batch: int, cin: int = 1_000, infer: int = 2_000_000, cout: int = 3_000
) -> ExecutionTimings:
    return ExecutionTimings(batch, cin, infer, cout)


def test_triton_counters_are_exposed_with_bare_names_and_counter_type() -> None:
    registry, metrics = new_metrics()
    m = metrics.bind_model("resnet", 3)
    execution = timings(2)
    m.execution_done(execution)
    m.requests_succeeded(execution, [(2, 3_000_000, 500_000)])
    text = render_metrics(registry).decode()

    for name in TRITON_COUNTERS:
        assert f"# TYPE {name} counter\n" in text
        assert f"{name}_total" not in text
    assert 'nv_inference_request_success{model="resnet",version="3"} 1\n' in text
    assert 'nv_inference_count{model="resnet",version="3"} 2\n' in text
    assert 'nv_inference_exec_count{model="resnet",version="3"} 1\n' in text
    assert 'nv_inference_request_duration_us{model="resnet",version="3"} 3000\n' in text
    assert 'nv_inference_queue_duration_us{model="resnet",version="3"} 500\n' in text
    assert 'nv_inference_compute_input_duration_us{model="resnet",version="3"} 1\n' in text
    assert 'nv_inference_compute_infer_duration_us{model="resnet",version="3"} 2000\n' in text
    assert 'nv_inference_compute_output_duration_us{model="resnet",version="3"} 3\n' in text
    assert "# TYPE nv_inference_pending_request_count gauge\n" in text
    # Triton's help texts, so dashboards' tooltips and diffs against Triton match.
    assert (
        "# HELP nv_inference_request_success Number of successful inference requests, "
        "all batch sizes\n" in text
    )


def test_microsecond_counters_accumulate_nanoseconds_before_rounding() -> None:
    registry, metrics = new_metrics()
    m = metrics.bind_model("m", 1)
    execution = timings(1, cin=600, infer=600, cout=600)
    for _ in range(5):  # 5 x 0.6 us: 3 us, where rounding each request would give 0
        m.requests_succeeded(execution, [(1, 600, 600)])
    text = render_metrics(registry).decode()
    assert 'nv_inference_request_duration_us{model="m",version="1"} 3\n' in text
    assert 'nv_inference_queue_duration_us{model="m",version="1"} 3\n' in text
    assert 'nv_inference_compute_infer_duration_us{model="m",version="1"} 3\n' in text


def test_each_request_of_a_batch_is_charged_the_batch_compute_time_like_triton() -> None:
    registry, metrics = new_metrics()
    m = metrics.bind_model("m", 1)
    execution = timings(3, cin=0, infer=1_000_000, cout=0)
    m.execution_done(execution)
    for _ in range(3):
        m.requests_succeeded(execution, [(1, 2_000_000, 0)])
    assert (
        value(
            registry,
            "nv_inference_compute_infer_duration_us",
            "nv_inference_compute_infer_duration_us_total",
            model="m",
            version="1",
        )
        == 3000
    )
    assert value(registry, "nv_inference_exec_count", "nv_inference_exec_count_total",
                 model="m", version="1") == 1  # fmt: skip


def test_failure_reasons_are_all_bound_at_zero_and_unknown_reasons_count_as_other() -> None:
    registry, metrics = new_metrics()
    m = metrics.bind_model("m", 1)
    text = render_metrics(registry).decode()
    for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
        assert (
            f'nv_inference_request_failure{{model="m",reason="{reason}",version="1"}} 0\n' in text
        )

    m.request_failed("REJECTED", 10)
    m.request_failed("REJECTED", 10)
    m.request_failed("CANCELED", 10)
    m.request_failed("BACKEND", 10)
    m.request_failed("SOMETHING_NEW", 10)
    text = render_metrics(registry).decode()
    assert 'nv_inference_request_failure{model="m",reason="REJECTED",version="1"} 2\n' in text
    assert 'nv_inference_request_failure{model="m",reason="CANCELED",version="1"} 1\n' in text
    assert 'nv_inference_request_failure{model="m",reason="BACKEND",version="1"} 1\n' in text
    assert 'nv_inference_request_failure{model="m",reason="OTHER",version="1"} 1\n' in text
    assert "SOMETHING_NEW" not in text
    assert 'nv_inference_request_success{model="m",version="1"} 0\n' in text


def test_latency_buckets_are_upper_inclusive_and_span_10us_to_60s() -> None:
    assert LATENCY_BOUNDS_NS[0] == 10_000
    assert LATENCY_BOUNDS_NS[-1] == 60_000_000_000
    assert list(LATENCY_BOUNDS_NS) == sorted(set(LATENCY_BOUNDS_NS))

    registry, metrics = new_metrics()
    m = metrics.bind_model("m", 1)
    execution = timings(1)
    m.requests_succeeded(execution, [(1, 1_000_000, 9_999)])  # exactly 1 ms; just under 10 us
    m.requests_succeeded(execution, [(1, 1_000_001, 10_000)])  # just over 1 ms; exactly 10 us
    m.requests_succeeded(execution, [(1, 61_000_000_000, 0)])  # beyond the last bound

    def bucket(family: str, le: str) -> float:
        return value(registry, family, family + "_bucket", model="m", version="1", le=le)

    request = "pipeserve_request_duration_seconds"
    assert bucket(request, "0.0005") == 0
    assert bucket(request, "0.001") == 1
    assert bucket(request, "0.0025") == 2
    assert bucket(request, "60.0") == 2
    assert bucket(request, "+Inf") == 3
    queue = "pipeserve_queue_duration_seconds"
    assert bucket(queue, "1e-05") == 3
    assert value(registry, request, request + "_count", model="m", version="1") == 3
    assert value(registry, request, request + "_sum", model="m", version="1") == pytest.approx(
        (1_000_000 + 1_000_001 + 61_000_000_000) / 1e9
    )


def test_one_call_for_a_batch_counts_as_one_call_per_request() -> None:
    requests = [(1, 900_000, 5_000), (2, 2_500_000, 40_000), (4, 70_000_000_000, 0)]
    execution = timings(7)
    registry_batch, metrics_batch = new_metrics()
    metrics_batch.bind_model("m", 1).requests_succeeded(execution, requests)
    registry_each, metrics_each = new_metrics()
    each = metrics_each.bind_model("m", 1)
    for request in requests:
        each.requests_succeeded(execution, [request])
    text = render_metrics(registry_batch).decode()

    def model_series(rendered: str) -> list[str]:
        # The model's series only: the process collector's (CPU seconds, memory) move between
        # the two renders.
        return [line for line in rendered.splitlines() if 'model="m"' in line]

    assert model_series(text) and model_series(text) == model_series(
        render_metrics(registry_each).decode()
    )
    assert 'nv_inference_request_success{model="m",version="1"} 3\n' in text
    assert 'nv_inference_count{model="m",version="1"} 7\n' in text
    assert 'nv_inference_compute_infer_duration_us{model="m",version="1"} 6000\n' in text


def test_compute_and_batch_size_histograms_count_executions() -> None:
    registry, metrics = new_metrics()
    m = metrics.bind_model("m", 1)
    for batch in (1, 3, 8, 5000):
        m.execution_done(timings(batch, cin=100_000, infer=200_000, cout=50_000))

    sizes = "pipeserve_batch_size"
    assert BATCH_BOUNDS[:4] == (1, 2, 4, 8)
    assert value(registry, sizes, sizes + "_bucket", model="m", version="1", le="1.0") == 1
    assert value(registry, sizes, sizes + "_bucket", model="m", version="1", le="2.0") == 1
    assert value(registry, sizes, sizes + "_bucket", model="m", version="1", le="4.0") == 2
    assert value(registry, sizes, sizes + "_bucket", model="m", version="1", le="8.0") == 3
    assert value(registry, sizes, sizes + "_bucket", model="m", version="1", le="+Inf") == 4
    assert value(registry, sizes, sizes + "_sum", model="m", version="1") == 5012
    compute = "pipeserve_compute_duration_seconds"
    # 100 + 200 + 50 us = 350 us per execution, in the 500 us bucket
    assert value(registry, compute, compute + "_bucket", model="m", version="1", le="0.00025") == 0
    assert value(registry, compute, compute + "_bucket", model="m", version="1", le="0.0005") == 4
    assert value(registry, compute, compute + "_sum", model="m", version="1") == pytest.approx(
        4 * 350e-6
    )


def test_pending_gauge_follows_deltas() -> None:
    registry, metrics = new_metrics()
    m = metrics.bind_model("m", 1)
    m.pending_changed(+1)
    m.pending_changed(+1)
    m.pending_changed(+1)
    m.pending_changed(-2)
    assert value(registry, "nv_inference_pending_request_count",
                 "nv_inference_pending_request_count", model="m", version="1") == 1  # fmt: skip


def test_unbind_removes_every_series_of_that_version_only() -> None:
    registry, metrics = new_metrics()
    metrics.bind_model("a", 1)
    metrics.bind_model("a", 2).bind_stages([(0, "cpu"), (1, "cpu")])
    metrics.observe_load("a", 2, 0.5)
    metrics.unbind_model("a", 2)
    text = render_metrics(registry).decode()
    assert 'version="2"' not in text
    assert 'nv_inference_request_success{model="a",version="1"} 0\n' in text
    assert metrics.bound() == [("a", 1)]
    metrics.unbind_model("a", 1)
    assert 'model="a"' not in render_metrics(registry).decode()
    metrics.unbind_model("a", 1)  # unloading twice (after a failed load) is harmless


def test_a_reload_of_the_same_version_keeps_counting() -> None:
    registry, metrics = new_metrics()
    old = metrics.bind_model("m", 1)
    old.request_failed("BACKEND", 1)
    new = metrics.bind_model("m", 1)  # the new copy loads while the old one serves
    assert new is old
    new.request_failed("BACKEND", 1)
    assert value(registry, "nv_inference_request_failure", "nv_inference_request_failure_total",
                 model="m", version="1", reason="BACKEND") == 2  # fmt: skip
    metrics.unbind_model("m", 1)  # unload: gone, however often it was bound
    assert 'model="m"' not in render_metrics(registry).decode()


def test_model_load_duration_gauge() -> None:
    registry, metrics = new_metrics()
    metrics.bind_model("m", 1)
    assert "nv_model_load_duration_secs{" not in render_metrics(registry).decode()
    metrics.observe_load("m", 1, 1.25)
    assert value(registry, "nv_model_load_duration_secs", "nv_model_load_duration_secs",
                 model="m", version="1") == 1.25  # fmt: skip
    with pytest.raises(ValueError, match="model 'other' version 7 is not bound"):
        metrics.observe_load("other", 7, 1.0)


def test_stage_series_bound_up_front_and_recorded() -> None:
    registry, metrics = new_metrics()
    m = metrics.bind_model("big", 1)
    s0, s1 = m.bind_stages([(0, "cuda:0"), (1, "cuda:1")])
    text = render_metrics(registry).decode()
    assert (
        'pipeserve_stage_compute_duration_seconds_count{device="cuda:1",model="big",stage="1",'
        'version="1"} 0\n' in text
    )
    s0.observe(2_000_000, 0)
    m.stage_done(1, "cuda:1", 3_000_000, 40_000)
    m.stage_done(1, "cuda:1", 3_000_000, 40_000)
    m.stage_done(2, "cpu", 1_000, 1_000)  # not bound up front: created on first use
    labels = {"model": "big", "version": "1", "stage": "1", "device": "cuda:1"}
    compute = "pipeserve_stage_compute_duration_seconds"
    transfer = "pipeserve_stage_transfer_duration_seconds"
    assert value(registry, compute, compute + "_count", **labels) == 2
    assert value(registry, compute, compute + "_sum", **labels) == pytest.approx(0.006)
    assert value(registry, transfer, transfer + "_bucket", le="5e-05", **labels) == 2
    busy = "pipeserve_stage_busy_seconds"
    assert value(registry, busy, busy + "_total", **labels) == pytest.approx(0.006)
    assert value(registry, busy, busy + "_total", model="big", version="1", stage="0",
                 device="cuda:0") == pytest.approx(0.002)  # fmt: skip
    assert value(registry, compute, compute + "_count", model="big", version="1", stage="2",
                 device="cpu") == 1  # fmt: skip
    assert m.stage(1, "cuda:1") is s1


def test_registry_is_injected_never_global() -> None:
    registry, metrics = new_metrics()
    metrics.bind_model("m", 1)
    assert all(not f.name.startswith(("nv_", "pipeserve_")) for f in REGISTRY.collect())
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        ServerMetrics(registry, process_metrics=False, detect_gpus=False)


def test_process_cpu_and_resident_memory_are_exposed() -> None:
    registry, _ = new_metrics()
    families = scrape(registry)
    assert "process_resident_memory_bytes" in families
    assert "process_cpu_seconds" in families
    registry, _ = new_metrics(process_metrics=False)
    assert "process_resident_memory_bytes" not in scrape(registry)


def test_concurrent_recording_loses_nothing() -> None:
    registry, metrics = new_metrics()
    m = metrics.bind_model("m", 1)
    execution = timings(2)
    per_thread = 5_000

    def work() -> None:
        for _ in range(per_thread):
            m.pending_changed(+1)
            m.execution_done(execution)
            m.requests_succeeded(execution, [(2, 150_000, 20_000)])
            m.pending_changed(-1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = m.snapshot()
    assert snap.success == snap.request.count == snap.queue.count == 8 * per_thread
    assert snap.exec_count == snap.compute.count == snap.batch_size.count == 8 * per_thread
    assert snap.inference_count == 2 * 8 * per_thread
    assert snap.pending == 0
    assert snap.request.total == 150_000 * 8 * per_thread


class _DoublingRunner:
    """A numpy stand-in for the runtime (one slot); fails when the input holds a negative."""

    slot_count = 1

    def run(
        self, slot: int, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if (x < 0).any():
            raise RuntimeError("negative input")
        return {"y": x * 2}

    def close(self) -> None:
        pass


def test_recorded_through_a_real_scheduler_next_to_model_stats() -> None:
    """ModelMetrics is a drop-in InferenceObserver: counts match ModelStats for the same traffic."""
    registry, metrics = new_metrics()
    spec = ModelSpec(
        "double", 1, 8, (TensorSpec("x", "FP32", (4,)),), (TensorSpec("y", "FP32", (4,)),)
    )
    prom = metrics.bind_model("double", 1)
    stats = ModelStats()

    async def traffic() -> None:
        scheduler = DirectScheduler(spec, _DoublingRunner(), FanOut([stats, prom]))
        for batch in (1, 2, 3):
            request = InferRequest("double", "", "", {"x": np.ones((batch, 4), np.float32)})
            spec.validate(request)
            await scheduler.submit(request)
        bad = InferRequest("double", "", "", {"x": -np.ones((1, 4), np.float32)})
        spec.validate(bad)
        with pytest.raises(ExecutionError):
            await scheduler.submit(bad)
        await scheduler.close()

    asyncio.run(traffic())
    snap = prom.snapshot()
    rpc = stats.snapshot()
    assert snap.success == rpc.success.count == 3
    assert snap.failure == (0, 0, 1, 0)  # BACKEND
    assert snap.inference_count == rpc.inference_count == 6
    assert snap.exec_count == rpc.execution_count == 4
    assert snap.request.count == snap.queue.count == 3
    assert snap.request.total == rpc.success.ns
    # executed sizes 1, 2, 3 and the failed 1: buckets le=1 (twice), le=2, le=4
    assert snap.batch_size.counts[:3] == (2, 1, 1)
    assert snap.pending == 0
    assert isinstance(prom, ModelMetrics)


def test_one_recorder_feeds_model_statistics_and_prometheus() -> None:
    from pipeserve.metrics.recorder import FAILURE_REASONS

    m = ModelMetrics("m", 1)
    m.requests_succeeded(ExecutionTimings(2, 10, 20, 30), [(2, 5_000, 1_000)])
    m.request_failed("REJECTED", 700)
    m.execution_done(ExecutionTimings(2, 10, 20, 30))
    rpc, prom = m.statistics(), m.snapshot()
    assert rpc.success.count == prom.success == 1
    assert rpc.success.ns == prom.request.total == 5_000
    assert rpc.queue.ns == prom.queue.total == 1_000
    assert rpc.inference_count == prom.inference_count == 2
    assert rpc.execution_count == prom.exec_count == 1
    assert rpc.compute_infer.ns == prom.compute_infer_ns == 20
    assert rpc.fail.count == 1 and rpc.fail.ns == 700
    assert prom.failure[FAILURE_REASONS.index("REJECTED")] == 1
    assert rpc.batch_stats[2].compute_infer.ns == 20
    assert prom.compute.total == 60 and prom.batch_size.total == 2
