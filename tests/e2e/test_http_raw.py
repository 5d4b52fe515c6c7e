"""Malformed REST requests written by hand (http.client and raw sockets): each gets a precise 4xx
with a JSON `{"error": ...}` naming what was wrong, never a 500, and the server keeps answering
well-formed requests, on the same keep-alive connection where HTTP allows it."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.server import ServerProcess

ROW = list(range(16))
GOOD = {
    "inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": ROW},
        {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": ROW},
    ]
}
LIMIT = 64 * 1024  # --max-message-bytes of the `small` server


def _tensor(name: str = "INPUT0", **fields: object) -> dict:
    return {"name": name, "datatype": "FP32", "shape": [1, 16], **fields}


def _with(first: dict) -> dict:
    return {"inputs": [first, GOOD["inputs"][1]]}


@pytest.fixture(scope="module")
def small(repo: Path) -> Iterator[ServerProcess]:
    """The standard repository behind small limits: 64 KiB bodies, 2 KiB headers, 4 connections,
    2 s to send a request head."""
    proc = ServerProcess(
        repo,
        "--max-message-bytes", str(LIMIT),
        "--http-max-header-bytes", "2048",
        "--http-max-connections", "4",
        "--http-keep-alive-secs", "2",
    ).wait_ready()  # fmt: skip
    yield proc
    proc.stop()


def post(
    c: http.client.HTTPConnection,
    body: bytes,
    headers: dict[str, str] | None = None,
    path: str = "/v2/models/add_sub/infer",
) -> tuple[int, dict[str, str], bytes]:
    c.request("POST", path, body=body, headers=headers or {})
    r = c.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def error(status: int, body: bytes) -> str:
    assert status < 500, body
    return json.loads(body)["error"]


def still_serving(server: ServerProcess) -> None:
    """On a new connection."""
    with contextlib.closing(http.client.HTTPConnection("127.0.0.1", server.http_port, 30)) as c:
        assert_still_serving(c)


def assert_still_serving(c: http.client.HTTPConnection) -> None:
    status, _, body = post(c, json.dumps(GOOD).encode())
    assert status == 200, body
    out = json.loads(body)["outputs"][0]
    assert out["name"] == "OUTPUT0" and out["data"] == [2.0 * v for v in ROW]


# (what, JSON document or raw bytes, extra headers, expected status, words in the error)
MALFORMED = [
    ("not json", b'{"inputs": [', {}, 400, "malformed JSON in the inference request"),
    ("empty body", b"", {}, 400, "malformed JSON"),
    ("json array", b"[1, 2]", {}, 400, "must be a JSON object, got an array"),
    ("no inputs", {"id": "x"}, {}, 400, "'inputs' must be a JSON array"),
    (
        "short flattened data",
        _with(_tensor(data=ROW[:15])),
        {},
        400,
        "holds 15 values, expected 16 (the shape [1, 16])",
    ),
    ("long flattened data", _with(_tensor(data=ROW + [1])), {}, 400, "holds 17 values"),
    (
        "ragged nesting, a value short",
        _with(_tensor(data=[ROW[:8], ROW[8:15]])),
        {},
        400,
        "holds 15 values, expected 16",
    ),
    (
        "strings for FP32",
        _with(_tensor(data=["a"] * 16)),
        {},
        400,
        "FP32 'data' must hold numbers, got strings",
    ),
    ("null in data", _with(_tensor(data=[None] * 16)), {}, 400, "nulls"),
    # Triton's words for a shape whose count or byte size overflows an int64 (its L0_http test).
    (
        "element count past int64",
        _with(_tensor(shape=[2**4, 2**60 + 2], data=[1.0])),
        {},
        400,
        "causes total element count to exceed maximum size of 9223372036854775807",
    ),
    (
        "byte size past int64",
        _with(_tensor(shape=[2**2, 2**60 + 2], data=[1.0])),
        {},
        400,
        "byte size overflow for input 'INPUT0': element count (4611686018427387912) * data "
        "type size (4) exceeds maximum allowed size",
    ),
    (
        "wrong datatype",
        _with(_tensor(datatype="INT32", data=ROW)),
        {},
        400,
        "input 'INPUT0' has datatype INT32, model 'add_sub' expects FP32",
    ),
    (
        "unknown datatype",
        _with(_tensor(datatype="FLOAT", data=ROW)),
        {},
        400,
        "unsupported datatype 'FLOAT'",
    ),
    (
        "shape against model",
        _with(_tensor(shape=[1, 15], data=ROW[:15])),
        {},
        400,
        "unexpected shape for input 'INPUT0' for model 'add_sub'. Expected [-1,16], got [1,15]",
    ),
    (
        "unknown input",
        {"inputs": [*GOOD["inputs"], _tensor("EXTRA", data=ROW)]},
        {},
        400,
        "unexpected inference input 'EXTRA'",
    ),
    (
        "unknown output",
        {**GOOD, "outputs": [{"name": "NOPE"}]},
        {},
        400,
        "unexpected inference output 'NOPE'",
    ),
    (
        "output requested twice",
        {**GOOD, "outputs": [{"name": "OUTPUT0"}, {"name": "OUTPUT0"}]},
        {},
        400,
        "output 'OUTPUT0' already exists in request",
    ),
    (
        "binary size without header",
        _with(_tensor(parameters={"binary_data_size": 64})),
        {},
        400,
        "no Inference-Header-Content-Length header",
    ),
    (
        "priority not a number",
        {**GOOD, "parameters": {"priority": "high"}},
        {},
        400,
        "request parameter 'priority' must be an unsigned integer",
    ),
]


@pytest.mark.parametrize(
    ("doc", "headers", "status", "words"),
    [m[1:] for m in MALFORMED],
    ids=[m[0] for m in MALFORMED],
)
def test_malformed_bodies_get_a_precise_400(
    conn: http.client.HTTPConnection, doc: object, headers: dict, status: int, words: str
) -> None:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    got, response_headers, answer = post(conn, body, headers)
    assert got == status, answer
    assert response_headers["content-type"] == "application/json"
    assert words in error(got, answer)
    assert_still_serving(conn)  # same keep-alive connection


def _binary_request(
    sections: bytes, declared: int = 64, header_delta: int = 0
) -> tuple[bytes, dict]:
    doc = {
        "inputs": [
            _tensor(parameters={"binary_data_size": declared}),
            _tensor("INPUT1", parameters={"binary_data_size": 64}),
        ]
    }
    header = json.dumps(doc).encode()
    length = str(len(header) + header_delta)
    return header + sections, {"Inference-Header-Content-Length": length}


ONE = np.ones(16, np.float32).tobytes()


@pytest.mark.parametrize(
    ("sections", "declared", "header_delta", "words"),
    [
        (ONE + ONE[:-4], 64, 0, "unexpected size for input 'INPUT1', expecting 4 additional bytes"),
        (ONE + ONE + b"xyz", 64, 0, "unexpected additional input data for model 'add_sub'"),
        (
            ONE[:32] + ONE,
            32,
            0,
            "input byte size mismatch for input 'INPUT0' for model 'add_sub'. Expected 64, got 32",
        ),
        (ONE + ONE, 64, -1, "malformed JSON in the inference request"),
        (ONE + ONE, 64, 1, "malformed JSON in the inference request"),
    ],
    ids=["section short", "section long", "size against shape", "header cut", "header long"],
)
def test_binary_sections_that_do_not_add_up(
    conn: http.client.HTTPConnection, sections: bytes, declared: int, header_delta: int, words: str
) -> None:
    body, headers = _binary_request(sections, declared, header_delta)
    status, _, answer = post(conn, body, headers)
    assert status == 400 and words in error(status, answer), answer
    assert_still_serving(conn)


@pytest.mark.parametrize(
    ("value", "status", "words"),
    [
        ("twelve", 400, "Unable to parse Inference-Header-Content-Length"),
        ("-5", 400, "inference header size should be in range"),
        ("999999", 400, "inference header size should be in range"),
        # 0 is a raw binary request: add_sub has two inputs, so nothing to deduce.
        ("0", 400, "Raw request must only have 1 input"),
    ],
)
def test_bad_inference_header_content_length(
    conn: http.client.HTTPConnection, value: str, status: int, words: str
) -> None:
    body, _ = _binary_request(ONE + ONE)
    got, _, answer = post(conn, body, {"Inference-Header-Content-Length": value})
    assert got == status and words in json.loads(answer)["error"], answer
    assert_still_serving(conn)


@pytest.mark.parametrize(
    "data",
    [[ROW[:8], ROW[8:]], [ROW[:3], [ROW[3:]]], [[[[[[v]]]]] for v in ROW]],
    ids=["other-shape", "ragged", "deep"],
)
def test_json_data_nested_any_way_is_read_in_row_major_order(
    conn: http.client.HTTPConnection, data: list
) -> None:
    """As Triton reads it (its own HTTP test sends such data): only the count must match."""
    status, _, body = post(conn, json.dumps(_with(_tensor(data=data))).encode())
    assert status == 200, body
    assert json.loads(body)["outputs"][0]["data"] == [2.0 * v for v in ROW]


def test_json_data_nested_past_100_levels_is_refused(conn: http.client.HTTPConnection) -> None:
    data: list = [ROW[1:]]
    for _ in range(101):
        data = [data]
    status, _, body = post(conn, json.dumps(_with(_tensor(data=[0, data]))).encode())
    assert status == 400
    assert (
        "input 'INPUT0': JSON nesting depth exceeds maximum allowed limit (100) in 'data'"
        in error(status, body)
    )


def test_nan_and_infinities_are_read_and_written_as_triton_does(
    conn: http.client.HTTPConnection,
) -> None:
    """Triton reads and writes NaN, Infinity and -Infinity in JSON tensor data (its L0_nan_inf
    test): a body holding them is accepted, and the answer holds them again, not null."""
    special = ["NaN", "Infinity", "-Infinity"]
    row = ", ".join([*special, *map(str, ROW[3:])])
    zeros = ", ".join(["0"] * 16)
    body = (
        '{"inputs": ['
        f'{{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [{row}]}}, '
        f'{{"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": [{zeros}]}}]}}'
    ).encode()
    status, _, answer = post(conn, body)
    assert status == 200, answer
    assert b"null" not in answer
    out = json.loads(answer)["outputs"][0]  # Python's json reads the three words
    assert out["name"] == "OUTPUT0"
    np.testing.assert_array_equal(
        np.array(out["data"], dtype=np.float32),
        np.array([np.nan, np.inf, -np.inf, *ROW[3:]], dtype=np.float32),
    )
    assert answer.count(b"-Infinity") == 2  # OUTPUT0 and OUTPUT1
    # Not a way around strict JSON otherwise: a stray word is still malformed.
    status, _, answer = post(conn, body.replace(b"NaN", b"NaNa"))
    assert status == 400 and "malformed JSON in the inference request" in error(status, answer)


def test_a_good_binary_request_by_hand(conn: http.client.HTTPConnection) -> None:
    a = np.arange(16, dtype=np.float32)
    doc = {
        "inputs": [
            _tensor(parameters={"binary_data_size": 64}),
            _tensor("INPUT1", parameters={"binary_data_size": 64}),
        ],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }
    header = json.dumps(doc).encode()
    body = header + a.tobytes() + a.tobytes()
    status, headers, answer = post(
        conn, body, {"Inference-Header-Content-Length": str(len(header))}
    )
    assert status == 200, answer
    assert headers["content-type"] == "application/octet-stream"
    size = int(headers["inference-header-content-length"])
    out = json.loads(answer[:size])["outputs"]
    assert out == [
        {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 16],
         "parameters": {"binary_data_size": 64}}
    ]  # fmt: skip
    np.testing.assert_array_equal(np.frombuffer(answer[size:], np.float32), a + a)


def test_unknown_path_and_wrong_method(conn: http.client.HTTPConnection) -> None:
    conn.request("GET", "/v3/nothing")
    r = conn.getresponse()
    assert r.status == 404 and json.loads(r.read()) == {"error": "Not Found"}
    conn.request("GET", "/v2/models/add_sub/infer")
    r = conn.getresponse()
    assert r.status == 405 and json.loads(r.read()) == {"error": "Method Not Allowed"}
    conn.request("POST", "/v2/health/live")
    r = conn.getresponse()
    assert r.status == 405
    r.read()
    assert_still_serving(conn)


def test_unsupported_content_encoding_is_501_naming_gzip_and_deflate(
    conn: http.client.HTTPConnection,
) -> None:
    status, headers, answer = post(conn, b"xx", {"Content-Encoding": "br"})
    assert status == 501 and headers["accept-encoding"] == "gzip, deflate"
    assert "Unsupported compression type 'br'" in json.loads(answer)["error"]


def test_corrupt_gzip_body_is_400(conn: http.client.HTTPConnection) -> None:
    status, _, answer = post(conn, b"definitely not gzip", {"Content-Encoding": "gzip"})
    assert status == 400 and "failed to decompress the gzip" in error(status, answer)
    assert_still_serving(conn)


# ---- limits ----------------------------------------------------------------------------------


def test_body_over_the_limit_is_413_and_the_connection_closes(small: ServerProcess) -> None:
    c = http.client.HTTPConnection("127.0.0.1", small.http_port, timeout=30)
    status, headers, answer = post(c, b"x" * (LIMIT + 1))
    assert status == 413 and headers["connection"] == "close"
    assert (
        f"exceeds the maximum allowed input size of {LIMIT} bytes. Use --max-message-bytes to "
        "increase the limit." in json.loads(answer)["error"]
    )
    c.close()
    still_serving(small)


def test_chunked_body_over_the_limit_is_413(small: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", small.http_port), timeout=30) as s:
        s.sendall(
            b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"y" * 8192
        try:
            for _ in range(LIMIT // len(chunk) + 4):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server may close as soon as it has answered
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]


def test_gzip_body_that_expands_past_the_limit_is_413(small: ServerProcess) -> None:
    bomb = gzip.compress(b" " * (LIMIT * 64))
    assert len(bomb) < LIMIT
    with contextlib.closing(http.client.HTTPConnection("127.0.0.1", small.http_port, 30)) as c:
        status, _, answer = post(c, bomb, {"Content-Encoding": "gzip"})
        assert status == 413 and "decompresses to more than" in json.loads(answer)["error"]
        assert_still_serving(c)


def test_headers_over_the_limit_are_431(small: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", small.http_port), timeout=30) as s:
        s.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert b"--http-max-header-bytes" in reply
    still_serving(small)


def test_connections_beyond_the_limit_get_503_at_once(small: ServerProcess) -> None:
    held = [socket.create_connection(("127.0.0.1", small.http_port), timeout=30) for _ in range(3)]
    try:
        time.sleep(0.3)  # the server has accepted them
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", small.http_port, 30)) as c:
            assert_still_serving(c)  # the 4th connection is within the limit
            with contextlib.closing(
                http.client.HTTPConnection("127.0.0.1", small.http_port, 30)
            ) as fifth:
                fifth.request("GET", "/v2/health/live")
                assert fifth.getresponse().status == 503
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    still_serving(small)


def test_a_connection_that_sends_no_request_head_is_closed(small: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", small.http_port), timeout=30) as s:
        s.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        assert s.recv(100) == b""  # closed by the server
    assert time.monotonic() - started < 20


def test_bytes_model_rejects_a_truncated_element(conn: http.client.HTTPConnection) -> None:
    meta = json.loads(_get(conn, "/v2/models/strings"))
    name = meta["inputs"][0]["name"]
    section = struct.pack("<I", 5) + b"ab"
    doc = {"inputs": [{"name": name, "datatype": "BYTES", "shape": [3],
                       "parameters": {"binary_data_size": len(section)}}]}  # fmt: skip
    header = json.dumps(doc).encode()
    status, _, answer = post(
        conn,
        header + section,
        {"Inference-Header-Content-Length": str(len(header))},
        path="/v2/models/strings/infer",
    )
    assert status == 400 and "BYTES element 0 declares 5 bytes" in error(status, answer)


def _get(c: http.client.HTTPConnection, path: str) -> bytes:
    c.request("GET", path)
    r = c.getresponse()
    assert r.status == 200
    return r.read()
