"""Reading ONNX external-data fields without touching the weights.

An initializer stored outside the graph carries `location`, `offset` and `length` entries (ONNX's
own fields) and, in graphs onnxruntime optimised with
`session.save_external_prepacked_constant_initializers`, `prepacked_<n>` entries whose value is
`key|offset;length;checksum[|offset;length;checksum...]` (onnxruntime's format: blobs of weights
already laid out for its CPU kernels). Everything here works on a graph loaded with
`onnx.load(path, load_external_data=False)` and never reads a weight byte.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from pipeserve.errors import ModelLoadError

# Element types stored two to a byte.
_FOUR_BIT_TYPES = frozenset(
    getattr(TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(TensorProto, name)
)


@dataclass(frozen=True, slots=True)
class PrepackedBlob:
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Prepacked:
    """One `prepacked_<n>` entry: onnxruntime's kernel key and the blobs stored under it."""

    entry_key: str  # "prepacked_1"
    kernel_key: str  # "MatMul+<hash of the packed bytes>"
    blobs: tuple[PrepackedBlob, ...]

    def encode(self) -> str:
        parts = [f"{b.offset};{b.length};0" for b in self.blobs]
        return "|".join([self.kernel_key, *parts])


@dataclass(frozen=True, slots=True)
class ExternalRef:
    """Where one initializer's bytes live, as its TensorProto says."""

    name: str
    location: str  # relative to the graph file's folder
    offset: int
    length: int  # declared, or computed from dims and type when the field is absent
    data_type: int  # ONNX element type
    dims: tuple[int, ...]
    prepacked: tuple[Prepacked, ...] = ()


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph under it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def iter_initializers(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every initializer of the model, subgraphs included."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def is_sub_byte(data_type: int) -> bool:
    """Types stored two elements to a byte (no numpy view of them element by element)."""
    return data_type in _FOUR_BIT_TYPES


@functools.cache
def _itemsize(data_type: int) -> int:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def element_nbytes(data_type: int, count: int) -> int:
    """Bytes taken by `count` elements of ONNX type `data_type` in raw (little-endian) form."""
    if data_type in _FOUR_BIT_TYPES:
        return (count + 1) // 2
    if data_type == TensorProto.STRING:
        raise ValueError("string tensors have no fixed raw size")
    return count * _itemsize(data_type)


def tensor_nbytes(tensor: TensorProto) -> int:
    """Raw size implied by dims and element type."""
    return element_nbytes(tensor.data_type, math.prod(tensor.dims))


@functools.cache
def _location_is_safe(location: str) -> bool:
    path = Path(location)
    return not path.is_absolute() and ".." not in path.parts


def _parse_int(value: str, what: str, tensor: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ModelLoadError(
            f"initializer '{tensor}': external-data field '{what}' is '{value}', "
            f"expected a non-negative integer"
        ) from None
    if number < 0:
        raise ModelLoadError(
            f"initializer '{tensor}': external-data field '{what}' is {number}, "
            f"expected a non-negative integer"
        )
    return number


def _parse_prepacked(key: str, value: str, tensor: str) -> Prepacked:
    fields = value.split("|")
    blobs = []
    for blob in fields[1:]:
        parts = blob.split(";")
        if len(parts) != 3:
            raise ModelLoadError(
                f"initializer '{tensor}': external-data field '{key}' has blob '{blob}', "
                f"expected 'offset;length;checksum'"
            )
        blobs.append(
            PrepackedBlob(
                _parse_int(parts[0], f"{key} offset", tensor),
                _parse_int(parts[1], f"{key} length", tensor),
            )
        )
    return Prepacked(key, fields[0], tuple(blobs))


def external_ref(tensor: TensorProto) -> ExternalRef:
    """Parse the external-data fields of `tensor` (which must be external)."""
    fields = {entry.key: entry.value for entry in tensor.external_data}
    location = fields.get("location", "")
    if not location:
        raise ModelLoadError(f"initializer '{tensor.name}': external data without a 'location'")
    if not _location_is_safe(location):
        # onnxruntime refuses these too; say so before it does, naming the tensor.
        raise ModelLoadError(
            f"initializer '{tensor.name}': external-data location '{location}' must be a "
            f"relative path inside the model folder"
        )
    offset = _parse_int(fields.get("offset", "0") or "0", "offset", tensor.name)
    expected = tensor_nbytes(tensor)
    length_field = fields.get("length", "")
    length = _parse_int(length_field, "length", tensor.name) if length_field else expected
    if length != expected:
        raise ModelLoadError(
            f"initializer '{tensor.name}': external-data length is {length} bytes but its shape "
            f"{list(tensor.dims)} of {TensorProto.DataType.Name(tensor.data_type)} needs "
            f"{expected}"
        )
    prepacked = tuple(
        _parse_prepacked(key, value, tensor.name)
        for key, value in fields.items()
        if key.startswith("prepacked")
    )
    return ExternalRef(
        tensor.name, location, offset, length, tensor.data_type, tuple(tensor.dims), prepacked
    )


def external_refs(model: onnx.ModelProto) -> list[ExternalRef]:
    """Every external initializer of `model` (subgraphs included), in graph order."""
    return [external_ref(t) for t in iter_initializers(model) if is_external(t)]


def set_external(
    tensor: TensorProto,
    location: str,
    offset: int,
    length: int,
    prepacked: tuple[Prepacked, ...] = (),
) -> None:
    """Point `tensor` at `location`/`offset`/`length`, dropping any inline data."""
    for field in (
        "raw_data",
        "float_data",
        "int32_data",
        "int64_data",
        "double_data",
        "uint64_data",
        "string_data",
    ):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key = key
        entry.value = value
    for blob_set in prepacked:
        entry = tensor.external_data.add()
        entry.key = blob_set.entry_key
        entry.value = blob_set.encode()
