"""Kept JSON headers of binary REST requests: a request read through a kept head equals its full
decode; bodies the head does not fit, and headers it cannot keep, get the full decode."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from pipeserve.api.http.binary_heads import BinaryHeads
from pipeserve.api.http.codec import decode_infer
from pipeserve.errors import InvalidInputError
from tests.unit.api.same_request import assert_same_request


def _binary(name: str, datatype: str, shape: list[int], data: bytes) -> tuple[dict, bytes]:
    tensor = {"name": name, "datatype": datatype, "shape": shape}
    tensor["parameters"] = {"binary_data_size": len(data)}
    return tensor, data


def _body(*inputs: tuple[dict, bytes], **doc: object) -> tuple[bytes, int]:
    header = orjson.dumps({**doc, "inputs": [t for t, _ in inputs]})
    return header + b"".join(d for _, d in inputs), len(header)


def _f32(*shape: int, start: float = 0) -> bytes:
    return (np.arange(int(np.prod(shape)), dtype=np.float32) + start).tobytes()


CASES = {
    "perf_analyzer's": lambda start: _body(_binary("x", "FP32", [1, 16], _f32(1, 16, start=start))),
    "several inputs and outputs": lambda start: _body(
        _binary("a", "INT64", [1, 2], np.array([[start, 2]], np.int64).tobytes()),
        _binary("b", "FP16", [1, 3], np.full(3, start, np.float16).tobytes()),
        _binary("s", "BYTES", [2], struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0)),
        parameters={"priority": 2, "timeout": 500, "binary_data_output": True, "tag": "x"},
        outputs=[{"name": "y"}, {"name": "z", "parameters": {"classification": 2}}],
    ),
    "empty tensor": lambda start: _body(_binary("x", "FP32", [0, 4], b"")),
}


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_a_kept_head_reads_the_request_its_full_decode_gives(make) -> None:  # type: ignore[no-untyped-def]
    heads = BinaryHeads()
    first = make(1)
    request, choice, head = decode_infer("m", "2", *first, heads)
    assert head is not None and len(heads) == 1
    for start in (1, 7):  # the same header, other tensor bytes
        body, size = make(start)
        kept_request, kept_choice, kept_head = decode_infer("m", "2", body, size, heads)
        assert kept_head is head and kept_choice == choice
        assert_same_request(kept_request, decode_infer("m", "2", body, size)[0])


def test_a_header_with_an_id_is_not_kept() -> None:
    heads = BinaryHeads()
    for request_id in ("a", "b"):
        body, size = _body(_binary("x", "FP32", [1], _f32(1)), id=request_id)
        request, _, head = decode_infer("m", "", body, size, heads)
        assert head is None and request.request_id == request_id
    assert len(heads) == 0


def test_json_data_inputs_and_json_only_bodies_are_not_kept() -> None:
    heads = BinaryHeads()
    tensor, data = _binary("x", "FP32", [1, 2], _f32(1, 2))
    in_json = {"name": "j", "datatype": "INT32", "shape": [1], "data": [5]}
    mixed = orjson.dumps({"inputs": [tensor, in_json]})
    assert decode_infer("m", "", mixed + data, len(mixed), heads)[2] is None
    json_only = orjson.dumps({"inputs": [in_json]})
    assert decode_infer("m", "", json_only, None, heads)[2] is None
    assert decode_infer("m", "", json_only, len(json_only), heads)[2] is None
    assert len(heads) == 0


def test_a_body_the_head_does_not_fit_gets_the_full_decode_s_error() -> None:
    heads = BinaryHeads()
    body, size = CASES["perf_analyzer's"](0)
    decode_infer("m", "", body, size, heads)
    for bad in (body[:-1], body + b"\0"):
        with pytest.raises(InvalidInputError) as kept:
            decode_infer("m", "", bad, size, heads)
        with pytest.raises(InvalidInputError) as full:
            decode_infer("m", "", bad, size)
        assert str(kept.value) == str(full.value)


def test_a_header_that_fails_is_not_kept_and_fails_every_time() -> None:
    heads = BinaryHeads()
    body, size = _body(_binary("x", "FP32", [1, 4], b"\0" * 15))  # 15 bytes for 16
    for _ in range(2):
        with pytest.raises(
            InvalidInputError,
            match="input byte size mismatch for input 'x' for model 'm'. Expected 16, got 15",
        ):
            decode_infer("m", "", body, size, heads)
    assert len(heads) == 0


def test_the_table_is_bounded_and_large_headers_are_not_kept() -> None:
    heads = BinaryHeads(max_heads=2, max_header_bytes=200)
    for _ in range(2):
        for i in range(5):
            body, size = _body(_binary(f"in{i}", "FP32", [1], _f32(1)))
            request, _, head = decode_infer("m", "", body, size, heads)
            assert head is not None and request.inputs[f"in{i}"].tolist() == [0.0]
            assert len(heads) <= 2
    body, size = _body(_binary("x" * 300, "FP32", [1], _f32(1)))
    decode_infer("m", "", body, size, heads)
    assert heads.get(body[:size]) is None
