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
    # Empty maps are the common case: their truth test is far cheaper than iterating them (this
    # runs on the event loop for every request).
    params = (
        {key: parameter_value(value) for key, value in msg.parameters.items()}
        if msg.parameters
        else {}
    )
    raw = msg.raw_input_contents
    if raw:
        # Before the count check, so the answer names the input (Triton's words).
        for tensor in msg.inputs:
            if tensor.HasField("contents"):
                raise InvalidInputError(
                    f"contents field must not be specified when using raw_input_contents for "
                    f"'{tensor.name}' for model '{msg.model_name}': send every input in "
                    f"raw_input_contents or every input in contents"
                )
    if raw and len(raw) != len(msg.inputs):
        raise InvalidInputError(
            f"expected {len(msg.inputs)} raw_input_contents (one per input), got {len(raw)}"
        )
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for i, tensor in enumerate(msg.inputs):
        if tensor.name in inputs:
            raise InvalidInputError(f"input '{tensor.name}' appears more than once")
        if tensor.parameters and any(k in tensor.parameters for k in _UNSUPPORTED_TENSOR_PARAMS):
            raise UnsupportedError(
                f"input '{tensor.name}': shared memory is not supported by pipeserve; send "
                f"the tensor in the request"
            )
        datatypes[tensor.name] = tensor.datatype
        inputs[tensor.name] = _decode_tensor(tensor, raw[i] if raw else None)
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
        model_name=msg.model_name,
        model_version=msg.model_version,
        request_id=msg.id,
        inputs=inputs,
        requested_outputs=tuple(requested),
        parameters=params,
        datatypes=datatypes,
        priority=_int_param(params, "priority") if params else 0,
        timeout_us=_int_param(params, "timeout") if params else 0,
        classification=classification,
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


def _decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    dtype = numpy_dtype(datatype) if datatype else None
    if dtype is None:
        raise InvalidInputError(f"input '{name}' has no datatype")
    shape = tuple(tensor.shape)
    if shape and min(shape) < 0:
        raise InvalidInputError(f"input '{name}' has shape {list(shape)}: dimensions must be >= 0")
    count = math.prod(shape)
    if raw is not None:  # decode_request refused typed contents next to raw ones
        # A read-only view on the request's buffer for fixed-size datatypes: no copy.
        return array_from_raw(name, datatype, shape, raw)
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
        if datatype == "BYTES":
            msg.raw_output_contents.append(serialize_bytes(array))
        else:
            expected = numpy_dtype(datatype)
            if array.dtype != expected:
                array = array.astype(expected)
            msg.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return msg
