"""The device vocabulary (`Device`: "cpu" or "cuda:N"), what this machine has (cores, CUDA),
detected once per process, and the one rule for a device that is not there.

Every session pipeserve opens (an instance of an instance_group, a pipeline stage) is placed on a
Device. Triton's instance_group kinds map onto it (`instance_device`): KIND_CPU is "cpu",
KIND_GPU and KIND_AUTO are "cuda:N" for the group's GPU N.

Missing GPU, one rule (`place`): a session asked for on CUDA where onnxruntime cannot use CUDA
(no device, no CUDA libraries) runs on the CPU, and one WARNING per model load names what moved.
A Triton repository written for a GPU server thus still serves on a CPU-only machine; the
warning, and the `device` label of the stage series and the load log, say where it really runs.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnxruntime as ort

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Device:
    kind: Literal["cpu", "cuda"]
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


CPU = Device("cpu")


def instance_device(kind: str, gpu: int = 0) -> Device:
    """The device an instance_group kind asks for ("GPU", "CPU" or "AUTO", Triton's kinds).

    AUTO means "a GPU where there is one": on a machine without one it is the CPU, silently."""
    if kind == "CPU" or (kind == "AUTO" and not cuda_usable()):
        return CPU
    return Device("cuda", gpu)


def place(requested: Sequence[Device], what: str) -> tuple[Device, ...]:
    """Where each requested session really runs: CUDA ones on the CPU where onnxruntime cannot
    use CUDA, with one WARNING for all of `what` (e.g. "model 'm' instances")."""
    if all(d.kind == "cpu" for d in requested) or cuda_usable():
        return tuple(requested)
    moved = sorted({str(d) for d in requested if d.kind == "cuda"})
    log.warning(
        "%s ask for %s but onnxruntime cannot use CUDA here (no GPU or no CUDA libraries): "
        "they run on the CPU",
        what,
        ", ".join(moved),
    )
    return tuple(CPU for _ in requested)


def session_cores() -> int:
    """Cores onnxruntime sessions may use by default: all but one, kept for the event loop and
    the RPC path, which every request passes through. A model measured compute-bound at load
    gets every core instead (runtime/compute_bound.py says why and what was measured)."""
    return max(1, available_cpus() - 1)


def split_cores(cpu_sessions: int, cores: int | None = None) -> int:
    """The thread-budget rule: intra-op threads per CPU session when the config gives none,
    `cores` (default session_cores()) split evenly between the CPU sessions that run at once."""
    total = session_cores() if cores is None else cores
    return max(1, total // max(1, cpu_sessions))


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
