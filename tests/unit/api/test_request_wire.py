"""The kept-header reader gives exactly the request the full parse gives, or leaves it to the
full parse; it never answers differently."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pipeserve.api.codec import decode_request
from pipeserve.api.generated import grpc_service_pb2 as pb
from pipeserve.api.kept_heads import HeadTable
from pipeserve.api.request_wire import RequestReader
from pipeserve.errors import InvalidInputError
from tests.unit.api.same_request import assert_same_request


def _message(
    *inputs: tuple[str, str, list[int], bytes],
    model: str = "m",
    version: str = "",
    request_id: str = "",
    outputs: tuple[str, ...] = (),
    classify: dict[str, int] | None = None,
    parameters: dict[str, object] | None = None,
) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, datatype, shape, raw in inputs:
        msg.inputs.add(name=name, datatype=datatype, shape=shape)
        msg.raw_input_contents.append(raw)
    for name in outputs:
        out = msg.outputs.add(name=name)
        if classify and name in classify:
            out.parameters["classification"].int64_param = classify[name]
    for key, value in (parameters or {}).items():
        if isinstance(value, bool):
            msg.parameters[key].bool_param = value
        elif isinstance(value, int):
            msg.parameters[key].int64_param = value
        else:
            msg.parameters[key].string_param = str(value)
    return msg


def _f32(*shape: int) -> bytes:
    return np.arange(int(np.prod(shape)), dtype=np.float32).tobytes()


CASES = {
    "perf_analyzer's": _message(
        ("x", "FP32", [1, 16], _f32(1, 16)),
        outputs=("y",),
        parameters={"triton_enable_empty_final_response": False},
    ),
    "bare": _message(("x", "FP32", [1, 16], _f32(1, 16))),
    "with id and version": _message(
        ("x", "FP32", [2, 3], _f32(2, 3)), version="3", request_id="req-7"
    ),
    "unicode": _message(("ïn", "FP32", [1], _f32(1)), model="mödel", request_id="ïd-✓"),
    "several inputs": _message(
        ("a", "INT64", [1, 2], np.array([[1, 2]], np.int64).tobytes()),
        ("b", "FP16", [1, 3], np.ones(3, np.float16).tobytes()),
        ("c", "BOOL", [1, 1], b"\x01"),
    ),
    "BYTES input": _message(
        ("s", "BYTES", [2], struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0)),
    ),
    "empty tensor": _message(("x", "FP32", [0, 4], b"")),
    "two-byte lengths": _message(
        ("x" * 200, "FP32", [1, 300], _f32(1, 300)), request_id="r" * 150, outputs=("y" * 130,)
    ),
    "large tensor": _message(("x", "FP32", [1, 3, 224, 224], _f32(1, 3, 224, 224))),
    "priority, timeout, classification": _message(
        ("x", "FP32", [1, 4], _f32(1, 4)),
        outputs=("y", "z"),
        classify={"z": 3},
        parameters={"priority": 2, "timeout": 5000, "tag": "blue"},
    ),
}


@pytest.mark.parametrize("msg", CASES.values(), ids=CASES.keys())
def test_a_read_request_equals_the_parsed_one_first_time_and_kept(
    msg: pb.ModelInferRequest,
) -> None:
    reader = RequestReader()
    body = msg.SerializeToString()
    expected = decode_request(pb.ModelInferRequest.FromString(body))
    for _ in range(2):  # the first read decodes the head, the second takes the kept one
        read = reader.read(memoryview(bytearray(body)))
        assert read is not None
        head, raw, request_id = read
        assert_same_request(head.request(raw, request_id), expected)
    assert len(reader) == 1


def test_the_tensors_outlive_the_buffer_they_were_read_from() -> None:
    reader = RequestReader()
    buffer = bytearray(CASES["bare"].SerializeToString())
    read = reader.read(memoryview(buffer))
    assert read is not None
    head, raw, request_id = read
    buffer[:] = b"\xff" * len(buffer)  # the transport reuses its read buffer
    assert head.request(raw, request_id).inputs["x"].tolist() == [list(range(16))]


@pytest.mark.parametrize("msg", CASES.values(), ids=CASES.keys())
def test_a_kept_body_gives_the_same_request_from_views_of_it(msg: pb.ModelInferRequest) -> None:
    """`kept`: the tensors are views of the body (no copy), and the same request."""
    reader = RequestReader()
    body = msg.SerializeToString()
    expected = decode_request(pb.ModelInferRequest.FromString(body))
    buffer = bytearray(body)
    read = reader.read(memoryview(buffer).toreadonly(), kept=True)
    assert read is not None
    head, raw, request_id = read
    request = head.request(raw, request_id)
    assert_same_request(request, expected)
    for array in request.inputs.values():
        if array.dtype != object and array.nbytes:
            assert np.shares_memory(array, np.frombuffer(buffer, np.uint8))
            assert not array.flags.writeable


def test_requests_that_differ_only_in_id_share_one_head() -> None:
    reader = RequestReader()
    reads = [
        reader.read(_message(("x", "FP32", [1], _f32(1)), request_id=i).SerializeToString())
        for i in ("", "a", "bb", "a")
    ]
    assert all(r is not None for r in reads)
    assert len({id(r[0]) for r in reads if r is not None}) == 1
    assert [r[2] for r in reads if r is not None] == ["", "a", "bb", "a"]
    assert len(reader) == 1


def _raw_field(data: bytes) -> bytes:
    assert len(data) < 0x80
    return b"\x3a" + bytes((len(data),)) + data


GOOD = CASES["bare"].SerializeToString()
HEADER = GOOD[: GOOD.index(b"\x3a\x40")]  # the 64 tensor bytes' field starts there
FALLBACKS = {
    "typed contents": pb.ModelInferRequest(
        model_name="m",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="x",
                datatype="INT32",
                shape=[1],
                contents=pb.InferTensorContents(int_contents=[1]),
            )
        ],
    ).SerializeToString(),
    "no inputs at all": pb.ModelInferRequest(model_name="m").SerializeToString(),
    "a header field after the contents": GOOD + b"\x0a\x01n",
    "an unknown field": HEADER + b"\x42\x01z" + _raw_field(b"\0" * 4),
    "a varint field": b"\x08\x01" + GOOD,
    "a field number over 15": b"\x82\x01\x00" + GOOD,
    "two ids": b"\x1a\x01a\x1a\x01b" + GOOD,
    "an id that is not UTF-8": b"\x1a\x01\xff" + GOOD,
    "a length past the end": GOOD[:-1],
    "a truncated length": HEADER + b"\x3a",
    "a truncated multi-byte length": HEADER + b"\x3a\x80",
    "a header that does not decode": _message(("x", "FP99", [1], b"\0")).SerializeToString(),
    "a count that does not match": HEADER + _raw_field(b"\0" * 64) + _raw_field(b"\0"),
}


@pytest.mark.parametrize("body", FALLBACKS.values(), ids=FALLBACKS.keys())
def test_other_forms_are_left_to_the_full_parse(body: bytes) -> None:
    reader = RequestReader()
    reader.read(GOOD)  # a kept head, for the forms that reuse its header
    assert reader.read(body) is None


def test_a_count_that_does_not_match_a_kept_head_is_left_to_the_full_parse() -> None:
    reader = RequestReader()
    assert reader.read(GOOD) is not None
    assert reader.read(HEADER + _raw_field(b"\0" * 64) + _raw_field(b"\0")) is None
    with pytest.raises(InvalidInputError, match="expected 1 raw_input_contents"):
        decode_request(
            pb.ModelInferRequest.FromString(HEADER + _raw_field(b"\0" * 64) + _raw_field(b"\0"))
        )


def test_a_wrong_byte_count_is_refused_with_the_full_parse_s_words() -> None:
    body = _message(("x", "FP32", [1, 4], b"\0" * 15)).SerializeToString()
    with pytest.raises(InvalidInputError) as full:
        decode_request(pb.ModelInferRequest.FromString(body))
    reader = RequestReader()
    for _ in range(2):
        read = reader.read(body)
        assert read is not None
        head, raw, request_id = read
        with pytest.raises(InvalidInputError) as fast:
            head.request(raw, request_id)
        assert str(fast.value) == str(full.value)
        assert "input byte size mismatch for input 'x' for model 'm'. Expected 16, got 15" in str(
            fast.value
        )


def test_the_kept_heads_are_bounded_and_a_large_header_is_not_kept() -> None:
    reader = RequestReader(HeadTable(max_heads=2, max_header_bytes=200))
    bodies = [_message((f"in{i}", "FP32", [1], _f32(1))).SerializeToString() for i in range(5)]
    for body in bodies + bodies:
        read = reader.read(body)
        assert read is not None
        assert_same_request(
            read[0].request(read[1], read[2]), decode_request(pb.ModelInferRequest.FromString(body))
        )
        assert len(reader) <= 2
    large = _message(("x" * 300, "FP32", [1], _f32(1))).SerializeToString()
    assert reader.read(large) is None


def _outcome(call):  # type: ignore[no-untyped-def]
    try:
        return call(), None
    except Exception as exc:  # the type and words of a refusal are part of the answer
        return None, (type(exc).__name__, str(exc))


def test_mutated_messages_get_the_full_parse_s_answer_or_are_left_to_it() -> None:
    """Bytes flipped, dropped, inserted and cut in valid messages (a fixed seed): wherever the
    reader answers, its answer (request or refusal) is the full parse's; where the full parse
    cannot parse the message, the reader never answers."""
    rng = np.random.default_rng(15)
    reader = RequestReader()
    seeds = [msg.SerializeToString() for msg in CASES.values() if msg.ByteSize() < 10_000]
    answered = 0
    for _ in range(6000):
        body = bytearray(seeds[int(rng.integers(len(seeds)))])
        for _ in range(int(rng.integers(1, 3))):
            at = int(rng.integers(len(body)))
            what = int(rng.integers(4))
            if what == 0:
                body[at] = int(rng.integers(256))
            elif what == 1:
                del body[at]
            elif what == 2:
                body.insert(at, int(rng.integers(256)))
            else:
                del body[at:]
            if not body:
                body = bytearray(b"\x3a\x00")
        data = bytes(body)
        parsed, parse_error = _outcome(lambda: pb.ModelInferRequest.FromString(data))  # noqa: B023
        read = reader.read(memoryview(bytearray(data)))
        if parse_error is not None:
            assert read is None, data
            continue
        if read is None:
            continue
        answered += 1
        head, raw, request_id = read
        fast, fast_error = _outcome(lambda: head.request(raw, request_id))  # noqa: B023
        full, full_error = _outcome(lambda: decode_request(parsed))  # noqa: B023
        assert fast_error == full_error, data
        if full is not None:
            assert fast is not None
            assert_same_request(fast, full)
    print("answered", answered)
    assert answered > 300  # the reader did answer a good share of them (498 with this seed)
