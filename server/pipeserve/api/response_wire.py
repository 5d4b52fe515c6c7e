"""A ModelInferResponse written straight to its protobuf wire bytes, for the unary ModelInfer
answer on the own HTTP/2 transport (the hot path: one per request).

The bytes are exactly those of `codec.encode_response(...).SerializeToString()` (fields in
field-number order, proto3 defaults left out, `shape` packed; tests/unit/api/test_response_wire.py
compares both). What makes it cheaper than building the message: an output's tensor header (name,
datatype, shape) is the same for every answer of a given shape, so its encoding is kept and
reused, as are the model's name and version fields; the message is one join of parts, with no
message objects, ByteSize or serializer pass.

`stream_response_bytes` wraps such an answer as a ModelStreamInferResponse, for the own
transport's ModelStreamInfer. The grpc.aio front end answers with the message (codec.py).
"""

from __future__ import annotations

from pipeserve.api.codec import raw_output
from pipeserve.inference import InferResponse, ModelSpec

# Field keys (field number << 3 | wire type 2, length-delimited) of ModelInferResponse ...
_MODEL_NAME, _MODEL_VERSION, _ID = b"\x0a", b"\x12", b"\x1a"
_OUTPUTS, _RAW_OUTPUT = b"\x2a", b"\x32"
# ... of ModelStreamInferResponse's infer_response ...
_INFER_RESPONSE = b"\x12"
# ... and of its InferOutputTensor.
_TENSOR_NAME, _TENSOR_DATATYPE, _TENSOR_SHAPE = b"\x0a", b"\x12", b"\x1a"

# Encoded tensor headers by (output name, datatype, shape). Clients choose shapes (variable
# dimensions), so the table is bounded: emptied when full, it refills from what is current.
_HEADERS_MAX = 4096
_headers: dict[tuple[str, str, tuple[int, ...]], bytes] = {}
# The model name and version fields by (name, version), bounded the same way.
_models: dict[tuple[str, str], bytes] = {}


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(key: bytes, value: bytes) -> bytes:
    return key + varint(len(value)) + value


def _tensor_header(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    key = (name, datatype, shape)
    header = _headers.get(key)
    if header is None:
        body = _field(_TENSOR_NAME, name.encode()) if name else b""
        body += _field(_TENSOR_DATATYPE, datatype.encode()) if datatype else b""
        if shape:
            body += _field(_TENSOR_SHAPE, b"".join(varint(d) for d in shape))
        header = _field(_OUTPUTS, body)
        if len(_headers) >= _HEADERS_MAX:
            _headers.clear()
        _headers[key] = header
    return header


def _model_fields(name: str, version: str) -> bytes:
    key = (name, version)
    encoded = _models.get(key)
    if encoded is None:
        encoded = _field(_MODEL_NAME, name.encode()) if name else b""
        encoded += _field(_MODEL_VERSION, version.encode()) if version else b""
        if len(_models) >= _HEADERS_MAX:
            _models.clear()
        _models[key] = encoded
    return encoded


def encode_response_bytes(response: InferResponse, spec: ModelSpec) -> bytes:
    parts = [_model_fields(response.model_name, response.model_version)]
    if response.request_id:
        parts.append(_field(_ID, response.request_id.encode()))
    contents: list[bytes] = []
    for name, array in response.outputs.items():
        datatype = spec.output_datatype(name, array.dtype)
        parts.append(_tensor_header(name, datatype, array.shape))
        raw = raw_output(array, datatype)
        contents.append(_RAW_OUTPUT + varint(len(raw)))
        contents.append(raw)
    parts += contents
    return b"".join(parts)


def stream_response_bytes(infer_response: bytes) -> bytes:
    """The ModelStreamInferResponse holding `infer_response` (a ModelInferResponse's bytes) and
    no error message: the same bytes as that message serialized."""
    return _INFER_RESPONSE + varint(len(infer_response)) + infer_response
