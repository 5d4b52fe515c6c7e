"""Protobuf <-> numpy for inference messages.

Decoding makes read-only numpy views on the request's raw buffers (no copies); typed `contents`
are accepted too. Encoding writes one `raw_output_contents` entry per output. Every malformed
tensor is an InvalidInputError naming the tensor and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeserve.api.generated import grpc_service_pb2 as pb
from pipeserve.api.kept_heads import RequestForm
from pipeserve.classification import PARAMETER as CLASSIFICATION
from pipeserve.classification import class_count
from pipeserve.errors import InvalidInputError, UnsupportedError
from pipeserve.inference import InferRequest, InferResponse, ModelSpec
from pipeserve.tensors import (
    array_from_raw,
    numpy_dtype,
    serialize_bytes,
    shape_overflow,
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


@dataclass(frozen=True, slots=True, eq=False)
class RequestHead:
    """All a ModelInferRequest with raw_input_contents says besides those bytes and its id:
    the model and the checked form (api/kept_heads.py). The same for every request a client
    sends with the same header, so api/request_wire.py keeps it. Compared and hashed by
    identity (a key of ServedVersion.submit)."""

    model_name: str
    model_version: str
    form: RequestForm

    def request(self, raw: Sequence[bytes | memoryview], request_id: str) -> InferRequest:
        """The request of this head with `raw` (one entry per input, in order: the caller has
        counted them) as its tensors."""
        return self.form.request(self.model_name, self.model_version, request_id, raw)


def decode_request(msg: pb.ModelInferRequest) -> InferRequest:
    # This runs on the event loop for every request that the own transport's fast path
    # (api/request_wire.py) does not take: each protobuf field access costs, so every field is
    # read once and the inputs are walked once.
    raw = msg.raw_input_contents
    inputs: dict[str, np.ndarray] = {}
    if raw:
        # The head's checks and the tensors in one walk (a head is worth building only to be
        # kept).
        _, datatypes = _raw_tensors(msg, len(raw), raw, inputs)
    else:
        datatypes = {}
        for tensor in msg.inputs:
            name = tensor.name
            _check_tensor(tensor, name, inputs)
            datatype = tensor.datatype
            datatypes[name] = datatype
            inputs[name] = _decode_contents(tensor, name, datatype)
    params, requested, classification, priority, timeout_us = _rest_of(msg)
    return InferRequest(
        msg.model_name,
        msg.model_version,
        msg.id,
        inputs,
        requested,
        params,
        datatypes,
        priority,
        timeout_us,
        classification,
    )


def decode_head(msg: pb.ModelInferRequest, raw_count: int) -> RequestHead:
    """The head of a request that carries `raw_count` (> 0) raw_input_contents entries; `msg`'s
    own raw_input_contents and id are not read. Raises for every fault but a tensor's byte
    count."""
    tensors, datatypes = _raw_tensors(msg, raw_count)
    params, requested, classification, priority, timeout_us = _rest_of(msg)
    form = RequestForm(tensors, requested, params, datatypes, priority, timeout_us, classification)
    return RequestHead(msg.model_name, msg.model_version, form)


def _rest_of(
    msg: pb.ModelInferRequest,
) -> tuple[dict[str, Any], tuple[str, ...], dict[str, int], int, int]:
    """A request's parameters, outputs asked for, classification counts, priority, timeout."""
    params = _parameters(msg)
    requested, classification = _outputs(msg)
    priority = _int_param(params, "priority") if params else 0
    timeout_us = _int_param(params, "timeout") if params else 0
    return params, requested, classification, priority, timeout_us


def _raw_tensors(
    msg: pb.ModelInferRequest,
    raw_count: int,
    raw: Sequence[bytes] = (),
    arrays: dict[str, np.ndarray] | None = None,
) -> tuple[tuple[tuple[str, str, tuple[int, ...]], ...], dict[str, str]]:
    """Each input's (name, datatype, shape), checked, for `raw_count` raw_input_contents
    entries; and the datatypes by name. With `raw` (those entries) each tensor goes into
    `arrays` too, as soon as its head is checked."""
    tensors = msg.inputs
    if raw_count != len(tensors):
        _refuse_mixed_contents(msg)  # checked first: Triton's answer names that input
        raise InvalidInputError(
            f"expected {len(tensors)} raw_input_contents (one per input), got {raw_count}"
        )
    heads: list[tuple[str, str, tuple[int, ...]]] = []
    datatypes: dict[str, str] = {}
    for tensor in tensors:
        name = tensor.name
        _check_tensor(tensor, name, datatypes)
        if tensor.HasField("contents"):
            _refuse_mixed_contents(msg)
        datatype = tensor.datatype
        _dtype(name, datatype)  # a missing or unknown datatype is named before the shape
        datatypes[name] = datatype
        shape = _shape(name, tensor.shape)
        if arrays is not None:
            # A read-only view on the request's buffer for fixed-size datatypes: no copy.
            arrays[name] = array_from_raw(name, datatype, shape, raw[len(heads)], msg.model_name)
        heads.append((name, datatype, shape))
    return tuple(heads), datatypes


def _parameters(msg: pb.ModelInferRequest) -> dict[str, Any]:
    # An empty map is only truth-tested (far cheaper than iterating it), a full one read by
    # key: perf_analyzer sends one parameter with every request, and keys and lookups cost
    # less than the map's items() view.
    wire = msg.parameters
    return {key: parameter_value(wire[key]) for key in wire} if wire else {}


def _check_tensor(
    tensor: pb.ModelInferRequest.InferInputTensor, name: str, seen: Mapping[str, object]
) -> None:
    if name in seen:
        raise InvalidInputError(f"input '{name}' already exists in request (send each input once)")
    if tensor.parameters and any(k in tensor.parameters for k in _UNSUPPORTED_TENSOR_PARAMS):
        raise UnsupportedError(
            f"input '{name}': shared memory is not supported by pipeserve; send the tensor "
            f"in the request"
        )


def _outputs(msg: pb.ModelInferRequest) -> tuple[tuple[str, ...], dict[str, int]]:
    """The outputs asked for, in order, and those asked for as top-N classes."""
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
    return tuple(requested), classification


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
        raise shape_overflow(name, shape, datatype) or InvalidInputError(
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
