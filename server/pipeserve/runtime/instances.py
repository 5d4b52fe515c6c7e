"""A model version's instances: one onnxruntime session per execution slot (instance_group).

Implements batching.base.ModelRunner. Slot i's session is only ever run by the scheduler's worker
thread for slot i, so sessions need no lock.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeserve.errors import ConfigError, ModelLoadError, PipeserveError
from pipeserve.runtime.devices import available_cpus, providers_for
from pipeserve.runtime.weights import MappedWeights, open_session, release_weights
from pipeserve.tensors import BF16_DTYPE

log = logging.getLogger(__name__)

_BF16 = "tensor(bfloat16)"
_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """Where each instance runs and how many threads it may use."""

    kinds: tuple[str, ...]  # one entry per instance: "GPU", "CPU" or "AUTO"
    gpu_ids: tuple[int, ...]  # one entry per instance (0 for CPU)
    intra_op_threads: int
    inter_op_threads: int


class SessionInstances:
    def __init__(
        self,
        sessions: list[ort.InferenceSession],
        devices: list[str],
        weights: list[MappedWeights] | None = None,
    ) -> None:
        self._sessions = sessions
        self.devices = tuple(devices)
        # Mapped weight files the sessions read from: released only after the sessions.
        self._weights = weights or []
        # onnxruntime's numpy bridge refuses bfloat16 (ml_dtypes' dtype is foreign to it): models
        # with a bfloat16 input or output run through OrtValues that carry the raw bits.
        io = [*sessions[0].get_inputs(), *sessions[0].get_outputs()] if sessions else []
        self._bf16 = any(arg.type == _BF16 for arg in io)

    @property
    def slot_count(self) -> int:
        return len(self._sessions)

    def run(
        self, slot: int, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        names = list(output_names)
        if self._bf16:
            return _run_with_ort_values(self._sessions[slot], inputs, names)
        results = self._sessions[slot].run(names, dict(inputs))
        return dict(zip(names, results, strict=True))

    def close(self) -> None:
        # Drop the sessions first: the mappings must outlive every session that reads them.
        self._sessions.clear()
        release_weights(self._weights)


def _run_with_ort_values(
    session: ort.InferenceSession, inputs: Mapping[str, np.ndarray], names: list[str]
) -> dict[str, np.ndarray]:
    feeds = {name: _to_ort_value(array) for name, array in inputs.items()}
    results = session.run_with_ort_values(names, feeds)
    return {name: _from_ort_value(value) for name, value in zip(names, results, strict=True)}


def _to_ort_value(array: np.ndarray) -> ort.OrtValue:
    if array.dtype == BF16_DTYPE:
        bits = np.ascontiguousarray(array).view(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, _ONNX_BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _from_ort_value(value: ort.OrtValue) -> np.ndarray:
    if value.data_type() != _BF16:
        return value.numpy()
    shape = tuple(value.shape())
    count = math.prod(shape)
    if count == 0:
        return np.empty(shape, dtype=BF16_DTYPE)
    # Copy the bits out: the OrtValue owns them and is freed when it goes out of scope.
    bits = (ctypes.c_uint16 * count).from_address(value.data_ptr())
    assert BF16_DTYPE is not None  # a bfloat16 output means ml_dtypes is there (onnx needs it)
    return np.frombuffer(bits, dtype=np.uint16).copy().view(BF16_DTYPE).reshape(shape)


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
    default_threads = max(1, available_cpus() // total)
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
    mapped: list[MappedWeights] = []
    for kind, gpu in zip(plan.kinds, plan.gpu_ids, strict=True):
        providers, device = providers_for(kind, gpu)
        options = ort.SessionOptions()
        options.intra_op_num_threads = plan.intra_op_threads
        options.inter_op_num_threads = plan.inter_op_threads
        options.log_severity_level = 3
        try:
            # External weights are mapped, checked against the pack index and prefetched.
            session, weights = open_session(model_path, providers, options)
        except Exception as exc:  # onnxruntime raises its own exception types
            sessions.clear()  # the instances made so far, before the weights they read
            release_weights(mapped)
            if isinstance(exc, PipeserveError):
                raise
            raise ModelLoadError(
                f"onnxruntime could not load model '{model_name}' from '{model_path}': {exc}"
            ) from None
        sessions.append(session)
        if weights is not None:
            mapped.append(weights)
        devices.append(device)
    log.info("model '%s': %d instance(s) on %s", model_name, len(sessions), ", ".join(devices))
    return SessionInstances(sessions, devices, mapped)

