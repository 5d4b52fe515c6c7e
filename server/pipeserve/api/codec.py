"""Protobuf <-> numpy for inference messages.

Decoding makes read-only numpy views on the request's raw buffers (no copies); typed `contents`
are accepted too. Encoding writes one `raw_output_contents` entry per output. Every malformed
tensor is an InvalidInputError naming the tensor and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeserve.api.generated import grpc_service_pb2 as pb
from pipeserve.classification import PARAMETER as CLASSIFICATION
from pipeserve.classification import class_count
from pipeserve.errors import InvalidInputError, UnsupportedError
from pipeserve.inference import InferRequest, InferResponse, ModelSpec
from pipeserve.tensors import (
    array_from_raw,
    numpy_dtype,
    serialize_bytes,
    utf8_element,
)

# Which typed `contents` field carries each datatype (FP16/BF16 have none: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_UNSUPPORTED_TENSOR_PARAMS = ("shared_memory_region", "shared_memory_byte_size")


def parameter_value(param: pb.InferParameter) -> Any:
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def decode_request(msg: pb.ModelInferRequest) -> InferRequest:
    # This runs on the event loop for every request: each protobuf field access costs, so every
    # field is read once, the inputs are walked once, and empty maps are only truth-tested (far
    # cheaper than iterating them). A map is read by key: perf_analyzer sends one parameter with
    # every request, and keys and lookups cost less than the map's items() view.
    wire = msg.parameters
    params = {key: parameter_value(wire[key]) for key in wire} if wire else {}
    tensors = msg.inputs
    raw = msg.raw_input_contents
    if raw and len(raw) != len(tensors):
        _refuse_mixed_contents(msg)  # checked first: Triton's answer names that input
        raise InvalidInputError(
            f"expected {len(tensors)} raw_input_contents (one per input), got {len(raw)}"
        )
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for i, tensor in enumerate(tensors):
        name = tensor.name
        if name in inputs:
            raise InvalidInputError(f"input '{name}' appears more than once")
        if tensor.parameters and any(k in tensor.parameters for k in _UNSUPPORTED_TENSOR_PARAMS):
            raise UnsupportedError(
                f"input '{name}': shared memory is not supported by pipeserve; send "
                f"the tensor in the request"
            )
        datatype = tensor.datatype
        datatypes[name] = datatype
        if raw:
            if tensor.HasField("contents"):
                _refuse_mixed_contents(msg)
            inputs[name] = _decode_raw(name, datatype, tensor.shape, raw[i])
        else:
            inputs[name] = _decode_contents(tensor, name, datatype)
    requested = []
    classification: dict[str, int] = {}
    for out in msg.outputs:
        if out.parameters:
            if any(key in out.parameters for key in _UNSUPPORTED_TENSOR_PARAMS):
                raise UnsupportedError(f"output '{out.name}': shared memory is not supported")
            if CLASSIFICATION in out.parameters:
                classification[out.name] = class_count(
                    parameter_value(out.parameters[CLASSIFICATION])
                )
        requested.append(out.name)
    return InferRequest(
        msg.model_name,
        msg.model_version,
        msg.id,
        inputs,
        tuple(requested),
        params,
        datatypes,
        _int_param(params, "priority") if params else 0,
        _int_param(params, "timeout") if params else 0,
        classification,
    )


def _refuse_mixed_contents(msg: pb.ModelInferRequest) -> None:
    """Raises when an input has typed contents next to raw_input_contents (the first such)."""
    for tensor in msg.inputs:
        if tensor.HasField("contents"):
            raise InvalidInputError(
                f"contents field must not be specified when using raw_input_contents for "
                f"'{tensor.name}' for model '{msg.model_name}': send every input in "
                f"raw_input_contents or every input in contents"
            )


def _int_param(params: Mapping[str, Any], key: str) -> int:
    value = params.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(
            f"request parameter '{key}' must be an int64 or uint64, got {type(value).__name__}"
        )
    if value < 0:
        raise InvalidInputError(f"request parameter '{key}' must be >= 0, got {value}")
    return value


def _dtype(name: str, datatype: str) -> np.dtype:
    if not datatype:
        raise InvalidInputError(f"input '{name}' has no datatype")
    return numpy_dtype(datatype)  # an unknown name raises, naming the known datatypes


def _shape(name: str, dims: Any) -> tuple[int, ...]:
    shape = tuple(dims[:])  # a slice of the repeated field first: half the cost of iterating it
    if shape and min(shape) < 0:
        raise InvalidInputError(f"input '{name}' has shape {list(shape)}: dimensions must be >= 0")
    return shape


def _decode_raw(name: str, datatype: str, dims: Any, raw: bytes) -> np.ndarray:
    _dtype(name, datatype)  # a missing or unknown datatype is named before the shape
    # A read-only view on the request's buffer for fixed-size datatypes: no copy.
    return array_from_raw(name, datatype, _shape(name, dims), raw)


def _decode_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, name: str, datatype: str
) -> np.ndarray:
    dtype = _dtype(name, datatype)
    shape = _shape(name, tensor.shape)
    count = math.prod(shape)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInputError(
            f"input '{name}': datatype {datatype} can only be sent in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInputError(
            f"input '{name}' got {len(values)} elements in contents.{field}, expected {count} "
            f"for shape {list(shape)}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        for i, value in enumerate(values):
            array[i] = utf8_element(value, i, name)
        return array.reshape(shape)
    # Typed contents arrive as a repeated field; one conversion into the target dtype.
    try:
        return np.fromiter(values, dtype=dtype, count=count).reshape(shape)
    except OverflowError:
        # int_contents / uint_contents are 32-bit on the wire: INT8/16 and UINT8/16 values may
        # not fit the tensor's datatype.
        raise InvalidInputError(
            f"input '{name}': a value in contents.{field} does not fit {datatype}"
        ) from None


def encode_response(response: InferResponse, spec: ModelSpec) -> pb.ModelInferResponse:
    msg = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.request_id,
    )
    for name, array in response.outputs.items():
        datatype = spec.output_datatype(name, array.dtype)
        out = msg.outputs.add()
        out.name = name
        out.datatype = datatype
        out.shape.extend(array.shape)
        msg.raw_output_contents.append(raw_output(array, datatype))
    return msg


def raw_output(array: np.ndarray, datatype: str) -> bytes:
    """One output's raw_output_contents entry: its elements as `datatype` (converted when the
    array's dtype differs), BYTES length-prefixed."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    expected = numpy_dtype(datatype)
    if array.dtype != expected:
        array = array.astype(expected)
    return np.ascontiguousarray(array).tobytes()
