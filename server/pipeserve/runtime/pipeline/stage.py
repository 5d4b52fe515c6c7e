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

from pipeserve.partition.partitioner import StagePlan
from pipeserve.runtime.devices import Device
from pipeserve.runtime.sessions import (
    DEFAULT_SETTINGS,
    OrtSettings,
    ThreadBudget,
    open_onnx_session,
)
from pipeserve.weights.mapping import release_weights

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
        settings: OrtSettings = DEFAULT_SETTINGS,
    ) -> None:
        self.index = plan.index
        self.inputs = plan.inputs
        self.outputs = plan.outputs
        # The stage graph is built in memory; its external weights live beside the original.
        opened = open_onnx_session(
            plan.model,
            device,
            ThreadBudget(threads),
            what=f"pipeline stage {plan.index} of model '{model_name}'",
            settings=settings,
            weights_dir=base_dir,
        )
        self._session, self._weights = opened.session, opened.weights
        self._run_options = opened.run_options
        self.device = opened.device
        self.binding = self.device.kind == "cuda" if binding is None else binding

    def run(self, env: Mapping[str, Any]) -> tuple[dict[str, Any], int, int]:
        """Run on the values in `env`; returns (outputs by name, compute ns, transfer ns)."""
        if not self.binding:
            feed = {name: env[name] for name in self.inputs}
            start = time.monotonic_ns()
            results = self._session.run(list(self.outputs), feed, self._run_options)
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
        self._session.run_with_iobinding(io, self._run_options)
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
