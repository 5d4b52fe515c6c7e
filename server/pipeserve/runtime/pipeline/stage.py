"""One pipeline stage: an onnxruntime session for one stage model on one device.

CPU stages take and return numpy arrays (inputs are passed by reference: slices of the batch and
arrays returned by the previous stage, no copies). CUDA stages run through IOBinding: outputs are
bound to their GPU so activations stay on the device, and an OrtValue from the previous GPU is
bound as input as it is, onnxruntime copying it device to device. The IOBinding path also runs
on CPU (`binding=True`), which is how it is tested on machines without a GPU; the CUDA-specific
parts (device-resident outputs, cross-GPU inputs) are written but untested here.

Thread ownership: a StageRunner is used only by its stage's thread after construction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pipeserve.errors import ConfigError, ModelLoadError, PipeserveError
from pipeserve.partition.partitioner import StagePlan
from pipeserve.runtime.pipeline.config import Device
from pipeserve.weights.mapping import MappedWeights, open_stage_session, release_weights

log = logging.getLogger(__name__)


class StageRunner:
    def __init__(
        self,
        plan: StagePlan,
        device: Device,
        base_dir: Path | None,
        threads: int,
        binding: bool | None = None,
        model_name: str = "",
    ) -> None:
        self.index = plan.index
        self.device = device
        self.inputs = plan.inputs
        self.outputs = plan.outputs
        self.binding = device.kind == "cuda" if binding is None else binding
        self._session, self._weights = _open_session(plan, device, base_dir, threads, model_name)

    def run(self, env: Mapping[str, Any]) -> tuple[dict[str, Any], int, int]:
        """Run on the values in `env`; returns (outputs by name, compute ns, transfer ns)."""
        if not self.binding:
            feed = {name: env[name] for name in self.inputs}
            start = time.monotonic_ns()
            results = self._session.run(list(self.outputs), feed)
            return dict(zip(self.outputs, results, strict=True)), time.monotonic_ns() - start, 0
        return self._run_bound(env)

    def _run_bound(self, env: Mapping[str, Any]) -> tuple[dict[str, Any], int, int]:
        start = time.monotonic_ns()
        io = self._session.io_binding()
        device_type = "cuda" if self.device.kind == "cuda" else "cpu"
        for name in self.inputs:
            value = env[name]
            if isinstance(value, np.ndarray):
                # Host data (request inputs): onnxruntime copies it to the device on run.
                io.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                io.bind_ortvalue_input(name, value)
        for name in self.outputs:
            io.bind_output(name, device_type, self.device.index)
        bound = time.monotonic_ns()
        self._session.run_with_iobinding(io)
        io.synchronize_outputs()
        done = time.monotonic_ns()
        values = io.get_outputs()
        return dict(zip(self.outputs, values, strict=True)), done - bound, bound - start

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
        # After the session: the mapping must outlive every session that reads it.
        if self._weights is not None:
            release_weights([self._weights])
            self._weights = None


def to_numpy(value: Any) -> np.ndarray:
    """A final output as numpy (an OrtValue from a bound stage is copied to the host here)."""
    if isinstance(value, np.ndarray):
        return value
    return value.numpy()  # type: ignore[no-any-return]


def _open_session(
    plan: StagePlan, device: Device, base_dir: Path | None, threads: int, model_name: str
) -> tuple[ort.InferenceSession, MappedWeights | None]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Stages share the cores: spinning intra-op threads would steal them from the other stages.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device.kind == "cuda":
        providers: list[Any] = [
            ("CUDAExecutionProvider", {"device_id": device.index}),
            "CPUExecutionProvider",
        ]
    else:
        providers = ["CPUExecutionProvider"]
    weights: MappedWeights | None = None
    try:
        if base_dir is not None:
            # The stage model is built in memory; its external weights live beside the original
            # and only the byte ranges this stage references are checked, mapped and prefetched.
            session, weights = open_stage_session(plan.model, base_dir, providers, options)
        else:
            session = ort.InferenceSession(
                plan.model.SerializeToString(), sess_options=options, providers=providers
            )
    except PipeserveError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(
            f"onnxruntime could not load pipeline stage {plan.index} of model '{model_name}' "
            f"on {device}: {exc}"
        ) from None
    if device.kind == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        del session
        if weights is not None:
            release_weights([weights])
        raise ConfigError(
            f"pipeline stage {plan.index} of model '{model_name}' asks for {device}, but "
            f"onnxruntime cannot use CUDA here (no GPU or no CUDA libraries); use 'cpu' stages"
        )
    return session, weights
