"""Protobuf <-> numpy: zero-copy decode, typed contents, precise errors, encode."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pipeserve.api.codec import decode_request, encode_response
from pipeserve.api.generated import grpc_service_pb2 as pb
from pipeserve.errors import InvalidInputError, UnsupportedError
from pipeserve.inference import InferResponse, ModelSpec, TensorSpec


def _request(*tensors, raw=None, **params) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m", id="r1")
    for name, datatype, shape in tensors:
        msg.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        msg.raw_input_contents.extend(raw)
    for key, value in params.items():
        if isinstance(value, str):
            msg.parameters[key].string_param = value
        else:
            msg.parameters[key].int64_param = value
    return msg


def test_raw_fp32_is_a_view_without_copy():
    data = np.arange(6, dtype=np.float32).tobytes()
    msg = _request(("x", "FP32", [2, 3]), raw=[data])
    request = decode_request(msg)
    x = request.inputs["x"]
    assert x.shape == (2, 3) and x.dtype == np.float32
    assert not x.flags.owndata and not x.flags.writeable
    np.testing.assert_array_equal(x.ravel(), np.arange(6))


def test_parameters_priority_and_timeout():
    request = decode_request(
        _request(("x", "INT32", [1]), raw=[b"\0" * 4], priority=2, timeout=5000, tag="t")
    )
    assert (request.priority, request.timeout_us) == (2, 5000)
    assert request.parameters["tag"] == "t"


def test_negative_priority_is_refused():
    with pytest.raises(InvalidInputError, match="'priority' must be >= 0"):
        decode_request(_request(("x", "INT32", [1]), raw=[b"\0" * 4], priority=-1))


def test_byte_size_mismatch_names_tensor_and_sizes():
    with pytest.raises(
        InvalidInputError,
        match=r"input byte size mismatch for input 'x' for model 'm'. Expected 8, got 7",
    ):
        decode_request(_request(("x", "FP32", [2]), raw=[b"\0" * 7]))


def test_raw_count_must_match_inputs():
    with pytest.raises(InvalidInputError, match="expected 2 raw_input_contents"):
        decode_request(_request(("a", "FP32", [1]), ("b", "FP32", [1]), raw=[b"\0" * 4]))


def test_typed_contents_beside_raw_is_named_before_the_count():
    # Both wrong: the answer names the input with typed contents (Triton's words), whichever
    # input it is, and only then would the count be reported.
    msg = _request(("a", "FP32", [1]), ("b", "FP32", [1]), raw=[b"\0" * 4])
    msg.inputs[1].contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInputError, match="contents field must not be specified .* for 'b'"):
        decode_request(msg)
    msg.raw_input_contents.append(b"\0" * 4)  # the count is right now: still refused
    with pytest.raises(InvalidInputError, match="contents field must not be specified .* for 'b'"):
        decode_request(msg)


def test_bytes_round_trip_and_malformed():
    payload = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", "é".encode(), b""))
    request = decode_request(_request(("s", "BYTES", [3]), raw=[payload]))
    assert request.inputs["s"].tolist() == ["ab", "é", ""]
    with pytest.raises(InvalidInputError, match="declares 9 bytes but only 1 remain"):
        decode_request(_request(("s", "BYTES", [1]), raw=[struct.pack("<I", 9) + b"x"]))
    with pytest.raises(InvalidInputError, match="expected 2 string elements for inference input"):
        decode_request(_request(("s", "BYTES", [2]), raw=[struct.pack("<I", 1) + b"x"]))
    with pytest.raises(InvalidInputError, match="incomplete string length indicator"):
        decode_request(_request(("s", "BYTES", [2]), raw=[struct.pack("<I", 1) + b"x\0"]))
    with pytest.raises(InvalidInputError, match="incomplete string length indicator"):
        decode_request(_request(("s", "BYTES", [1]), raw=[struct.pack("<I", 1) + b"xy"]))
    with pytest.raises(InvalidInputError, match="unexpected number of string elements 2 for"):
        decode_request(_request(("s", "BYTES", [1]), raw=[struct.pack("<I", 1) + b"xy\0\0\0"]))
    with pytest.raises(InvalidInputError, match="not valid UTF-8"):
        decode_request(_request(("s", "BYTES", [1]), raw=[struct.pack("<I", 1) + b"\xff"]))


def test_typed_contents():
    msg = _request(("a", "INT32", [2]), ("b", "FP64", [1]), ("c", "BYTES", [1]), ("d", "BOOL", [2]))
    msg.inputs[0].contents.int_contents.extend([5, -6])
    msg.inputs[1].contents.fp64_contents.append(0.5)
    msg.inputs[2].contents.bytes_contents.append(b"hi")
    msg.inputs[3].contents.bool_contents.extend([True, False])
    inputs = decode_request(msg).inputs
    assert inputs["a"].dtype == np.int32 and inputs["a"].tolist() == [5, -6]
    assert inputs["b"].tolist() == [0.5]
    assert inputs["c"].tolist() == ["hi"]
    assert inputs["d"].tolist() == [True, False]


def test_typed_contents_count_and_fp16_need_raw():
    msg = _request(("a", "INT32", [3]))
    msg.inputs[0].contents.int_contents.extend([1])
    with pytest.raises(
        InvalidInputError, match=r"got 1 elements in contents.int_contents, expected 3"
    ):
        decode_request(msg)
    with pytest.raises(InvalidInputError, match="FP16 can only be sent in raw_input_contents"):
        decode_request(_request(("h", "FP16", [1])))


def test_unknown_datatype_and_negative_dims():
    with pytest.raises(InvalidInputError, match="unsupported datatype 'FP8'"):
        decode_request(_request(("x", "FP8", [1]), raw=[b"\0"]))
    with pytest.raises(InvalidInputError, match="dimensions must be >= 0"):
        decode_request(_request(("x", "FP32", [-1]), raw=[b""]))


def test_classification_is_decoded_and_its_count_checked():
    msg = _request(("x", "FP32", [1]), raw=[b"\0" * 4])
    msg.outputs.add(name="y").parameters["classification"].int64_param = 3
    assert decode_request(msg).classification == {"y": 3}
    msg.outputs[0].parameters["classification"].int64_param = 0
    with pytest.raises(InvalidInputError, match="invalid value for 'classification' parameter"):
        decode_request(msg)
    msg.outputs[0].parameters["classification"].string_param = "3"
    with pytest.raises(InvalidInputError, match="expected int64_param"):
        decode_request(msg)


def test_shared_memory_is_refused():
    msg = _request(("x", "FP32", [1]))
    msg.inputs[0].parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(UnsupportedError, match="shared memory"):
        decode_request(msg)


def test_encode_raw_outputs():
    spec = ModelSpec("m", 1, 0, (), (TensorSpec("y", "FP32", (2,)), TensorSpec("s", "BYTES", (1,))))
    response = InferResponse(
        "m",
        "1",
        "r1",
        {"y": np.array([1.5, 2.5], dtype=np.float32), "s": np.array(["ok"], dtype=object)},
    )
    msg = encode_response(response, spec)
    assert [(o.name, o.datatype, list(o.shape)) for o in msg.outputs] == [
        ("y", "FP32", [2]),
        ("s", "BYTES", [1]),
    ]
    assert np.frombuffer(msg.raw_output_contents[0], np.float32).tolist() == [1.5, 2.5]
    assert msg.raw_output_contents[1] == struct.pack("<I", 2) + b"ok"
