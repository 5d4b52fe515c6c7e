"""Which execution providers exist, detected once per process, and which one a stage gets."""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)


@functools.cache
def available_cpus() -> int:
    """Cores this process may really use: its CPU affinity, capped by a cgroup v2 CPU quota.

    os.cpu_count() is the host's count, which in a CPU-limited container gives every session
    far more threads than it has cores.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: the affinity count stands
    return cores


@functools.cache
def available_providers() -> tuple[str, ...]:
    return tuple(ort.get_available_providers())


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices onnxruntime can use: 0 unless the CUDA EP is listed *and* a device is
    present (onnxruntime-gpu lists the EP on CPU-only machines, so ask the driver through the
    EP's own device count)."""
    if "CUDAExecutionProvider" not in available_providers():
        return 0
    try:
        return int(ort.get_device_count("CUDAExecutionProvider"))  # type: ignore[attr-defined]
    except Exception:
        return _probe_cuda_session()


def cuda_usable() -> bool:
    return cuda_device_count() > 0


def describe() -> str:
    """One line for the start-up log: onnxruntime, its execution providers, what models get."""
    providers = ", ".join(available_providers())
    if cuda_usable():
        where = f"{cuda_device_count()} CUDA device(s): GPU and AUTO instances run on CUDA"
    elif "CUDAExecutionProvider" in available_providers():
        where = "no CUDA device found: every model instance runs on the CPU execution provider"
    else:
        where = "no CUDA provider: every model instance runs on the CPU execution provider"
    return f"onnxruntime {ort.__version__}, execution providers: {providers}; {where}"


def _probe_cuda_session() -> int:
    try:
        import ctypes

        lib = ctypes.CDLL("libcudart.so.12")
    except OSError:
        try:
            lib = ctypes.CDLL("libcudart.so.13")
        except OSError:
            return 0
    n = ctypes.c_int(0)
    if lib.cudaGetDeviceCount(ctypes.byref(n)) != 0:
        return 0
    return n.value


def providers_for(kind: str, device_id: int = 0) -> tuple[list[object], str]:
    """Provider list for a stage and the device it will really run on ("cuda:N" or "cpu").

    kind: "GPU", "CPU" or "AUTO" (Triton's instance_group kinds).
    """
    if kind in ("GPU", "AUTO") and cuda_usable():
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"], (
            f"cuda:{device_id}"
        )
    return ["CPUExecutionProvider"], "cpu"
