"""RFC 9113 rules on the wire: a raw-frame client breaks one rule, the server answers with the
exact GOAWAY / RST_STREAM code (or gRPC status) the RFC or gRPC names, and a second,
well-behaved client (and, after a stream error, the same connection) keeps getting answers."""

from __future__ import annotations

import asyncio
import gzip
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import hpack
import pytest

from pipeserve.api.h2 import frames as f
from tests.unit.h2_driver import SERVICE, EchoService, RawClient, message, start


async def hold(requests: AsyncIterator[bytes], context) -> bytes:  # type: ignore[no-untyped-def]
    """test.Rules/Hold: a client-streaming handler that never reads its requests, so the server
    stops crediting the stream window once 4 MiB of messages wait."""
    await asyncio.Event().wait()
    return b""


def run(body: Callable[[EchoService, int], Awaitable[None]]) -> None:
    async def main() -> None:
        server, service, port = await start()
        server.add_registered_method_handlers(
            "test.Rules",
            {
                "Hold": grpc.stream_unary_rpc_method_handler(
                    hold, request_deserializer=bytes, response_serializer=bytes
                )
            },
        )
        try:
            await body(service, port)
            await _still_serving(port)
        finally:
            await server.stop(0)

    asyncio.run(asyncio.wait_for(main(), 60))


async def _still_serving(port: int) -> None:
    """A second, well-behaved client gets its answer."""
    client = await RawClient.connect(port)
    client.call(1, "Echo", message(b"well-behaved"))
    response = await client.response(1)
    assert response.status == 0 and response.messages() == [b"well-behaved"]
    await client.close()


async def _same_connection_serves(client: RawClient, stream_id: int) -> None:
    client.call(stream_id, "Echo", message(b"next"))
    response = await client.response(stream_id)
    assert response.status == 0 and response.messages() == [b"next"]


async def _goaway_code(client: RawClient) -> int:
    """The error code of the server's GOAWAY; the connection is closed after it."""
    while True:
        kind, _, stream_id, payload = await client.frame()
        if kind == f.GOAWAY:
            assert stream_id == 0
            assert await asyncio.wait_for(client.reader.read(), 5) == b""  # closed
            return int.from_bytes(payload[4:8], "big")


async def _reset_code(client: RawClient, stream_id: int) -> int:
    response = await client.response(stream_id)
    assert response.goaway is None, "a stream error must not end the connection"
    assert response.reset is not None, f"stream {stream_id} was not reset: {response.__dict__}"
    return response.reset


def _headers(client: RawClient, fields: list[tuple[str, str]]) -> bytes:
    return client.encoder.encode(fields)


REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", f"/{SERVICE}/Echo"),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
]


def _with(*extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [*REQUEST, *extra]


def _without(name: str) -> list[tuple[str, str]]:
    return [field for field in REQUEST if field[0] != name]


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


# ---- connection errors: GOAWAY with the RFC's code ---------------------------------------------

CONNECTION_ERRORS: dict[str, tuple[Callable[[RawClient], None], int]] = {
    "SETTINGS on a stream": (lambda c: c.send(f.SETTINGS, 0, 1), f.PROTOCOL_ERROR),
    "PING on a stream": (lambda c: c.send(f.PING, 0, 1, b"12345678"), f.PROTOCOL_ERROR),
    "GOAWAY on a stream": (lambda c: c.send(f.GOAWAY, 0, 1, bytes(8)), f.PROTOCOL_ERROR),
    "DATA on stream 0": (lambda c: c.send(f.DATA, 0, 0, b"x"), f.PROTOCOL_ERROR),
    "HEADERS on stream 0": (
        lambda c: c.send(f.HEADERS, f.END_HEADERS, 0, c.request_headers("Echo")),
        f.PROTOCOL_ERROR,
    ),
    "RST_STREAM on stream 0": (lambda c: c.send(f.RST_STREAM, 0, 0, _u32(8)), f.PROTOCOL_ERROR),
    "CONTINUATION on stream 0": (lambda c: c.send(f.CONTINUATION, 0, 0, b"\x82"), f.PROTOCOL_ERROR),
    "PRIORITY on stream 0": (lambda c: c.send(f.PRIORITY, 0, 0, bytes(5)), f.PROTOCOL_ERROR),
    "RST_STREAM on an idle stream": (
        lambda c: c.send(f.RST_STREAM, 0, 5, _u32(8)),
        f.PROTOCOL_ERROR,
    ),
    "WINDOW_UPDATE on an idle stream": (
        lambda c: c.send(f.WINDOW_UPDATE, 0, 5, _u32(10)),
        f.PROTOCOL_ERROR,
    ),
    "SETTINGS of 5 bytes": (lambda c: c.send(f.SETTINGS, 0, 0, bytes(5)), f.FRAME_SIZE_ERROR),
    "SETTINGS ACK with a payload": (
        lambda c: c.send(f.SETTINGS, f.ACK, 0, bytes(6)),
        f.FRAME_SIZE_ERROR,
    ),
    "PING of 9 bytes": (lambda c: c.send(f.PING, 0, 0, bytes(9)), f.FRAME_SIZE_ERROR),
    "WINDOW_UPDATE of 3 bytes": (
        lambda c: c.send(f.WINDOW_UPDATE, 0, 0, bytes(3)),
        f.FRAME_SIZE_ERROR,
    ),
    "RST_STREAM of 5 bytes": (lambda c: c.send(f.RST_STREAM, 0, 1, bytes(5)), f.FRAME_SIZE_ERROR),
    "frame over SETTINGS_MAX_FRAME_SIZE": (
        # Only the header: the length alone is refused before any payload arrives.
        lambda c: c.writer.write(struct.pack(">I", (1 << 20) + 1)[1:] + bytes(6)),
        f.FRAME_SIZE_ERROR,
    ),
    "ENABLE_PUSH 2": (
        lambda c: c.send(f.SETTINGS, 0, 0, _setting(f.ENABLE_PUSH, 2)),
        f.PROTOCOL_ERROR,
    ),
    "INITIAL_WINDOW_SIZE 2^31": (
        lambda c: c.send(f.SETTINGS, 0, 0, _setting(f.INITIAL_WINDOW_SIZE, 2**31)),
        f.FLOW_CONTROL_ERROR,
    ),
    "MAX_FRAME_SIZE 16383": (
        lambda c: c.send(f.SETTINGS, 0, 0, _setting(f.MAX_FRAME_SIZE, 16_383)),
        f.PROTOCOL_ERROR,
    ),
    "MAX_FRAME_SIZE 2^24": (
        lambda c: c.send(f.SETTINGS, 0, 0, _setting(f.MAX_FRAME_SIZE, 2**24)),
        f.PROTOCOL_ERROR,
    ),
    "padding longer than a HEADERS payload": (
        lambda c: c.send(f.HEADERS, f.END_HEADERS | f.PADDED, 1, b"\x09\x82\x86"),
        f.PROTOCOL_ERROR,
    ),
    "HEADERS interrupting a header block": (
        lambda c: (
            c.send(f.HEADERS, 0, 1, c.request_headers("Echo")),
            c.send(f.HEADERS, f.END_HEADERS, 3, c.request_headers("Echo")),
        ),
        f.PROTOCOL_ERROR,
    ),
    "CONTINUATION of another stream": (
        lambda c: (
            c.send(f.HEADERS, 0, 1, c.request_headers("Echo")),
            c.send(f.CONTINUATION, f.END_HEADERS, 3, b""),
        ),
        f.PROTOCOL_ERROR,
    ),
    "connection WINDOW_UPDATE of 0": (
        lambda c: c.send(f.WINDOW_UPDATE, 0, 0, _u32(0)),
        f.PROTOCOL_ERROR,
    ),
    "connection send window over 2^31-1": (
        lambda c: c.send(f.WINDOW_UPDATE, 0, 0, _u32(f.MAX_WINDOW)),
        f.FLOW_CONTROL_ERROR,
    ),
    "decreasing stream id": (
        lambda c: (c.call(5, "Echo", message(b"5")), c.call(3, "Echo", message(b"3"))),
        f.PROTOCOL_ERROR,
    ),
    "PRIORITY of 4 bytes on an idle stream": (
        lambda c: c.send(f.PRIORITY, 0, 9, bytes(4)),
        f.FRAME_SIZE_ERROR,  # a stream error, but an idle stream cannot be reset
    ),
}


def _setting(key: int, value: int) -> bytes:
    return struct.pack(">HI", key, value)


@pytest.mark.parametrize(
    ("send", "code"), CONNECTION_ERRORS.values(), ids=list(CONNECTION_ERRORS.keys())
)
def test_connection_errors_get_goaway_with_the_rfc_code(send, code) -> None:  # type: ignore[no-untyped-def]
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        send(client)
        assert await _goaway_code(client) == code
        await client.close()

    run(body)


# ---- stream errors: RST_STREAM, the connection goes on ------------------------------------------

MALFORMED_REQUESTS: dict[str, list[tuple[str, str]]] = {
    "uppercase name": _with(("X-Trace", "1")),
    "connection header": _with(("connection", "keep-alive")),
    "keep-alive header": _with(("keep-alive", "5")),
    "proxy-connection header": _with(("proxy-connection", "keep-alive")),
    "transfer-encoding header": _with(("transfer-encoding", "chunked")),
    "upgrade header": _with(("upgrade", "h2c")),
    "te other than trailers": _with(("te", "gzip")),
    "pseudo-header after a regular one": [*REQUEST[1:], REQUEST[0]],
    "duplicate :path": [*REQUEST[:2], (":path", "/a"), *REQUEST[2:]],
    "unknown pseudo-header": [(":foo", "bar"), *REQUEST],
    ":status in a request": [(":status", "200"), *REQUEST],
    "missing :method": _without(":method"),
    "missing :scheme": _without(":scheme"),
    "missing :path": _without(":path"),
    "empty :path": [(n, "" if n == ":path" else v) for n, v in REQUEST],
    "CR in a value": _with(("x-a", "a\rb")),
    "LF in a value": _with(("x-a", "a\nb")),
    "NUL in a value": _with(("x-a", "a\x00b")),
    "NUL in a name": _with(("x-\x00", "a")),
}


@pytest.mark.parametrize("fields", MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS.keys())
def test_malformed_requests_are_reset_with_protocol_error(fields) -> None:  # type: ignore[no-untyped-def]
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        client.send(f.HEADERS, f.END_HEADERS, 1, _headers(client, fields))
        client.send(f.DATA, f.END_STREAM, 1, message(b"x"))  # in flight: must be ignored
        assert await _reset_code(client, 1) == f.PROTOCOL_ERROR
        await _same_connection_serves(client, 3)
        await client.close()

    run(body)


def test_pseudo_headers_in_trailers_and_trailers_without_end_stream() -> None:
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        for stream_id, fields, flags in [
            (1, [(":path", "/x")], f.END_HEADERS | f.END_STREAM),
            (3, [("x-checksum", "1")], f.END_HEADERS),  # trailers must end the stream
        ]:
            client.send(f.HEADERS, f.END_HEADERS, stream_id, client.request_headers("Sum"))
            client.send(f.DATA, 0, stream_id, message(b"abc"))
            client.send(f.HEADERS, flags, stream_id, _headers(client, fields))
            assert await _reset_code(client, stream_id) == f.PROTOCOL_ERROR
        # Well-formed trailers end the request.
        client.send(f.HEADERS, f.END_HEADERS, 5, client.request_headers("Sum"))
        client.send(f.DATA, 0, 5, message(b"abc"))
        client.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 5, _headers(client, [("x-a", "1")]))
        response = await client.response(5)
        assert response.status == 0 and response.messages() == [b"3"]
        await client.close()

    run(body)


def test_self_dependency_is_a_stream_error() -> None:
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        # HEADERS with the PRIORITY flag depending on its own stream.
        block = _u32(1) + b"\x10" + client.request_headers("Echo")
        client.send(f.HEADERS, f.END_HEADERS | f.PRIORITY_FLAG, 1, block)
        assert await _reset_code(client, 1) == f.PROTOCOL_ERROR
        # A PRIORITY frame making an open stream depend on itself.
        client.send(f.HEADERS, f.END_HEADERS, 3, client.request_headers("Wait"))
        client.send(f.DATA, f.END_STREAM, 3, message(b""))
        client.send(f.PRIORITY, 0, 3, _u32(3) + b"\x10")
        assert await _reset_code(client, 3) == f.PROTOCOL_ERROR
        client.send(f.PRIORITY, 0, 3, bytes(4))  # PRIORITY of the wrong size
        assert await _reset_code(client, 3) == f.FRAME_SIZE_ERROR
        await _same_connection_serves(client, 5)
        await client.close()

    run(body)


def test_window_update_of_zero_and_overflow_on_a_stream_are_stream_errors() -> None:
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        client.call(1, "Wait", message(b""))
        await asyncio.wait_for(service.started.wait(), 5)
        client.send(f.WINDOW_UPDATE, 0, 1, _u32(0))
        assert await _reset_code(client, 1) == f.PROTOCOL_ERROR
        await asyncio.wait_for(service.cancelled.wait(), 5)  # the handler is cancelled
        client.call(3, "Wait", message(b""))
        client.send(f.WINDOW_UPDATE, 0, 3, _u32(f.MAX_WINDOW))  # 65,535 + 2^31-1
        assert await _reset_code(client, 3) == f.FLOW_CONTROL_ERROR
        await _same_connection_serves(client, 5)
        await client.close()

    run(body)


def test_data_beyond_the_stream_window_is_a_flow_control_error() -> None:
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        headers = client.encoder.encode(
            [(":path", "/test.Rules/Hold") if n == ":path" else (n, v) for n, v in REQUEST]
        )
        client.send(f.HEADERS, f.END_HEADERS, 1, headers)
        chunk = message(bytes((1 << 20) - 100))  # one message per frame, under the frame limit
        for _ in range(12):  # 12 MiB: the handler reads nothing, so credit stops near 4 MiB
            client.send(f.DATA, 0, 1, chunk)
        assert await _reset_code(client, 1) == f.FLOW_CONTROL_ERROR
        await _same_connection_serves(client, 3)
        await client.close()

    run(body)


def test_data_and_headers_on_half_closed_and_closed_streams() -> None:
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        # Half-closed (remote): the request ended, the handler still runs.
        client.call(1, "Wait", message(b""))
        await asyncio.wait_for(service.started.wait(), 5)
        client.send(f.DATA, 0, 1, message(b"more"))
        assert await _reset_code(client, 1) == f.STREAM_CLOSED
        await asyncio.wait_for(service.cancelled.wait(), 5)
        client.call(3, "Echo", message(b""))
        await client.response(3)
        client.call(5, "Wait", message(b""))  # then trailers after END_STREAM
        client.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 5, _headers(client, [("x", "1")]))
        assert await _reset_code(client, 5) == f.STREAM_CLOSED
        # Reset by the client: more DATA is a stream error STREAM_CLOSED.
        client.send(f.HEADERS, f.END_HEADERS, 7, client.request_headers("Sum"))
        client.send(f.RST_STREAM, 0, 7, _u32(f.CANCEL))
        client.send(f.DATA, 0, 7, message(b"late"))
        assert await _reset_code(client, 7) == f.STREAM_CLOSED
        # Reset by the server (it answered before the request ended): late DATA is ignored.
        client.send(f.HEADERS, f.END_HEADERS, 9, client.request_headers("Nope"))
        assert (await client.response(9)).status == grpc.StatusCode.UNIMPLEMENTED.value[0]
        client.send(f.DATA, f.END_STREAM, 9, message(b"late"))
        await _same_connection_serves(client, 11)
        # Closed by END_STREAM both ways (stream 3): DATA on it ends the connection.
        client.send(f.DATA, 0, 3, message(b"after the end"))
        assert await _goaway_code(client) == f.STREAM_CLOSED
        await client.close()

    run(body)


def test_headers_reopening_a_finished_stream_end_the_connection() -> None:
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        client.call(1, "Echo", message(b"one"))
        await client.response(1)
        client.call(1, "Echo", message(b"again"))
        assert await _goaway_code(client) == f.STREAM_CLOSED
        await client.close()

    run(body)


def test_padding_longer_than_a_data_payload() -> None:
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        client.send(f.HEADERS, f.END_HEADERS, 1, client.request_headers("Echo"))
        client.send(f.DATA, f.PADDED | f.END_STREAM, 1, b"\x05abc")
        assert await _goaway_code(client) == f.PROTOCOL_ERROR
        await client.close()

    run(body)


def test_padding_is_flow_controlled_and_credited_back() -> None:
    """Padding counts against the stream window but no handler consumes it: the server must
    credit it itself, or a client sending more padding than the window would be cut off."""

    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        client.send(f.HEADERS, f.END_HEADERS, 1, client.request_headers("Sum"))
        client.send(f.DATA, 0, 1, message(b"ab"))
        padding_only = b"\xff" + bytes(255)
        for _ in range(17_000):  # 4.35 MB of padding, more than the 4 MiB stream window
            client.send(f.DATA, f.PADDED, 1, padding_only)
        client.send(f.DATA, f.END_STREAM, 1, b"")
        response = await client.response(1, timeout=20)
        assert response.reset is None and response.status == 0
        assert response.messages() == [b"2"]
        await client.close()

    run(body)


def test_initial_window_size_changes_apply_to_open_streams() -> None:
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port, {f.INITIAL_WINDOW_SIZE: 1000})
        client.call(1, "Big", message(b"5000"))
        got = 0
        while got < 1000:
            kind, _, stream_id, payload = await client.frame()
            if kind == f.DATA and stream_id == 1:
                got += len(payload)
        assert got == 1000  # the window allowed no more
        # Raising the initial window by 9,000 gives stream 1 that much more to send.
        client.send(f.SETTINGS, 0, 0, _setting(f.INITIAL_WINDOW_SIZE, 10_000))
        response = await client.response(1)
        assert got + len(response.data) == 5005 and response.status == 0
        # A change that would take an open stream's window past 2^31-1.
        client.call(3, "Wait", message(b""))
        client.send(f.WINDOW_UPDATE, 0, 3, _u32(f.MAX_WINDOW - 10_000))
        client.send(f.SETTINGS, 0, 0, _setting(f.INITIAL_WINDOW_SIZE, 10_001))
        assert await _goaway_code(client) == f.FLOW_CONTROL_ERROR
        await client.close()

    run(body)


# ---- gRPC on top ------------------------------------------------------------------------------


def test_a_method_other_than_post_is_reset_as_grpc_core_does() -> None:
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        get = [(n, "GET" if n == ":method" else v) for n, v in REQUEST]
        client.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, _headers(client, get))
        assert await _reset_code(client, 1) == f.INTERNAL_ERROR
        await _same_connection_serves(client, 3)
        await client.close()

    run(body)


def test_a_content_type_that_is_not_grpc_gets_415() -> None:
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        json = [(n, "application/json" if n == "content-type" else v) for n, v in REQUEST]
        client.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, _headers(client, json))
        response = await client.response(1)
        assert response.header_blocks[0][":status"] == "415"
        assert response.status == grpc.StatusCode.INTERNAL.value[0]
        assert "application/json" in response.message
        for stream_id, content_type in [(3, "application/grpc+proto"), (5, "application/grpc;x")]:
            fields = [(n, content_type if n == "content-type" else v) for n, v in REQUEST]
            client.send(f.HEADERS, f.END_HEADERS, stream_id, _headers(client, fields))
            client.send(f.DATA, f.END_STREAM, stream_id, message(b"suffix"))
            response = await client.response(stream_id)
            assert response.header_blocks[0][":status"] == "200"
            assert response.messages() == [b"suffix"]
        await client.close()

    run(body)


GRPC_FRAMING = {
    "truncated gzip": (
        message(gzip.compress(b"hello " * 100)[:-12], compressed=True),
        {"grpc-encoding": "gzip"},
        "truncated",
    ),
    "prefix longer than the body": (message(b"abcdef")[:-2], {}, "declares 6 bytes, 4 came"),
    "compressed flag without grpc-encoding": (
        message(b"x", compressed=True),
        {},
        "without a grpc-encoding",
    ),
    "compressed flag of 2": (b"\x02" + message(b"x")[1:], {}, "bad compressed flag 2"),
}


@pytest.mark.parametrize(
    ("data", "extra", "says"), GRPC_FRAMING.values(), ids=list(GRPC_FRAMING.keys())
)
def test_bad_grpc_framing_is_internal(data, extra, says) -> None:  # type: ignore[no-untyped-def]
    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        client.call(1, "Echo", data, extra)
        response = await client.response(1)
        assert response.status == grpc.StatusCode.INTERNAL.value[0]
        assert says in response.message
        # The same in a client stream, ended inside the message.
        client.send(f.HEADERS, f.END_HEADERS, 3, client.request_headers("Sum", extra))
        client.send(f.DATA, f.END_STREAM, 3, data)
        response = await client.response(3)
        assert response.status == grpc.StatusCode.INTERNAL.value[0]
        await _same_connection_serves(client, 5)
        await client.close()

    run(body)


def test_hpack_state_survives_a_refused_stream() -> None:
    """A stream refused for its headers still had its block decoded: the next block, which
    refers to entries that one added to the HPACK table, decodes right."""

    async def body(service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        encoder = hpack.Encoder()
        bad = encoder.encode(_with(("x-new-entry", "value"), ("connection", "close")))
        client.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, bad)
        assert await _reset_code(client, 1) == f.PROTOCOL_ERROR
        good = encoder.encode(_with(("x-new-entry", "value")))  # indexed from the table now
        client.send(f.HEADERS, f.END_HEADERS, 3, good)
        client.send(f.DATA, f.END_STREAM, 3, message(b"in step"))
        response = await client.response(3)
        assert response.messages() == [b"in step"]
        await client.close()

    run(body)
