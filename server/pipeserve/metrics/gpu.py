"""GPU utilisation and memory per device, read from NVML (package nvidia-ml-py) at scrape time.

Series use Triton's names (`nv_gpu_utilization`, `nv_gpu_memory_total_bytes`,
`nv_gpu_memory_used_bytes`) and Triton's label `gpu_uuid`, plus `device` (`cuda:N`, the index
onnxruntime's CUDA provider takes). Where nvidia-ml-py is not installed, or NVML finds no driver or
no GPU, there is no collector and no `nv_gpu_*` series at all (not zeros).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

try:  # optional: `pip install nvidia-ml-py` (the `gpu` extra)
    import pynvml

    _nvml: ModuleType | None = pynvml
except ImportError:  # pragma: no cover - depends on the environment
    _nvml = None

_LABELS = ("device", "gpu_uuid")


@dataclass(frozen=True, slots=True)
class GpuDevice:
    device: str  # "cuda:N" as this process numbers its visible GPUs
    uuid: str
    handle: Any


def visible_order(uuids: list[str], cuda_visible_devices: str | None) -> list[int] | None:
    """NVML indices of the GPUs this process sees, in CUDA's numbering order.

    `cuda_visible_devices` entries are indices or UUID prefixes. Returns None where the value
    cannot be mapped (e.g. MIG instances), in which case the caller labels devices by NVML index.
    CUDA numbers GPUs in PCI bus order only with CUDA_DEVICE_ORDER=PCI_BUS_ID (NVML's order); the
    docs ask deployments with mixed GPU models to set it.
    """
    if cuda_visible_devices is None:
        return list(range(len(uuids)))
    order: list[int] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if not entry:
            break  # CUDA stops at the first empty or invalid entry
        if entry.isdigit():
            index = int(entry)
            if index >= len(uuids):
                break
            order.append(index)
            continue
        if entry.startswith("MIG-"):
            return None
        matches = [i for i, u in enumerate(uuids) if u.startswith(entry)]
        if len(matches) != 1:
            break
        order.append(matches[0])
    return order


class GpuCollector:
    """A prometheus_client collector over NVML device handles. Create with `open()`."""

    def __init__(self, nvml: Any, devices: list[GpuDevice]) -> None:
        self._nvml = nvml
        self.devices = devices

    @classmethod
    def open(cls, nvml: Any = None) -> GpuCollector | None:
        """Initialise NVML and list the visible GPUs; None where there is no library, no driver
        or no GPU. `nvml` defaults to the installed pynvml module (tests pass their own)."""
        nvml = nvml if nvml is not None else _nvml
        if nvml is None:
            return None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError:
            return None
        try:
            count = nvml.nvmlDeviceGetCount()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        except nvml.NVMLError:
            nvml.nvmlShutdown()
            return None
        order = visible_order(uuids, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if order is None:
            devices = [GpuDevice(f"cuda:{i}", uuids[i], handles[i]) for i in range(count)]
        else:
            devices = [GpuDevice(f"cuda:{n}", uuids[i], handles[i]) for n, i in enumerate(order)]
        if not devices:
            nvml.nvmlShutdown()
            return None
        return cls(nvml, devices)

    def describe(self) -> Iterator[Metric]:
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        utilization, total, used = _families()
        for d in self.devices:
            values = [d.device, d.uuid]
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(d.handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(d.handle)
            except self._nvml.NVMLError:
                continue  # a GPU that fell off the bus loses its samples, the scrape goes on
            utilization.add_metric(values, rates.gpu / 100.0)
            total.add_metric(values, float(memory.total))
            used.add_metric(values, float(memory.used))
        return iter((utilization, total, used))

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=_LABELS),
        GaugeMetricFamily(
            "nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=_LABELS
        ),
        GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=_LABELS),
    )


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes.
    return value.decode() if isinstance(value, bytes) else value
