"""A model version's instances: one onnxruntime session per execution slot (instance_group).

Implements batching.base.ModelRunner. Slot i's session is only ever run by the scheduler's worker
thread for slot i, so sessions need no lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeserve import parameters as table
from pipeserve.errors import ConfigError
from pipeserve.progress import LoadProgress
from pipeserve.runtime.bf16 import run_with_ort_values, uses_bf16
from pipeserve.runtime.compute_bound import batch_one_ns, is_compute_bound
from pipeserve.runtime.devices import (
    CPU,
    Device,
    available_cpus,
    instance_device,
    place,
    session_cores,
)
from pipeserve.runtime.sessions import (
    DEFAULT_SETTINGS,
    OrtSettings,
    ThreadBudget,
    open_onnx_session,
    run_options,
    thread_budget,
)
from pipeserve.weights.mapping import MappedWeights, release_weights

log = logging.getLogger(__name__)

Opened = tuple[ort.InferenceSession, MappedWeights | None, str]  # session, weights, device


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """Where each instance runs and how many threads it may use."""

    kinds: tuple[str, ...]  # one entry per instance: "GPU", "CPU" or "AUTO"
    gpu_ids: tuple[int, ...]  # one entry per instance (0 for CPU)
    intra_op_threads: int  # of each CPU instance (devices.split_cores unless the config gives it)
    inter_op_threads: int
    # CPU instances start without weight pre-packing and are upgraded in the background.
    fast_start: bool = True
    # Where each instance runs (devices.place: a missing GPU means the CPU). Empty: from kinds.
    devices: tuple[Device, ...] = ()
    # intra_op_thread_count was given: every instance, CUDA ones too, uses it.
    intra_op_given: bool = False
    ort: OrtSettings = DEFAULT_SETTINGS
    # Cores the CPU sessions share by the default rule (0: devices.session_cores()); every core
    # once the model measured compute-bound at load (create_instances).
    cores: int = 0

    def device(self, slot: int) -> Device:
        if self.devices:
            return self.devices[slot]
        return instance_device(self.kinds[slot], self.gpu_ids[slot])

    def budget(self, slot: int) -> ThreadBudget:
        """Slot's threads by the one rule (sessions.thread_budget)."""
        cpu_sessions = sum(1 for i in range(len(self.kinds)) if self.device(i).kind == "cpu")
        given = self.intra_op_threads if self.intra_op_given else None
        return thread_budget(
            self.device(slot), cpu_sessions, given, self.inter_op_threads, self.cores or None
        )


class SessionInstances:
    """Implements ModelRunner. Slot i's session is run only by the scheduler's worker for slot i;
    `_upgrade` may swap it for a faster one at any time (a list item assignment: the worker either
    finishes on the old session or picks up the new one)."""

    # Slot 0's session may be run on the event loop while every worker is idle (batching.base).
    inline_safe = True

    def __init__(
        self,
        sessions: list[ort.InferenceSession],
        devices: list[str],
        weights: list[MappedWeights] | None = None,
        run_options: ort.RunOptions | None = None,
    ) -> None:
        self._sessions = sessions
        self.devices = tuple(devices)
        # Mapped weight files the sessions read from: released only after the sessions.
        self._weights = weights or []
        self._bf16 = bool(sessions) and uses_bf16(sessions[0])
        self._run_options = run_options
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
            return run_with_ort_values(session, inputs, names, self._run_options)
        results = session.run(names, dict(inputs), self._run_options)
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
                session, weights, _ = open_full(slot)
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
    groups: Sequence[tuple[str, int, Sequence[int]]],
    params: Mapping[str, str],
    model_name: str = "",
    settings: OrtSettings = DEFAULT_SETTINGS,
) -> InstancePlan:
    """groups: (kind, count, gpus) per instance_group. params: the config's string parameters;
    settings: the model's onnxruntime settings (sessions.ort_settings)."""
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
    devices = place(
        [instance_device(k, g) for k, g in zip(kinds, gpu_ids, strict=True)],
        f"model '{model_name}' instances" if model_name else "instances",
    )
    cpu_sessions = sum(1 for d in devices if d.kind == "cpu")
    given = table.read(params, "intra_op_thread_count", 0)
    intra = thread_budget(CPU, cpu_sessions, given).intra_op
    inter = table.read(params, "inter_op_thread_count", 0) or 1
    fast = table.read(params, "fast_start", True)
    return InstancePlan(
        tuple(kinds), tuple(gpu_ids), intra, inter, fast, devices, given > 0, settings
    )


def _may_widen(plan: InstancePlan) -> bool:
    """The default thread rule applies to slot 0's CPU session and every core is more."""
    return (
        not plan.intra_op_given
        and not plan.cores
        and plan.device(0).kind == "cpu"
        and available_cpus() > session_cores()
    )


def _widened(
    plan: InstancePlan, session: ort.InferenceSession, model_name: str
) -> InstancePlan | None:
    """`plan` with every core for the CPU sessions when the model is compute-bound (measured on
    `session`, opened with the default budget), else None."""
    measured = batch_one_ns(session)
    if not is_compute_bound(measured):
        return None
    assert measured is not None
    cores = available_cpus()
    log.info(
        "model '%s': a batch-1 run takes %.1f ms (compute-bound): its CPU sessions share all %d "
        "cores (set intra_op_thread_count to choose)",
        model_name,
        measured / 1e6,
        cores,
    )
    return replace(plan, cores=cores)


def create_instances(
    model_path: Path,
    plan: InstancePlan,
    model_name: str,
    progress: LoadProgress | None = None,
) -> SessionInstances:
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
    what = f"model '{model_name}' from '{model_path}'"

    def open_slot(slot: int, prepack: bool) -> Opened:
        opened = open_onnx_session(
            model_path,
            plan.device(slot),
            plan.budget(slot),
            what=what,
            settings=plan.ort,
            prepack=prepack,
        )
        return opened.session, opened.weights, str(opened.device)

    for slot in range(len(plan.kinds)):
        fast = plan.fast_start and weight_files and plan.device(slot).kind == "cpu"
        try:
            session, weights, device = open_slot(slot, prepack=not fast)
            if slot == 0 and _may_widen(plan):
                widened = _widened(plan, session, model_name)
                if widened is not None:  # open it again on every core
                    plan = widened
                    del session
                    release_weights([weights] if weights is not None else [])
                    session, weights, device = open_slot(slot, prepack=not fast)
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
        if progress is not None:
            progress.step("instance", slot + 1, len(plan.kinds), f"on {device}")
    log.info("model '%s': %d instance(s) on %s", model_name, len(sessions), ", ".join(devices))
    instances = SessionInstances(sessions, devices, mapped, run_options(plan.ort))
    instances.start_upgrade(to_upgrade, lambda slot: open_slot(slot, prepack=True))
    return instances
