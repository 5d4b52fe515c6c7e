"""Gated fakes for the batcher's unit tests: a runner whose every execution blocks until the test
releases it, and helpers to build specs, configs and requests. Nothing here sleeps: tests learn
what happened from the queue of calls and from threading.Event gates."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from pipeserve.batching.dynamic import DynamicBatcher
from pipeserve.batching.policy import BatchingPolicy
from pipeserve.inference import InferRequest, ModelSpec, TensorSpec
from pipeserve.statistics import ModelStats

WAIT_S = 10.0  # generous bound for things that must happen; never a proof by itself


@dataclass
class Call:
    slot: int
    inputs: dict[str, np.ndarray]
    output_names: list[str]
    gate: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def column(self, name: str = "x") -> list[float]:
        """First element of each row: tests put a request id there."""
        return [float(v) for v in self.inputs[name].reshape(self.rows, -1)[:, 0]]

    def release(self, error: Exception | None = None) -> None:
        self.error = error
        self.gate.set()


class GatedRunner:
    """ModelRunner whose run() reports itself on `calls` and blocks until released.

    Outputs: y = x * 2 (and any other input passed through as `<name>_out`)."""

    def __init__(self, slots: int = 1) -> None:
        self.slot_count = slots
        self.calls: queue.Queue[Call] = queue.Queue()
        self.closed = False

    def run(
        self, slot: int, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        call = Call(slot, dict(inputs), list(output_names))
        self.calls.put(call)
        if not call.gate.wait(WAIT_S * 3):
            raise RuntimeError("test never released the call")
        if call.error is not None:
            raise call.error
        out = {"y": np.asarray(inputs["x"]) * 2}
        for name, array in inputs.items():
            if name != "x":
                out[f"{name}_out"] = np.asarray(array)
        return {k: v for k, v in out.items() if k in output_names}

    def close(self) -> None:
        self.closed = True

    async def next_call(self) -> Call:
        return await asyncio.to_thread(self.calls.get, True, WAIT_S)

    def no_call_pending(self) -> bool:
        return self.calls.empty()


def spec(
    dims: tuple[int, ...] = (2,),
    max_batch_size: int = 8,
    extra_inputs: Sequence[TensorSpec] = (),
) -> ModelSpec:
    outputs = [TensorSpec("y", "FP32", dims)]
    outputs += [TensorSpec(f"{t.name}_out", t.datatype, t.dims) for t in extra_inputs]
    return ModelSpec(
        name="m",
        version=1,
        max_batch_size=max_batch_size,
        inputs=(TensorSpec("x", "FP32", dims), *extra_inputs),
        outputs=tuple(outputs),
    )


def config(text: str, max_batch_size: int = 8) -> Any:
    """A ModelConfig message from the body of a `dynamic_batching { ... }` plus extra top-level
    text; `text` is everything after max_batch_size."""
    message = model_config_pb2.ModelConfig()
    text_format.Parse(f'name: "m" max_batch_size: {max_batch_size}\n{text}', message)
    return message


def policy(text: str = "dynamic_batching { }", model: ModelSpec | None = None) -> BatchingPolicy:
    model = model or spec()
    return BatchingPolicy.from_config(config(text, model.max_batch_size), model)


def request(
    ident: float,
    rows: int = 1,
    width: int = 2,
    priority: int = 0,
    timeout_us: int = 0,
    outputs: tuple[str, ...] = (),
    **extra: np.ndarray,
) -> InferRequest:
    """A request whose rows all start with `ident`, so a batch's first column names its requests."""
    x = np.zeros((rows, width), dtype=np.float32)
    x[:, 0] = ident
    req = InferRequest(
        model_name="m",
        model_version="1",
        request_id=str(ident),
        inputs={"x": x, **extra},
        requested_outputs=outputs,
        priority=priority,
        timeout_us=timeout_us,
    )
    req.batch_size = rows
    return req


class SteppedClock:
    """time.monotonic_ns plus an offset a test moves forward: "1 ms has passed" becomes a fact
    the test states (`advance`) instead of a sleep it hopes was long enough."""

    def __init__(self) -> None:
        self._offset_ns = 0

    def __call__(self) -> int:
        return time.monotonic_ns() + self._offset_ns

    def advance(self, ns: int) -> None:
        self._offset_ns += ns


class Harness:
    """A DynamicBatcher over a GatedRunner with real ModelStats as its observer and a clock the
    test can step."""

    def __init__(
        self, text: str = "dynamic_batching { }", slots: int = 1, model: ModelSpec | None = None
    ) -> None:
        self.model = model or spec()
        self.runner = GatedRunner(slots)
        self.stats = ModelStats()
        self.clock = SteppedClock()
        self.batcher = DynamicBatcher(
            self.model, self.runner, self.stats, policy(text, self.model), clock=self.clock
        )

    async def close(self, release: Callable[[Call], None] | None = None) -> None:
        """Drain: release every call until the batcher has stopped."""
        closing = asyncio.ensure_future(self.batcher.close())
        while not closing.done():
            try:
                call = await asyncio.to_thread(self.runner.calls.get, True, 0.05)
            except queue.Empty:
                continue
            (release or Call.release)(call)
        await closing


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, WAIT_S * 3))
