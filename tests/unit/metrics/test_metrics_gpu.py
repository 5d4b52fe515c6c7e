"""GpuCollector: absent without a GPU, Triton's nv_gpu_* series with one (NVML faked here: this
machine has no GPU, so the NVML module is the one part replaced)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pipeserve.metrics.gpu import GpuCollector, visible_order
from pipeserve.metrics.http import render_metrics
from pipeserve.metrics.recorder import ServerMetrics

HAS_NVIDIA_DRIVER = os.path.exists("/dev/nvidiactl")


class FakeNvmlError(Exception):
    pass


@dataclass
class _Rates:
    gpu: int


@dataclass
class _Memory:
    total: int
    used: int


class FakeNvml:
    """The handful of pynvml calls GpuCollector makes, over a list of fake GPUs."""

    NVMLError = FakeNvmlError

    def __init__(self, gpus: list[tuple[str, int, int, int]], driver: bool = True) -> None:
        self.gpus = gpus  # (uuid, utilisation %, total bytes, used bytes)
        self.driver = driver
        self.shutdowns = 0
        self.lost: set[int] = set()

    def nvmlInit(self) -> None:
        if not self.driver:
            raise FakeNvmlError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return self.gpus[handle][0].encode()  # old pynvml returned bytes

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Rates:
        if handle in self.lost:
            raise FakeNvmlError("GPU is lost")
        return _Rates(self.gpus[handle][1])

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Memory:
        return _Memory(self.gpus[handle][2], self.gpus[handle][3])


TWO_GPUS = [("GPU-aaaa-1111", 40, 80 * 2**30, 2**30), ("GPU-bbbb-2222", 0, 80 * 2**30, 0)]


def samples(registry: CollectorRegistry, family: str) -> dict[tuple[str, str], float]:
    for f in text_string_to_metric_families(render_metrics(registry).decode()):
        if f.name == family:
            return {(s.labels["device"], s.labels["gpu_uuid"]): s.value for s in f.samples}
    return {}


@pytest.mark.skipif(HAS_NVIDIA_DRIVER, reason="this machine has an NVIDIA driver")
def test_no_gpu_series_at_all_without_a_gpu() -> None:
    # Real detection: pynvml absent, or present without a driver, gives no collector.
    assert GpuCollector.open() is None
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    metrics.bind_model("m", 1)
    assert metrics.gpu_collector is None
    assert b"nv_gpu_" not in render_metrics(registry)


def test_library_without_driver_or_without_gpus_gives_no_collector() -> None:
    assert GpuCollector.open(FakeNvml(TWO_GPUS, driver=False)) is None
    no_gpus = FakeNvml([])
    assert GpuCollector.open(no_gpus) is None
    assert no_gpus.shutdowns == 1


def test_utilisation_and_memory_per_device_with_triton_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNvml(TWO_GPUS)
    collector = GpuCollector.open(nvml)
    assert collector is not None
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, process_metrics=False, gpu_collector=collector)
    assert samples(registry, "nv_gpu_utilization") == {
        ("cuda:0", "GPU-aaaa-1111"): 0.4,
        ("cuda:1", "GPU-bbbb-2222"): 0.0,
    }
    assert samples(registry, "nv_gpu_memory_total_bytes")[("cuda:0", "GPU-aaaa-1111")] == 80 * 2**30
    assert samples(registry, "nv_gpu_memory_used_bytes")[("cuda:0", "GPU-aaaa-1111")] == 2**30

    nvml.lost.add(0)  # a GPU that fell off the bus: its samples go, the scrape still works
    assert list(samples(registry, "nv_gpu_utilization")) == [("cuda:1", "GPU-bbbb-2222")]
    metrics.close()
    assert nvml.shutdowns == 1


def test_devices_are_numbered_as_cuda_visible_devices_orders_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    collector = GpuCollector.open(FakeNvml(TWO_GPUS))
    assert collector is not None
    assert [(d.device, d.uuid) for d in collector.devices] == [("cuda:0", "GPU-bbbb-2222")]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (None, [0, 1, 2]),
        ("2,0", [2, 0]),
        ("1,7,0", [1]),  # CUDA stops at the first invalid entry
        ("", []),
        ("GPU-cc", [2]),
        ("GPU-", []),  # ambiguous prefix: invalid
        ("MIG-1234", None),  # MIG instances: label by NVML index instead
    ],
)
def test_visible_order(env: str | None, expected: list[int] | None) -> None:
    uuids = ["GPU-aa11", "GPU-bb22", "GPU-cc33"]
    assert visible_order(uuids, env) == expected
