"""Requests, responses and the tensor contract of a model, as plain dataclasses.

A leaf module: the API layer builds `InferRequest`s from protobuf, the batcher and runtime only see
these types and numpy arrays. `ModelSpec.validate` is the one place a request is checked against
the model's declared inputs, so every transport gets the same precise errors.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeserve.errors import InvalidInputError
from pipeserve.tensors import numpy_dtype, triton_from_numpy


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One declared input or output. `dims` excludes the batch dimension when the model batches;
    -1 is a variable dimension."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False
    allow_ragged_batch: bool = False
    # Outputs: the classification labels from the config's label_filename (index i = line i).
    labels: tuple[str, ...] = ()
    # The shape the model itself takes or produces (less the batch dimension) where it is not
    # `dims`: the config's `reshape`, or () for a scalar in the model (runtime/reshape.py).
    model_dims: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What a loaded model version accepts and produces (derived from its completed config)."""

    name: str
    version: int
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Derived once (validate reads them for every request).
    input_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _output_names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_names", tuple(s.name for s in self.inputs))
        object.__setattr__(self, "_output_names", tuple(o.name for o in self.outputs))

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def output_names(self) -> tuple[str, ...]:
        return self._output_names

    def output_datatype(self, name: str, dtype: np.dtype) -> str:
        """The datatype an output array goes out as: as declared, except that an object array
        is BYTES whatever the output declares (a classified output's "value:index:label")."""
        if dtype == np.object_:
            return "BYTES"
        for spec in self.outputs:
            if spec.name == name:
                return spec.datatype
        return triton_from_numpy(dtype)

    def validate(self, request: InferRequest) -> None:
        """Check names, datatypes, ranks, dims and batch size; set `request.batch_size`.

        Raises InvalidInputError naming the tensor and what was expected.
        """
        given = request.inputs
        specs = self.inputs
        # Every declared input given, nothing else (the common case): no sets to build.
        if len(given) != len(specs) or not all(map(given.__contains__, self.input_names)):
            self._check_names(list(given))
        batch: int | None = None
        for spec in specs:
            array = given.get(spec.name)
            if array is None:
                continue
            if array.dtype != numpy_dtype(spec.datatype):
                raise InvalidInputError(
                    f"input '{spec.name}' has datatype {request.datatypes.get(spec.name, '?')}, "
                    f"model '{self.name}' expects {spec.datatype}"
                )
            shape = array.shape
            dims = shape
            if self.batching:
                if not shape:
                    raise InvalidInputError(
                        f"input '{spec.name}' has shape [], expected [-1,"
                        f"{','.join(map(str, spec.dims))}] (first dimension is the batch)"
                    )
                if batch is None:
                    batch = shape[0]
                elif shape[0] != batch:
                    raise InvalidInputError(
                        f"input '{spec.name}' has batch size {shape[0]} but other inputs have "
                        f"batch size {batch}: all inputs must share the first dimension"
                    )
                dims = shape[1:]
            # Equal tuples first: the common case, one comparison in C.
            if dims != spec.dims and not _dims_match(dims, spec.dims):
                want = ([-1] if self.batching else []) + list(spec.dims)
                raise InvalidInputError(
                    f"unexpected shape for input '{spec.name}' for model '{self.name}'. "
                    f"Expected {_fmt(want)}, got {_fmt(shape)}"
                )
        if self.batching:
            assert batch is not None
            if batch < 1:
                raise InvalidInputError(
                    f"inference request batch-size must be >= 1 for '{self.name}', got {batch}"
                )
            if batch > self.max_batch_size:
                raise InvalidInputError(
                    f"inference request batch-size must be <= {self.max_batch_size} for "
                    f"'{self.name}', got {batch}"
                )
            request.batch_size = batch
        else:
            request.batch_size = 1
        requested = request.requested_outputs
        for name in requested:
            if name not in self._output_names:
                known = self.output_names()
                raise InvalidInputError(
                    f"unexpected inference output '{name}' for model '{self.name}', "
                    f"expected outputs {sorted(known)}"
                )
        if len(requested) > 1 and len(set(requested)) != len(requested):
            # As Triton: asked twice it would have to choose which options (binary_data,
            # class_count) the answer follows.
            twice = next(n for i, n in enumerate(requested) if n in requested[:i])
            raise InvalidInputError(
                f"output '{twice}' already exists in request (request each output once)"
            )

    def _check_names(self, given: list[str]) -> None:
        """`given`: the request's input names, in its order. Triton's words."""
        expected = {s.name for s in self.inputs}
        extra = sorted(set(given) - expected)
        if extra:
            raise InvalidInputError(
                f"unexpected inference input '{extra[0]}' for model '{self.name}', "
                f"expected inputs {sorted(expected)}"
            )
        required = [s.name for s in self.inputs if not s.optional]
        missing = [name for name in required if name not in given]
        if missing:
            if len(required) == len(self.inputs):
                count = f"expected {len(required)} inputs"
            else:
                count = f"expected number of inputs between {len(required)} and {len(self.inputs)}"
            raise InvalidInputError(
                f"{count} but got {len(given)} inputs for model '{self.name}'. Got input(s) "
                f"{_names(given)}, but missing required input(s) {_names(missing)}. Please "
                f"provide all required input(s)."
            )


def _names(names: list[str]) -> str:
    return "[" + ",".join(f"'{n}'" for n in names) + "]"


def _dims_match(actual: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    if len(actual) != len(declared):
        return False
    return all(d == -1 or a == d for a, d in zip(actual, declared, strict=True))


def _fmt(shape: Any) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


@dataclass(slots=True)
class InferRequest:
    """One inference request after decoding. Arrays may be read-only views on the wire buffer."""

    model_name: str
    model_version: str
    request_id: str
    inputs: dict[str, np.ndarray]
    requested_outputs: tuple[str, ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)
    # Datatype names as the client sent them (for error messages only).
    datatypes: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    timeout_us: int = 0
    # Outputs asked for as top-N classes (Triton's classification extension): name -> N.
    classification: Mapping[str, int] = field(default_factory=dict)
    # Monotonic arrival time; durations and queue deadlines are measured from it.
    arrival_ns: int = field(default_factory=time.monotonic_ns)
    # Set by ModelSpec.validate: the request's own batch dimension (1 for non-batching models).
    batch_size: int = 1


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    request_id: str
    outputs: dict[str, np.ndarray]
    parameters: Mapping[str, Any] = field(default_factory=dict)
