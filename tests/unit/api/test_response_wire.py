"""The hand-written ModelInferResponse bytes are exactly protobuf's for the same response."""

from __future__ import annotations

import numpy as np
import pytest

from pipeserve.api import response_wire
from pipeserve.api.codec import encode_response
from pipeserve.api.generated import grpc_service_pb2 as pb
from pipeserve.api.response_wire import encode_response_bytes, varint
from pipeserve.inference import InferResponse, ModelSpec, TensorSpec

SPEC = ModelSpec(
    name="m",
    version=1,
    max_batch_size=8,
    inputs=(TensorSpec("x", "FP32", (-1,)),),
    outputs=(
        TensorSpec("y", "FP32", (-1,)),
        TensorSpec("label", "BYTES", (1,)),
        TensorSpec("half", "FP16", (2,)),
        TensorSpec("count", "INT64", (1,)),
    ),
)

CASES = {
    "one output": InferResponse("m", "1", "", {"y": np.arange(6, dtype=np.float32).reshape(2, 3)}),
    "with id": InferResponse("m", "1", "req-7", {"y": np.ones((1, 16), np.float32)}),
    "no version": InferResponse("m", "", "", {"y": np.ones((1, 4), np.float32)}),
    "unicode names": InferResponse("mödel", "12", "ïd", {"y": np.zeros((1, 1), np.float32)}),
    "empty output": InferResponse("m", "1", "", {"y": np.zeros((0, 3), np.float32)}),
    "scalar output": InferResponse("m", "1", "", {"y": np.float32(2.5).reshape(())}),
    "large dims": InferResponse("m", "1", "", {"y": np.zeros((1, 300, 20000), np.float32)}),
    "several outputs": InferResponse(
        "m",
        "1",
        "r",
        {
            "y": np.ones((2, 2), np.float32),
            "label": np.array([[b"a"], ["é"]], dtype=np.object_),
            "half": np.ones((2, 2), np.float32),  # converted to the declared FP16
            "count": np.array([[1], [2]], dtype=np.int64),
        },
    ),
    "undeclared output": InferResponse("m", "1", "", {"extra": np.ones((1, 2), np.int32)}),
    "non-contiguous": InferResponse("m", "1", "", {"y": np.ones((4, 6), np.float32)[:, ::2]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bytes_equal_protobufs_serialization(case: str) -> None:
    response = CASES[case]
    expected = encode_response(response, SPEC).SerializeToString()
    assert encode_response_bytes(response, SPEC) == expected
    # Again, from the kept tensor headers.
    assert encode_response_bytes(response, SPEC) == expected


def test_parses_back_to_the_response() -> None:
    response = CASES["several outputs"]
    msg = pb.ModelInferResponse.FromString(encode_response_bytes(response, SPEC))
    assert (msg.model_name, msg.model_version, msg.id) == ("m", "1", "r")
    assert [(o.name, o.datatype, list(o.shape)) for o in msg.outputs] == [
        ("y", "FP32", [2, 2]),
        ("label", "BYTES", [2, 1]),
        ("half", "FP16", [2, 2]),
        ("count", "INT64", [2, 1]),
    ]
    half = np.frombuffer(msg.raw_output_contents[2], np.float16)
    np.testing.assert_array_equal(half, np.ones(4, np.float16))


def test_varint() -> None:
    for n in (0, 1, 127, 128, 300, 16383, 16384, 2**31, 2**63 - 1):
        field = pb.ModelInferResponse.InferOutputTensor(shape=[n]).SerializeToString()
        assert field == b"\x1a" + varint(len(varint(n))) + varint(n)


def test_kept_headers_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(response_wire, "_HEADERS_MAX", 4)
    monkeypatch.setattr(response_wire, "_headers", {})
    for rows in range(1, 20):
        response = InferResponse("m", "1", "", {"y": np.ones((rows, 3), np.float32)})
        expected = encode_response(response, SPEC).SerializeToString()
        assert encode_response_bytes(response, SPEC) == expected
        assert len(response_wire._headers) <= 4


def test_kept_model_fields_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(response_wire, "_HEADERS_MAX", 4)
    monkeypatch.setattr(response_wire, "_models", {})
    for i in range(20):
        response = InferResponse(f"m{i % 7}", str(i % 3) if i % 5 else "", "", {"y": np.ones(1)})
        expected = encode_response(response, SPEC).SerializeToString()
        assert encode_response_bytes(response, SPEC) == expected
        assert len(response_wire._models) <= 4
