"""A model version's instances: one onnxruntime session per execution slot (instance_group).

Implements batching.base.ModelRunner. Slot i's session is only ever run by the scheduler's worker
thread for slot i, so sessions need no lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeserve.errors import ConfigError, ModelLoadError, PipeserveError
from pipeserve.runtime.bf16 import run_with_ort_values, uses_bf16
from pipeserve.runtime.devices import available_cpus, providers_for
from pipeserve.weights.mapping import MappedWeights, open_session, release_weights

log = logging.getLogger(__name__)

Opened = tuple[ort.InferenceSession, MappedWeights | None]


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """Where each instance runs and how many threads it may use."""

    kinds: tuple[str, ...]  # one entry per instance: "GPU", "CPU" or "AUTO"
    gpu_ids: tuple[int, ...]  # one entry per instance (0 for CPU)
    intra_op_threads: int
    inter_op_threads: int
    # CPU instances start without weight pre-packing and are upgraded in the background.
    fast_start: bool = True


class SessionInstances:
    """Implements ModelRunner. Slot i's session is run only by the scheduler's worker for slot i;
    `_upgrade` may swap it for a faster one at any time (a list item assignment: the worker either
    finishes on the old session or picks up the new one)."""

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
        self._bf16 = bool(sessions) and uses_bf16(sessions[0])
        self._lock = threading.Lock()
        self._closed = False
        self._upgrader: threading.Thread | None = None

    @property
    def slot_count(self) -> int:
        return len(self._sessions)

    def run(
        self, slot: int, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        names = list(output_names)
        session = self._sessions[slot]
        if self._bf16:
            return run_with_ort_values(session, inputs, names)
        results = session.run(names, dict(inputs))
        return dict(zip(names, results, strict=True))

    def start_upgrade(self, slots: Sequence[int], open_full: Callable[[int], Opened]) -> None:
        """Replace the sessions of `slots` with `open_full(slot)` on a background thread."""
        if slots:
            self._upgrader = threading.Thread(
                target=self._upgrade,
                args=(tuple(slots), open_full),
                name="session-upgrade",
                daemon=True,
            )
            self._upgrader.start()

    def wait_upgraded(self, timeout: float | None = None) -> bool:
        if self._upgrader is not None:
            self._upgrader.join(timeout)
            return not self._upgrader.is_alive()
        return True

    def _upgrade(self, slots: tuple[int, ...], open_full: Callable[[int], Opened]) -> None:
        for slot in slots:
            if self._closed:
                return
            try:
                session, weights = open_full(slot)
            except Exception as exc:  # the fast session keeps serving; only speed is lost
                log.warning("instance %d stays without pre-packed weights: %s", slot, exc)
                continue
            with self._lock:
                if self._closed:
                    del session
                    release_weights([weights] if weights is not None else [])
                    return
                self._sessions[slot] = session
                if weights is not None:
                    self._weights.append(weights)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.wait_upgraded()
        # Drop the sessions first: the mappings must outlive every session that reads them.
        self._sessions.clear()
        release_weights(self._weights)


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
    # Split the cores between instances unless the config says otherwise, keeping one for gRPC
    # and the event loop: measured on 2 cores (docs/benchmarks.md, dynamic batching), onnxruntime
    # on both cores starves the RPC path and costs more throughput than the compute gains.
    default_threads = max(1, (available_cpus() - 1) // total)
    intra = _int_param(params, "intra_op_thread_count", default_threads)
    inter = _int_param(params, "inter_op_thread_count", 1)
    fast = params.get("fast_start", "true").lower()
    if fast not in ("true", "false"):
        raise ConfigError(f"parameter 'fast_start' must be 'true' or 'false', got '{fast}'")
    return InstancePlan(tuple(kinds), tuple(gpu_ids), intra, inter, fast == "true")


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
    """Create every session (slow; call off the event loop). Raises ModelLoadError.

    Fast start: onnxruntime's CPU load time is mostly weight pre-packing (a re-layout of every
    MatMul weight). CPU instances of a model with weight files are therefore opened without it,
    so the model is READY at once, and a background thread then opens each instance again with
    pre-packing and swaps it in (docs/weights.md: what each costs). Until the swap, results may
    differ from the pre-packed kernels' in the last bits of floating point.
    """
    sessions: list[ort.InferenceSession] = []
    devices: list[str] = []
    mapped: list[MappedWeights] = []
    to_upgrade: list[int] = []
    # Only models with weight files beside the graph (external data, `pipeserve pack`) are big
    # enough for load time to matter; inline models keep one deterministic kernel choice.
    weight_files = any(p != model_path for p in model_path.parent.iterdir())
    for slot, (kind, gpu) in enumerate(zip(plan.kinds, plan.gpu_ids, strict=True)):
        providers, device = providers_for(kind, gpu)
        fast = plan.fast_start and weight_files and device == "cpu"
        try:
            session, weights = _open(model_path, providers, plan, model_name, prepack=not fast)
        except BaseException:
            sessions.clear()  # the instances made so far, before the weights they read
            release_weights(mapped)
            raise
        sessions.append(session)
        if weights is not None:
            mapped.append(weights)
        devices.append(device)
        if fast:
            to_upgrade.append(slot)
    log.info("model '%s': %d instance(s) on %s", model_name, len(sessions), ", ".join(devices))
    instances = SessionInstances(sessions, devices, mapped)

    def open_full(slot: int) -> Opened:
        providers, _ = providers_for(plan.kinds[slot], plan.gpu_ids[slot])
        return _open(model_path, providers, plan, model_name, prepack=True)

    instances.start_upgrade(to_upgrade, open_full)
    return instances


def _open(
    model_path: Path, providers: list[object], plan: InstancePlan, model_name: str, prepack: bool
) -> Opened:
    options = ort.SessionOptions()
    options.intra_op_num_threads = plan.intra_op_threads
    options.inter_op_num_threads = plan.inter_op_threads
    options.log_severity_level = 3
    # A server shares its cores with gRPC and the event loop: onnxruntime's intra-op threads
    # must sleep between runs rather than spin on the cores those need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        # External weights are mapped, checked against the pack index and prefetched.
        return open_session(model_path, providers, options, prepack=prepack)
    except PipeserveError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(
            f"onnxruntime could not load model '{model_name}' from '{model_path}': {exc}"
        ) from None
