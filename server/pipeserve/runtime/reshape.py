"""The model's own shapes where the config's differ: `reshape`, and scalars (Triton's rules).

A request is checked against the config's `dims`, the shape clients see. Where a tensor's
`TensorSpec.model_dims` says the model takes or produces another shape (the config's
`reshape { shape }`, or () for a scalar in the model), the inputs are viewed in the model's shape
just before a batch runs and the outputs viewed back in `dims` as soon as it returns. Everything
else (validation, batching, splitting a batch's outputs, the wire) sees only `dims`.

As in Triton, the values of variable dimensions (-1) carry over in order: with dims [2, -1, 6]
and reshape [2, -1, 3, 2], an input [2, 5, 6] reaches the model as [2, 5, 3, 2]. The batch
dimension, when the model batches, is never reshaped. A model whose outputs are all as declared pays nothing:
`with_reshapes` returns its runner unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeserve.batching.base import ModelRunner
from pipeserve.errors import ExecutionError
from pipeserve.inference import ModelSpec

# Tensor name -> (shape it comes in, shape it goes out), both less the batch dimension.
_Moves = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


def with_reshapes(runner: ModelRunner, spec: ModelSpec) -> ModelRunner:
    """`runner`, or a runner that reshapes for it when any tensor of `spec` needs it."""
    inputs = {t.name: (t.dims, t.model_dims) for t in spec.inputs if t.model_dims is not None}
    outputs = {t.name: (t.model_dims, t.dims) for t in spec.outputs if t.model_dims is not None}
    if not inputs and not outputs:
        return runner
    return ReshapingRunner(runner, inputs, outputs, spec.batching)


def moved(
    shape: tuple[int, ...], src: tuple[int, ...], dst: tuple[int, ...], batch: bool
) -> tuple[int, ...] | None:
    """`shape` (matching `src`, after its batch dimension when `batch`) in `dst`'s shape; None
    when `shape` does not have `src`'s rank."""
    head, body = (shape[:1], shape[1:]) if batch else ((), shape)
    if len(body) != len(src):
        return None
    variable = iter([size for size, d in zip(body, src, strict=True) if d == -1])
    return head + tuple(next(variable) if d == -1 else d for d in dst)


class ReshapingRunner:
    """Implements ModelRunner around another runner (batching.base)."""

    def __init__(self, inner: ModelRunner, inputs: _Moves, outputs: _Moves, batch: bool) -> None:
        self._inner = inner
        self._inputs = inputs
        self._outputs = outputs
        self._batch = batch
        # What the wrapped runner allows (dynamic.py's inline execution) holds for this one.
        self.inline_safe = getattr(inner, "inline_safe", False)

    @property
    def slot_count(self) -> int:
        return self._inner.slot_count

    def run(
        self, slot: int, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        fed = dict(inputs)
        for name, (src, dst) in self._inputs.items():
            array = fed.get(name)
            if array is not None:  # an optional input may be left out
                shape = moved(array.shape, src, dst, self._batch)
                assert shape is not None  # the request was checked against `src`: same rank
                fed[name] = array.reshape(shape)
        results = self._inner.run(slot, fed, output_names)
        for name, (src, dst) in self._outputs.items():
            array = results.get(name)
            if array is None:
                continue
            shape = moved(array.shape, src, dst, self._batch)
            if shape is None:
                if not src:  # a tensor of unknown rank that did not come back a scalar
                    continue
                raise ExecutionError(
                    f"output '{name}' came back with shape {list(array.shape)}, which does not "
                    f"have the rank of its reshape {list(src)}"
                    + (" (after the batch dimension)" if self._batch else "")
                )
            try:
                results[name] = array.reshape(shape)
            except ValueError:
                raise ExecutionError(
                    f"output '{name}' came back with shape {list(array.shape)}, which cannot be "
                    f"reshaped to its dims {list(dst)}"
                ) from None
        return results

    def close(self) -> None:
        self._inner.close()
