"""KServe v2 REST inference bodies <-> InferRequest / InferResponse, with Triton's binary tensor
data extension.

A request body is a JSON inference header, optionally followed by binary sections: when the
`Inference-Header-Content-Length` header is given, the first that many bytes are the JSON and the
rest holds, in input order, one section per input whose `parameters.binary_data_size` is set.
A header length of 0 is Triton's raw binary request: the whole body is the data of the model's
only input, its shape deduced from the byte size (decode_raw).
Binary sections become read-only numpy views on the body (no copy); JSON `data` is converted by
numpy in one call (flattened in row-major order, or nested exactly as `shape`). Every malformed
body is an InvalidInputError naming what was wrong and what was expected.

A response is JSON, or JSON followed by binary sections for the outputs asked for in binary
(`binary_data` per output, `binary_data_output` for all): then `header_length` is the JSON's size,
sent back as `Inference-Header-Content-Length`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from pipeserve.api.http.binary_heads import BinaryHead, BinaryHeads
from pipeserve.api.kept_heads import RequestForm
from pipeserve.classification import PARAMETER as CLASSIFICATION
from pipeserve.classification import class_count
from pipeserve.errors import InvalidInputError, UnsupportedError
from pipeserve.inference import InferRequest, InferResponse, ModelSpec
from pipeserve.tensors import (
    BF16_DTYPE,
    array_from_raw,
    element_size,
    numpy_dtype,
    serialize_bytes,
    shape_overflow,
    utf8_element,
)

INFER_HEADER = b"inference-header-content-length"
_SHARED_MEMORY_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
# numpy kinds a JSON array may come out as, per datatype family: bool only for BOOL, integers
# for integer types (no silent truncation of 1.5), integers or floats for floating point.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_EXPECTED = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}
# Request parameters with a meaning of their own, checked here, not passed to the model.
_UINT_PARAMS = ("priority", "timeout")
# JSON `data` may nest its values any way (it is read in row-major order, as Triton reads it),
# up to Triton's depth limit.
MAX_DATA_NESTING = 100


@dataclass(frozen=True, slots=True)
class OutputChoice:
    """How each output goes back: in binary or as JSON `data`."""

    default_binary: bool = False
    binary: Mapping[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.default_binary)


@dataclass(frozen=True, slots=True)
class EncodedResponse:
    chunks: list[bytes | memoryview]
    # Size of the JSON part when binary sections follow it, else None (all JSON).
    header_length: int | None

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks)


def header_length(value: bytes | None, body_size: int) -> int | None:
    """The parsed `Inference-Header-Content-Length`; None when absent (the body is all JSON), 0
    for a raw binary request (no JSON at all)."""
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    try:
        length = int(text)
    except ValueError:
        raise InvalidInputError(
            f"Unable to parse Inference-Header-Content-Length, got: {text!r} (expected the byte "
            f"size of the JSON inference header)"
        ) from None
    if not 0 <= length <= body_size:
        raise InvalidInputError(
            f"inference header size should be in range [0, {body_size}], got: {length} "
            f"(Inference-Header-Content-Length must not exceed the body size)"
        )
    return length


def parse_json(data: bytes | memoryview, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        error = exc
    # Triton reads NaN, Infinity and -Infinity as numbers (rapidjson's kParseNanAndInfFlag), and
    # writes them so (_json_data): a client that sends back what it received must not be
    # refused. orjson reads only strict JSON, so such a body is read again by the standard
    # library, which takes those three words: the cost falls on bodies that hold them alone.
    raw = bytes(data)
    if b"NaN" in raw or b"Infinity" in raw:
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested past its depth
            pass
    raise InvalidInputError(f"malformed JSON in the {what}: {error}") from None


def decode_infer(
    model_name: str,
    model_version: str,
    body: bytes,
    header_size: int | None,
    heads: BinaryHeads | None = None,
) -> tuple[InferRequest, OutputChoice, BinaryHead | None]:
    """The request, how its outputs go back, and its kept head when it has one (`heads`: the
    table to read and fill, api/http/binary_heads.py)."""
    view = memoryview(body)
    header = b""
    if heads is not None and header_size is not None:
        header = body[:header_size]
        head = heads.get(header)
        if head is not None and len(body) == header_size + head.sections_size:
            return head.request(model_name, model_version, view, header_size), head.choice, head
    json_end = len(body) if header_size is None else header_size
    doc = parse_json(view[:json_end], "inference request")
    if not isinstance(doc, dict):
        raise InvalidInputError(
            f"the inference request must be a JSON object, got {_json_type(doc)}"
        )
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInputError(f"'id' must be a string, got {_json_type(request_id)}")
    # This runs on the event loop for every request: empty maps (the common case) are only
    # truth-tested, and the checks below skip what is absent.
    params = _object(doc.get("parameters"), "request 'parameters'")
    default_binary = False
    if params:
        for key in params:
            if key.startswith("triton_"):
                raise InvalidInputError(
                    "parameter keys starting with 'triton_' are reserved for Triton usage and "
                    "should not be specified."
                )
        default_binary = _bool(params.pop("binary_data_output", False), "binary_data_output")
        for key in _UINT_PARAMS:
            if key in params:
                _uint(params[key], f"request parameter '{key}'")

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidInputError(
            f"'inputs' must be a JSON array of input tensors, got {_json_type(raw_inputs)}"
        )
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    # (name, datatype, shape, bytes) of each binary input, for a kept head; None once an
    # input comes as JSON data (its values are in the header: not worth keeping).
    sections: list[tuple[str, str, tuple[int, ...], int]] | None = []
    offset = json_end
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise InvalidInputError(f"inputs[{i}] must be a JSON object, got {_json_type(raw)}")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"inputs[{i}] needs a 'name' string")
        if name in inputs:
            raise InvalidInputError(
                f"input '{name}' already exists in request (send each input once)"
            )
        datatype = raw.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInputError(f"input '{name}' needs a 'datatype' string")
        numpy_dtype(datatype)  # an unknown name fails here, naming the known ones
        shape = _shape(raw.get("shape"), name)
        tensor_params = raw.get("parameters")
        if tensor_params is None:
            tensor_params = {}
        elif not isinstance(tensor_params, dict):
            raise InvalidInputError(
                f"input '{name}' 'parameters' must be a JSON object, "
                f"got {_json_type(tensor_params)}"
            )
        if tensor_params and any(key in tensor_params for key in _SHARED_MEMORY_PARAMS):
            raise UnsupportedError(
                f"input '{name}': shared memory is not supported by pipeserve; send the tensor in "
                f"the request"
            )
        datatypes[name] = datatype
        if "binary_data_size" in tensor_params:
            size = _uint(tensor_params["binary_data_size"], f"input '{name}' 'binary_data_size'")
            if "data" in raw:
                raise InvalidInputError(
                    f"input '{name}' has both 'data' and a 'binary_data_size' parameter; send one"
                )
            if header_size is None:
                raise InvalidInputError(
                    f"input '{name}' has a 'binary_data_size' parameter but the request has no "
                    f"Inference-Header-Content-Length header: it must give the size of the JSON "
                    f"header so the binary sections can be found"
                )
            if offset + size > len(body):
                raise InvalidInputError(
                    f"unexpected size for input '{name}', expecting {offset + size - len(body)} "
                    f"additional bytes for model '{model_name}' (binary_data_size {size}, "
                    f"{len(body) - offset} bytes left in the body)"
                )
            inputs[name] = array_from_raw(
                name, datatype, shape, view[offset : offset + size], model_name
            )
            offset += size
            if sections is not None:
                sections.append((name, datatype, shape, size))
        elif "data" in raw:
            inputs[name] = _from_json(raw["data"], name, datatype, shape)
            sections = None
        else:
            raise InvalidInputError(
                f"input '{name}' has neither 'data' nor a 'binary_data_size' parameter"
            )
    if offset != len(body):
        raise InvalidInputError(
            f"unexpected additional input data for model '{model_name}': {len(body) - offset} "
            f"bytes after the last binary input section"
        )

    requested, binary, classification = _outputs(doc.get("outputs"))
    priority = int(params.get("priority", 0)) if params else 0
    timeout_us = int(params.get("timeout", 0)) if params else 0
    choice = OutputChoice(default_binary, binary)
    kept = None
    # A header with an id is not kept: clients that send one change it with every request, so
    # each would only push out a kept head.
    if heads is not None and header_size is not None and sections and not request_id:
        tensors = tuple((name, datatype, shape) for name, datatype, shape, _ in sections)
        form = RequestForm(
            tensors, requested, params, datatypes, priority, timeout_us, classification
        )
        kept = BinaryHead(form, tuple(size for *_, size in sections), choice)
        heads.keep(header, kept)
    request = InferRequest(
        model_name,
        model_version,
        request_id,
        inputs,
        requested,
        params,
        datatypes,
        priority,
        timeout_us,
        classification,
    )
    return request, choice, kept


def decode_raw(
    model_name: str, model_version: str, body: bytes, spec: ModelSpec
) -> tuple[InferRequest, OutputChoice]:
    """Triton's raw binary request (Inference-Header-Content-Length: 0): `body` is the data of
    the model's only input, batch 1 for a batching model; its shape is the declared one with at
    most one variable dimension, sized from the byte count (a BYTES input must be declared [1]:
    the body is its one element). Every output comes back in binary."""
    if len(spec.inputs) != 1:
        raise InvalidInputError(
            f"Raw request must only have 1 input (found 1) to be deduced but got "
            f"{len(spec.inputs)} inputs in '{model_name}' model configuration (a raw binary "
            f"request, Inference-Header-Content-Length 0, has no JSON header to name inputs)"
        )
    declared = spec.inputs[0]
    shape = [1] if spec.batching else []
    variable = -1
    count = 1
    for dim in declared.dims:
        if dim < 0:
            if variable != -1:
                raise InvalidInputError(
                    f"The shape of the raw input '{declared.name}' can not be deduced because "
                    f"there are more than one variable-sized dimension (declared "
                    f"{list(declared.dims)}); send a JSON inference header with the shape"
                )
            variable = len(shape)
        else:
            count *= dim
        shape.append(dim)
    if declared.datatype == "BYTES":
        if variable != -1 or count != 1:
            raise InvalidInputError(
                f"For BYTE datatype raw input '{declared.name}', the model must have input "
                f"shape [1] (declared {list(declared.dims)})"
            )
        array = np.empty(shape, dtype=np.object_)
        array.flat[0] = utf8_element(body, 0, declared.name)  # as every BYTES input element
    else:
        if variable != -1:
            unit = count * element_size(declared.datatype)
            if unit == 0 or len(body) % unit:
                raise InvalidInputError(
                    f"raw input '{declared.name}': a body of {len(body)} bytes is not a whole "
                    f"number of {declared.datatype} elements of shape {list(declared.dims)} "
                    f"({unit} bytes per step of the variable dimension)"
                )
            shape[variable] = len(body) // unit
        array = array_from_raw(
            declared.name, declared.datatype, tuple(shape), memoryview(body), model_name
        )
    return (
        InferRequest(
            model_name=model_name,
            model_version=model_version,
            request_id="",
            inputs={declared.name: array},
            requested_outputs=(),
            parameters={},
            datatypes={declared.name: declared.datatype},
        ),
        OutputChoice(default_binary=True),
    )


def _outputs(raw_outputs: Any) -> tuple[tuple[str, ...], dict[str, bool], dict[str, int]]:
    """(requested names, binary_data choices, classification counts) of the `outputs` array."""
    if raw_outputs is None:
        return (), {}, {}
    if not isinstance(raw_outputs, list):
        raise InvalidInputError(
            f"'outputs' must be a JSON array of requested outputs, got {_json_type(raw_outputs)}"
        )
    names: list[str] = []
    binary: dict[str, bool] = {}
    classification: dict[str, int] = {}
    for i, out in enumerate(raw_outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInputError(f"outputs[{i}] must be a JSON object with a 'name' string")
        name = out["name"]
        params = out.get("parameters")
        if params is None:
            names.append(name)  # the common case: nothing more to read
            continue
        params = _object(params, f"output '{name}' 'parameters'")
        if any(key in params for key in _SHARED_MEMORY_PARAMS):
            raise UnsupportedError(f"output '{name}': shared memory is not supported")
        if CLASSIFICATION in params:  # applied by the DataPlane, as for gRPC
            classification[name] = class_count(params[CLASSIFICATION])
        if "binary_data" in params:
            binary[name] = _bool(params["binary_data"], f"output '{name}' 'binary_data'")
        names.append(name)
    return tuple(names), binary, classification


def _from_json(data: Any, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """JSON `data` -> an array of `shape`: converted by numpy in one call when it is flat or
    nested as the shape (what clients send), else read in row-major order whatever its
    nesting, as Triton reads it."""
    count = math.prod(shape)
    if not isinstance(data, list):
        raise InvalidInputError(
            f"input '{name}': 'data' must be a JSON array (flattened or nested as the shape "
            f"{list(shape)}), got {_json_type(data)}"
        )
    if datatype in ("FP16", "BF16"):
        raise InvalidInputError(
            f"receiving {datatype} data via JSON is not supported. Please use the binary data "
            f"format for input {name}"
        )
    try:
        array = np.array(data)
    except ValueError:  # ragged, or nested deeper than numpy's dimensions
        array = None
    if array is not None and array.ndim == 1 and array.size == 0:
        array = array.astype(np.float64)  # [] has no kind of its own
    if array is None or (array.shape != shape and array.ndim != 1):
        data = _flattened(data, name)
        array = np.array(data)
    if array.size != count:
        raise shape_overflow(name, shape, datatype) or InvalidInputError(
            f"input '{name}': 'data' holds {array.size} values, expected {count} (the shape "
            f"{list(shape)}), flattened or nested"
        )
    if datatype == "BYTES":
        # Not via numpy's fixed-width str dtype: it would drop trailing NUL characters.
        strings = np.array(data, dtype=np.object_)
        if strings.shape != array.shape or not all(isinstance(v, str) for v in strings.flat):
            raise InvalidInputError(
                f"input '{name}': BYTES 'data' must hold JSON strings, got {_kind(array)}"
            )
        return strings.reshape(shape)
    dtype = numpy_dtype(datatype)
    if array.size and array.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise InvalidInputError(
            f"input '{name}': {datatype} 'data' must hold {_EXPECTED[dtype.kind]}, "
            f"got {_kind(array)}"
        )
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InvalidInputError(
                f"input '{name}': value {bad} in 'data' does not fit {datatype} "
                f"({info.min}..{info.max})"
            )
    return array.astype(dtype).reshape(shape)


def _flattened(data: list[Any], name: str) -> list[Any]:
    """The values of nested `data` in row-major order (without recursion: the nesting is the
    client's)."""
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= MAX_DATA_NESTING:
                    raise InvalidInputError(
                        f"input '{name}': JSON nesting depth exceeds maximum allowed limit "
                        f"({MAX_DATA_NESTING}) in 'data'"
                    )
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _kind(array: np.ndarray) -> str:
    return {"U": "strings", "b": "booleans", "O": "mixed values or nulls", "f": "floats"}.get(
        array.dtype.kind, "numbers"
    )


def encode_infer(response: InferResponse, spec: ModelSpec, choice: OutputChoice) -> EncodedResponse:
    outputs: list[dict[str, Any]] = []
    sections: list[bytes | memoryview] = []
    for name, array in response.outputs.items():
        datatype = spec.output_datatype(name, array.dtype)
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if choice.is_binary(name):
            raw = _raw(array, datatype)
            out["parameters"] = {"binary_data_size": len(raw)}
            if len(raw):
                sections.append(raw)
        else:
            out["data"] = _json_data(array, datatype)
        outputs.append(out)
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.request_id:
        doc["id"] = response.request_id
    if response.parameters:
        doc["parameters"] = dict(response.parameters)
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not sections:
        return EncodedResponse([header], None)
    return EncodedResponse([header, *sections], len(header))


def _raw(array: np.ndarray, datatype: str) -> bytes | memoryview:
    if datatype == "BYTES":
        return serialize_bytes(array)
    expected = numpy_dtype(datatype)
    if array.dtype != expected:
        array = array.astype(expected)
    # A byte view on the output array (bf16 included): copied once, into the response body.
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def _json_data(array: np.ndarray, datatype: str) -> Any:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [v if isinstance(v, str) else bytes(v).decode("utf-8", "replace") for v in flat]
    if BF16_DTYPE is not None and flat.dtype == BF16_DTYPE:
        flat = flat.astype(np.float32)
    # orjson writes native-order contiguous numpy arrays itself (OPT_SERIALIZE_NUMPY).
    flat = np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("="))
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return _with_non_finite(flat)
    return flat


def _with_non_finite(flat: np.ndarray) -> orjson.Fragment:
    """`flat` as a JSON array with NaN, Infinity and -Infinity where it holds them, as Triton
    writes them (rapidjson's kWriteNanAndInfFlag; Python's json reads them): orjson would write
    null for all three, and a client would read +-inf back as NaN. orjson writes every other
    value; each null it writes is one of these, in order."""
    special = flat[~np.isfinite(flat)]
    words = np.where(np.isnan(special), "NaN", np.where(special > 0, "Infinity", "-Infinity"))
    parts = orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY).split(b"null")
    out = bytearray(parts[0])
    for word, part in zip(words.tolist(), parts[1:], strict=True):
        out += word.encode()
        out += part
    return orjson.Fragment(bytes(out))


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object, got {_json_type(value)}")
    return dict(value)


def _shape(value: Any, name: str) -> tuple[int, ...]:
    # `type(d) is int`: a JSON true/false is a bool, which isinstance would take for an int.
    if not isinstance(value, list) or not all(type(d) is int for d in value):
        raise InvalidInputError(
            f"input '{name}' needs a 'shape' array of integers, got {orjson.dumps(value).decode()}"
        )
    if value and min(value) < 0:
        raise InvalidInputError(f"input '{name}' has shape {value}: dimensions must be >= 0")
    return tuple(value)


def _uint(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(
            f"{what} must be an unsigned integer, got {orjson.dumps(value).decode()}"
        )
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{what} must be true or false, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)
