"""Datatypes: Triton's names, numpy dtypes, ONNX element types, and BYTES (de)serialisation.

A leaf module: anyone may import it. BYTES tensors travel as 4-byte little-endian length + data per
element; in memory they are numpy object arrays of `str`: ONNX `string` tensors hold UTF-8 text and
onnxruntime only takes `str` elements (it would turn a `bytes` element into its repr).
"""

from __future__ import annotations

import math
import struct

import numpy as np

from pipeserve.errors import InvalidInputError

# ml_dtypes ships with onnx; it gives numpy a real bfloat16.
try:  # pragma: no cover - exercised where ml_dtypes is installed (always, via onnx)
    from ml_dtypes import bfloat16 as _bf16

    BF16_DTYPE: np.dtype | None = np.dtype(_bf16)
except ImportError:  # pragma: no cover
    BF16_DTYPE = None

# Triton datatype name -> numpy dtype (little-endian, as on the wire).
_TRITON_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
if BF16_DTYPE is not None:
    _TRITON_TO_NUMPY["BF16"] = BF16_DTYPE

TRITON_DATATYPES: frozenset[str] = frozenset(_TRITON_TO_NUMPY)

# Triton name <-> config.pbtxt DataType enum name (TYPE_FP32 ...).
_TRITON_TO_CONFIG = {name: f"TYPE_{name}" for name in _TRITON_TO_NUMPY}
_TRITON_TO_CONFIG["BYTES"] = "TYPE_STRING"
_TRITON_TO_CONFIG["BF16"] = "TYPE_BF16"
_CONFIG_TO_TRITON = {v: k for k, v in _TRITON_TO_CONFIG.items()}

# onnxruntime's type strings ("tensor(float)") -> Triton name.
_ORT_TO_TRITON = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype for a Triton datatype name; InvalidInputError for an unknown name."""
    try:
        return _TRITON_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidInputError(
            f"unsupported datatype '{datatype}', expected one of {sorted(TRITON_DATATYPES)}"
        ) from None


def element_size(datatype: str) -> int:
    """Bytes per element of a fixed-size datatype (BYTES has none: returns 0)."""
    if datatype == "BYTES":
        return 0
    return numpy_dtype(datatype).itemsize


def config_type_name(datatype: str) -> str:
    """Triton name -> config enum name: FP32 -> TYPE_FP32, BYTES -> TYPE_STRING."""
    return _TRITON_TO_CONFIG[datatype]


def triton_from_config_type(type_name: str) -> str:
    """Config enum name -> Triton name: TYPE_STRING -> BYTES."""
    try:
        return _CONFIG_TO_TRITON[type_name]
    except KeyError:
        raise ValueError(f"unsupported data_type {type_name}") from None


def triton_from_ort_type(ort_type: str) -> str:
    """onnxruntime type string ("tensor(float)") -> Triton name; ValueError when not a tensor type
    pipeserve serves."""
    try:
        return _ORT_TO_TRITON[ort_type]
    except KeyError:
        raise ValueError(f"unsupported ONNX type {ort_type}") from None


def triton_from_numpy(dtype: np.dtype) -> str:
    if dtype == np.object_ or dtype.kind in ("S", "U"):
        return "BYTES"
    for name, candidate in _TRITON_TO_NUMPY.items():
        if name != "BYTES" and candidate == dtype.newbyteorder("<"):
            return name
    raise ValueError(f"no Triton datatype for numpy dtype {dtype}")


INT64_MAX = 2**63 - 1


def shape_overflow(name: str, shape: tuple[int, ...], datatype: str) -> InvalidInputError | None:
    """Triton's refusal of a shape whose element count, or byte size, does not fit an int64;
    None when both fit. Asked on the error paths, where a count came out wrong."""
    count = math.prod(shape)
    if count > INT64_MAX:
        return InvalidInputError(
            f"invalid shape for input '{name}': shape {list(shape)} causes total element count "
            f"to exceed maximum size of {INT64_MAX}"
        )
    size = 1 if datatype == "BYTES" else numpy_dtype(datatype).itemsize
    if size > 1 and count > INT64_MAX // size:
        return InvalidInputError(
            f"byte size overflow for input '{name}': element count ({count}) * data type size "
            f"({size}) exceeds maximum allowed size ({INT64_MAX})"
        )
    return None


def array_from_raw(
    name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview, model: str = ""
) -> np.ndarray:
    """One input tensor from its wire bytes (gRPC raw_input_contents, an HTTP binary section): a
    read-only view on `raw` (no copy) for fixed-size datatypes, parsed elements for BYTES.

    Raises InvalidInputError naming the tensor (and `model`) when the size does not match
    datatype and shape, in Triton's words (its QA scripts check them).
    """
    count = math.prod(shape)
    if datatype == "BYTES":
        return deserialize_bytes(raw, count, name, model).reshape(shape)
    dtype = numpy_dtype(datatype)  # looked up once: this runs per input per request
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise shape_overflow(name, shape, datatype) or InvalidInputError(
            f"input byte size mismatch for input '{name}' for model '{model}'. Expected "
            f"{expected}, got {len(raw)} ({datatype} with shape {list(shape)})"
        )
    # One constructor instead of frombuffer + reshape: half the cost, per input per request.
    return np.ndarray(shape, dtype, raw)


def deserialize_bytes(
    buffer: bytes | memoryview, count: int, tensor_name: str, model: str = ""
) -> np.ndarray:
    """Parse `count` BYTES elements (4-byte LE length + data each) into an object array.

    Raises InvalidInputError naming the tensor when the buffer is truncated or has bytes left
    over; Triton's words where it has them.
    """
    view = memoryview(buffer)
    end = len(view)
    where = f"for inference input '{tensor_name}' for model '{model}'"
    # Each element takes at least its 4-byte length, so the loop fails before index end // 4 when
    # `count` is larger: never allocate for more (a tiny request could declare a huge shape).
    out = np.empty(min(count, end // 4), dtype=np.object_)
    offset = 0
    for i in range(count):
        if offset == end:
            raise InvalidInputError(f"expected {count} string elements {where}, got {i}")
        if offset + 4 > end:
            raise _incomplete_length(where, end - offset)
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInputError(
                f"input '{tensor_name}': BYTES element {i} declares {length} bytes but only "
                f"{end - offset} remain"
            )
        out[i] = utf8_element(view[offset : offset + length], i, tensor_name)
        offset += length
    if offset != end:
        if end - offset < 4:
            raise _incomplete_length(where, end - offset)
        raise InvalidInputError(
            f"unexpected number of string elements {count + 1} {where}, expecting {count}"
        )
    return out


def _incomplete_length(where: str, left: int) -> InvalidInputError:
    return InvalidInputError(
        f"incomplete string length indicator {where}, expecting 4 bytes but only {left} bytes "
        f"available. Please make sure the string length indicator is in one buffer."
    )


def utf8_element(data: bytes | memoryview, index: int, tensor_name: str) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"input '{tensor_name}': BYTES element {index} is not valid UTF-8 ({exc.reason} at "
            f"byte {exc.start}); ONNX string tensors hold UTF-8 text"
        ) from None


def serialize_bytes(array: np.ndarray) -> bytes:
    """Object/bytes/str array -> 4-byte LE length-prefixed concatenation, in C order."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)
