"""REST inference bodies <-> InferRequest / InferResponse: JSON data, binary sections, and a
precise InvalidInputError for every malformed body."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from pipeserve.api.http.codec import (
    OutputChoice,
    decode_infer,
    decode_raw,
    encode_infer,
    header_length,
)
from pipeserve.errors import InvalidInputError, UnsupportedError
from pipeserve.inference import InferResponse, ModelSpec, TensorSpec


def _body(doc: dict, *sections: bytes) -> tuple[bytes, int | None]:
    header = orjson.dumps(doc)
    if not sections:
        return header, None
    return header + b"".join(sections), len(header)


def _decode(doc: dict, *sections: bytes):
    body, size = _body(doc, *sections)
    request, choice, _ = decode_infer("m", "", body, size)
    return request, choice


def _input(name="x", datatype="FP32", shape=(2, 2), **extra):
    return {"name": name, "datatype": datatype, "shape": list(shape), **extra}


def deep(value, depth):  # type: ignore[no-untyped-def]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "data",
    [
        [1, 2, 3, 4],
        [[1, 2], [3, 4]],
        # Any other nesting is read in row-major order, as Triton reads it:
        [[1, 2, 3, 4]],
        [[1], [2, 3], [[4]]],
        deep([1, 2, 3, 4], 60),  # deeper than numpy's dimensions
        [deep(1, 99), 2, 3, 4],  # Triton's limit: 100 levels
    ],
    ids=["flat", "as-the-shape", "other-shape", "ragged", "60-deep", "100-deep"],
)
def test_json_data_is_read_in_row_major_order_whatever_its_nesting(data) -> None:  # type: ignore[no-untyped-def]
    request, _ = _decode({"inputs": [_input(data=data)]})
    x = request.inputs["x"]
    assert x.dtype == np.float32 and x.shape == (2, 2)
    np.testing.assert_array_equal(x, [[1, 2], [3, 4]])


def test_bytes_json_data_nested_deep_is_read_too() -> None:
    request, _ = _decode({"inputs": [_input("s", "BYTES", [1, 1], data=deep("hello", 50))]})
    assert request.inputs["s"].tolist() == [["hello"]]


def test_binary_section_is_a_view_on_the_body_without_copy():
    a = np.arange(4, dtype=np.float32)
    request, _ = _decode({"inputs": [_input(parameters={"binary_data_size": 16})]}, a.tobytes())
    x = request.inputs["x"]
    assert not x.flags.owndata and not x.flags.writeable
    np.testing.assert_array_equal(x.ravel(), a)


def test_binary_and_json_inputs_mixed_and_bytes_sections():
    strings = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"c"))
    request, _ = _decode(
        {
            "inputs": [
                _input("s", "BYTES", [2], parameters={"binary_data_size": len(strings)}),
                _input("j", "INT32", [3], data=[1, -2, 3]),
                _input("t", "BYTES", [1], data=["x\x00"]),
            ]
        },
        strings,
    )
    assert list(request.inputs["s"]) == ["ab", "c"]
    assert request.inputs["j"].dtype == np.int32
    assert list(request.inputs["t"]) == ["x\x00"]  # trailing NUL kept


def test_parameters_id_and_outputs():
    request, choice = _decode(
        {
            "id": "r7",
            "parameters": {"priority": 2, "timeout": 500, "binary_data_output": True, "k": "v"},
            "inputs": [_input(data=[1, 2, 3, 4])],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
        }
    )
    assert request.request_id == "r7" and request.priority == 2 and request.timeout_us == 500
    assert request.parameters == {"priority": 2, "timeout": 500, "k": "v"}
    assert request.requested_outputs == ("y", "z")
    assert not choice.is_binary("y") and choice.is_binary("z")


@pytest.mark.parametrize(
    ("doc", "sections", "words"),
    [
        ({"inputs": [_input(data=[1, 2, 3])]}, (), "holds 3 values, expected 4 (the shape [2, 2])"),
        ({"inputs": [_input(data=[[1, 2], [3]])]}, (), "holds 3 values, expected 4"),
        ({"inputs": [_input(data=[[1, 2, 3, 4, 5]])]}, (), "holds 5 values, expected 4"),
        (
            {"inputs": [_input(data=[deep(1, 100), 2, 3, 4])]},
            (),
            "JSON nesting depth exceeds maximum allowed limit (100)",
        ),
        ({"inputs": [_input(data=["a", "b", "c", "d"])]}, (), "must hold numbers, got strings"),
        ({"inputs": [_input("i", "INT32", [2], data=[1.5, 2])]}, (), "must hold integers"),
        ({"inputs": [_input("i", "INT8", [1], data=[300])]}, (), "value 300"),
        ({"inputs": [_input("b", "BOOL", [1], data=[1])]}, (), "must hold true/false"),
        ({"inputs": [_input(data=[1, None, 3, 4])]}, (), "nulls"),
        ({"inputs": [_input("s", "BYTES", [1], data=[1])]}, (), "must hold JSON strings"),
        ({"inputs": [_input("h", "FP16", [1], data=[1])]}, (), "FP16 data via JSON"),
        ({"inputs": [_input(data=5)]}, (), "'data' must be a JSON array"),
        ({"inputs": [_input()]}, (), "neither 'data' nor a 'binary_data_size'"),
        ({"inputs": [_input(datatype="FP99", data=[1])]}, (), "unsupported datatype 'FP99'"),
        ({"inputs": [_input(shape=[2, -1], data=[1])]}, (), "dimensions must be >= 0"),
        ({"inputs": [_input(shape="2", data=[1])]}, (), "'shape' array of integers"),
        ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, (), "needs a 'name'"),
        ({"inputs": {}}, (), "'inputs' must be a JSON array"),
        ({}, (), "'inputs' must be a JSON array"),
        ({"inputs": [_input(data=[1, 2, 3, 4])], "id": 5}, (), "'id' must be a string"),
        ({"inputs": [], "parameters": {"triton_x": 1}}, (), "reserved for Triton"),
        ({"inputs": [], "parameters": {"priority": -1}}, (), "'priority' must be an unsigned"),
        ({"inputs": [], "parameters": {"binary_data_output": 1}}, (), "true or false"),
        (
            {"inputs": [_input(parameters={"binary_data_size": 16})]},
            (b"\0" * 8,),
            "expecting 8 additional bytes",
        ),
        (
            {"inputs": [_input(shape=[2], parameters={"binary_data_size": 8})]},
            (b"\0" * 16,),
            "unexpected additional input data",
        ),
        (
            {"inputs": [_input(parameters={"binary_data_size": 8})]},
            (b"\0" * 8,),
            "input byte size mismatch for input 'x' for model 'm'. Expected 16, got 8",
        ),
        (
            {"inputs": [_input(parameters={"binary_data_size": 16}, data=[1, 2, 3, 4])]},
            (b"\0" * 16,),
            "both 'data' and a 'binary_data_size'",
        ),
        (
            {
                "inputs": [_input(data=[1, 2, 3, 4])],
                "outputs": [{"name": "y", "parameters": {"binary_data": 1}}],
            },
            (),
            "true or false",
        ),
        ({"inputs": [_input(data=[1, 2, 3, 4])], "outputs": [{}]}, (), "outputs[0]"),
    ],
)
def test_malformed_bodies_name_what_is_wrong(doc, sections, words):
    with pytest.raises(InvalidInputError, match=None) as info:
        _decode(doc, *sections)
    assert words in info.value.message, info.value.message


def test_binary_size_without_the_header_length_header():
    body = orjson.dumps({"inputs": [_input(parameters={"binary_data_size": 16})]})
    with pytest.raises(InvalidInputError, match="no Inference-Header-Content-Length"):
        decode_infer("m", "", body, None)


def test_malformed_json_and_not_an_object():
    with pytest.raises(InvalidInputError, match="malformed JSON in the inference request"):
        decode_infer("m", "", b'{"inputs": [', None)
    with pytest.raises(InvalidInputError, match="must be a JSON object, got an array"):
        decode_infer("m", "", b"[]", None)


def test_shared_memory_is_unsupported():
    with pytest.raises(UnsupportedError, match="shared memory"):
        _decode({"inputs": [_input(parameters={"shared_memory_region": "r"})]})


@pytest.mark.parametrize(
    ("value", "words"),
    [(b"abc", "Unable to parse"), (b"-3", "range [0, 10]"), (b"11", "range [0, 10]")],
)
def test_header_length_is_checked(value, words):
    with pytest.raises(InvalidInputError, match=None) as info:
        header_length(value, 10)
    assert words in info.value.message
    assert header_length(None, 10) is None
    assert header_length(b" 10 ", 10) == 10


def test_header_length_zero_is_a_raw_body():
    assert header_length(b"0", 10) == 0


def _one_input(datatype: str, dims: tuple[int, ...], max_batch: int) -> ModelSpec:
    io = (TensorSpec("x", datatype, dims),)
    return ModelSpec("m", 1, max_batch, io, (TensorSpec("y", datatype, dims),))


@pytest.mark.parametrize(
    ("dims", "max_batch", "size", "shape"),
    [((-1,), 8, 20, (1, 5)), ((2, -1), 0, 24, (2, 3)), ((2, 3), 0, 24, (2, 3)), ((), 4, 4, (1,))],
)
def test_raw_body_shape_is_deduced_from_its_size(dims, max_batch, size, shape):
    body = np.arange(size // 4, dtype=np.float32).tobytes()
    request, choice = decode_raw("m", "", body, _one_input("FP32", dims, max_batch))
    assert request.inputs["x"].shape == shape and request.requested_outputs == ()
    assert request.inputs["x"].tobytes() == body
    assert choice.is_binary("y")


def test_raw_body_bytes_input_is_one_element():
    request, _ = decode_raw("m", "", "hé".encode(), _one_input("BYTES", (1,), 2))
    assert request.inputs["x"].shape == (1, 1) and request.inputs["x"][0, 0] == "hé"


SPEC = ModelSpec("m", 1, 0, (), (TensorSpec("y", "FP32", (2,)), TensorSpec("s", "BYTES", (1,))))


def _response():
    return InferResponse(
        "m",
        "1",
        "id1",
        {"y": np.array([1.5, 2.0], dtype=np.float32), "s": np.array(["hé"], dtype=object)},
    )


def test_encode_all_json():
    encoded = encode_infer(_response(), SPEC, OutputChoice())
    assert encoded.header_length is None
    doc = orjson.loads(b"".join(encoded.chunks))
    assert doc["model_name"] == "m" and doc["model_version"] == "1" and doc["id"] == "id1"
    y, s = doc["outputs"]
    assert y == {"name": "y", "datatype": "FP32", "shape": [2], "data": [1.5, 2.0]}
    assert s == {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["hé"]}


def test_encode_binary_sections_follow_the_json_in_output_order():
    encoded = encode_infer(_response(), SPEC, OutputChoice(default_binary=True))
    body = b"".join(encoded.chunks)
    doc = orjson.loads(body[: encoded.header_length])
    sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"]]
    rest = body[encoded.header_length :]
    assert sizes == [8, 4 + len("hé".encode())] and len(rest) == sum(sizes)
    np.testing.assert_array_equal(np.frombuffer(rest[:8], np.float32), [1.5, 2.0])
    assert rest[8:] == struct.pack("<I", 3) + "hé".encode()


@pytest.mark.parametrize(
    ("datatype", "dtype"), [("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64)]
)
def test_non_finite_values_are_written_as_triton_writes_them(datatype, dtype) -> None:  # type: ignore[no-untyped-def]
    values = np.array([[np.inf, 0.5], [np.nan, -np.inf]], dtype=dtype)
    spec = ModelSpec("m", 1, 0, (), (TensorSpec("y", datatype, (2, 2)),))
    encoded = encode_infer(InferResponse("m", "1", "", {"y": values}), spec, OutputChoice())
    assert b'"data":[Infinity,0.5,NaN,-Infinity]' in b"".join(encoded.chunks)


def test_non_finite_values_in_json_data_are_read() -> None:
    body = (
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], '
        b'"data": [NaN, Infinity, -Infinity]}]}'
    )
    request, _, _ = decode_infer("m", "", body, None)
    np.testing.assert_array_equal(
        request.inputs["x"], np.array([np.nan, np.inf, -np.inf], np.float32)
    )
