"""A model version's instances: one onnxruntime session per execution slot (instance_group).

Implements batching.base.ModelRunner. Slot i's session is only ever run by the scheduler's worker
thread for slot i, so sessions need no lock.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeserve.errors import ConfigError, ModelLoadError
from pipeserve.runtime.devices import providers_for

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """Where each instance runs and how many threads it may use."""

    kinds: tuple[str, ...]  # one entry per instance: "GPU", "CPU" or "AUTO"
    gpu_ids: tuple[int, ...]  # one entry per instance (0 for CPU)
    intra_op_threads: int
    inter_op_threads: int


class SessionInstances:
    def __init__(self, sessions: list[ort.InferenceSession], devices: list[str]) -> None:
        self._sessions = sessions
        self.devices = tuple(devices)

    @property
    def slot_count(self) -> int:
        return len(self._sessions)

    def run(
        self, slot: int, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        names = list(output_names)
        results = self._sessions[slot].run(names, dict(inputs))
        return dict(zip(names, results, strict=True))

    def close(self) -> None:
        # Dropping the references frees the sessions (and with them any mapped weights).
        self._sessions.clear()


def plan_instances(
    groups: Sequence[tuple[str, int, Sequence[int]]], params: Mapping[str, str]
) -> InstancePlan:
    """groups: (kind, count, gpus) per instance_group. params: the config's string parameters."""
    kinds: list[str] = []
    gpu_ids: list[int] = []
    for kind, count, gpus in groups:
        if kind == "MODEL":
            raise ConfigError("instance_group kind KIND_MODEL is not supported for ONNX models")
        if count < 1:
            raise ConfigError(f"instance_group count must be >= 1, got {count}")
        ids = list(gpus) or [0]
        for i in range(count):
            kinds.append(kind)
            gpu_ids.append(ids[i % len(ids)] if kind != "CPU" else 0)
    total = max(1, len(kinds))
    # Split the machine's cores between instances unless the config says otherwise.
    default_threads = max(1, (os.cpu_count() or 1) // total)
    intra = _int_param(params, "intra_op_thread_count", default_threads)
    inter = _int_param(params, "inter_op_thread_count", 1)
    return InstancePlan(tuple(kinds), tuple(gpu_ids), intra, inter)


def _int_param(params: Mapping[str, str], key: str, default: int) -> int:
    raw = params.get(key, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"parameter '{key}' must be an integer, got '{raw}'") from None
    if value < 0:
        raise ConfigError(f"parameter '{key}' must be >= 0, got {value}")
    return value or default


def create_instances(model_path: Path, plan: InstancePlan, model_name: str) -> SessionInstances:
    """Create every session (slow; call off the event loop). Raises ModelLoadError."""
    sessions: list[ort.InferenceSession] = []
    devices: list[str] = []
    for kind, gpu in zip(plan.kinds, plan.gpu_ids, strict=True):
        providers, device = providers_for(kind, gpu)
        options = ort.SessionOptions()
        options.intra_op_num_threads = plan.intra_op_threads
        options.inter_op_num_threads = plan.inter_op_threads
        options.log_severity_level = 3
        try:
            sessions.append(
                ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(
                f"onnxruntime could not load model '{model_name}' from '{model_path}': {exc}"
            ) from None
        devices.append(device)
    log.info("model '%s': %d instance(s) on %s", model_name, len(sessions), ", ".join(devices))
    return SessionInstances(sessions, devices)
