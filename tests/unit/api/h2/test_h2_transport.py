"""api/h2 end to end in one process: the real grpc client (C-core) for what clients do, a raw
frame-by-frame client for what they rarely do (bad frames, tiny windows, resets)."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Awaitable, Callable

import grpc
import pytest

from pipeserve.api.h2 import frames as f
from tests.unit.h2_driver import SERVICE, RawClient, channel, message, start, unary


def run(body: Callable[..., Awaitable[None]]) -> None:
    async def main() -> None:
        server, service, port = await start()
        try:
            await body(service, port)
        finally:
            await server.stop(0)

    asyncio.run(asyncio.wait_for(main(), 60))


def _same(b: bytes) -> bytes:
    return b


# ---- the real gRPC client ---------------------------------------------------------------------


def test_unary_echo_small_and_large_both_directions() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        async with channel(port) as ch:
            assert await unary(ch, "Echo")(b"hello") == b"hello"
            assert await unary(ch, "Echo")(b"") == b""
            big = bytes(range(256)) * (40_000)  # 10 MiB: many frames and window updates
            assert await unary(ch, "Echo")(big) == big
            out = await unary(ch, "Big")(b"20000000")
            assert len(out) == 20_000_000 and out[:256] == bytes(range(256))

    run(body)


def test_many_concurrent_calls_on_one_connection() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        async with channel(port) as ch:
            echo = unary(ch, "Echo")
            payloads = [str(i).encode() * (i % 50 + 1) for i in range(500)]
            assert await asyncio.gather(*(echo(p) for p in payloads)) == payloads

    run(body)


def test_abort_code_and_non_ascii_message_reach_the_client() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        async with channel(port) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch, "Abort")(b"")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == "no such thing: ünïcode 100%"

    run(body)


def test_unknown_method_is_unimplemented() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        async with channel(port) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary("/test.Echo/Nope")(b"")
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "/test.Echo/Nope" in err.value.details()

    run(body)


def test_deadline_cancels_the_handler_and_answers_deadline_exceeded() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        async with channel(port) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch, "Wait")(b"", timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(service.cancelled.wait(), 5)

    run(body)


def test_client_cancel_cancels_the_handler() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        async with channel(port) as ch:
            call = unary(ch, "Wait")(b"")
            await asyncio.wait_for(service.started.wait(), 5)
            call.cancel()
            await asyncio.wait_for(service.cancelled.wait(), 5)
            assert await unary(ch, "Echo")(b"still fine") == b"still fine"

    run(body)


def test_streams_in_every_direction() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        async with channel(port) as ch:
            bidi = ch.stream_stream(
                f"/{SERVICE}/Stream", request_serializer=_same, response_deserializer=_same
            )
            sent = [str(i).encode() * 1000 for i in range(200)]
            got = [r async for r in bidi(iter(sent))]
            assert got == sent
            total = await ch.stream_unary(
                f"/{SERVICE}/Sum", request_serializer=_same, response_deserializer=_same
            )(iter([b"a" * (3 << 20)] * 6))  # 18 MiB in, more than the stream window
            assert total == str(18 << 20).encode()
            many = ch.unary_stream(
                f"/{SERVICE}/Repeat", request_serializer=_same, response_deserializer=_same
            )(b"1000")
            assert [r async for r in many] == [str(i).encode() for i in range(1000)]

    run(body)


def test_gzip_and_deflate_requests_are_decompressed() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        for algorithm in (grpc.Compression.Gzip, grpc.Compression.Deflate):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", compression=algorithm) as ch:
                payload = b"compress me " * 10_000
                assert await unary(ch, "Echo")(payload) == payload

    run(body)


def test_message_over_the_limit_is_resource_exhausted() -> None:
    async def main() -> None:
        server, _, port = await start(max_message=1 << 20)
        try:
            async with channel(port) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await unary(ch, "Echo")(b"x" * (2 << 20))
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert f"({2 << 20} vs. {1 << 20})" in err.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await unary(ch, "Big")(str(2 << 20).encode())
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert await unary(ch, "Echo")(b"ok") == b"ok"
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_stop_lets_calls_in_flight_finish_and_refuses_new_ones() -> None:
    async def main() -> None:
        server, service, port = await start()
        async with channel(port) as ch:
            # A call that finishes by itself during the grace period...
            slow = asyncio.ensure_future(unary(ch, "Big")(b"1000"))
            assert await slow == await unary(ch, "Big")(b"1000")
            waiting = asyncio.ensure_future(unary(ch, "Wait")(b""))
            await asyncio.wait_for(service.started.wait(), 5)
            await server.stop(0.2)  # ...and one that does not: cancelled with UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await waiting
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert service.cancelled.is_set()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch, "Echo")(b"after stop", timeout=2)
            assert err.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )

    asyncio.run(asyncio.wait_for(main(), 30))


# ---- raw frames -----------------------------------------------------------------------------


def test_http1_request_gets_a_clear_answer() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 505")
        assert b"gRPC" in answer and b"HTTP/2" in answer
        writer.close()
        await writer.wait_closed()

    run(body)


def test_ping_is_answered_and_settings_acknowledged() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        client = await RawClient.connect(port)
        client.send(f.PING, 0, 0, b"12345678")
        seen = []
        while (f.PING, f.ACK, b"12345678") not in seen:
            kind, flags, _, payload = await client.frame()
            seen.append((kind, flags, payload))
        assert (f.SETTINGS, f.ACK, b"") in seen
        await client.close()

    run(body)


def test_continuation_and_padding_are_understood() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        client = await RawClient.connect(port)
        block = client.request_headers("Echo")
        padded = bytes((3,)) + block[:10] + b"\0\0\0"
        client.send(f.HEADERS, f.PADDED, 1, padded)
        client.send(f.CONTINUATION, 0, 1, block[10:20])
        client.send(f.CONTINUATION, f.END_HEADERS, 1, block[20:])
        body_ = message(b"padded")
        client.send(f.DATA, f.PADDED | f.END_STREAM, 1, bytes((2,)) + body_ + b"\0\0")
        response = await client.response(1)
        assert response.status == 0 and response.messages() == [b"padded"]
        await client.close()

    run(body)


def test_small_client_window_gets_data_as_window_opens_and_trailers_last() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        client = await RawClient.connect(port, {f.INITIAL_WINDOW_SIZE: 1000})
        client.call(1, "Big", message(b"5000"))
        got = b""
        frames = 0
        while len(got) < 5005:
            kind, flags, sid, payload = await client.frame()
            if kind == f.DATA and sid == 1:
                got += payload
                frames += 1
                assert not flags & f.END_STREAM
                client.send(f.WINDOW_UPDATE, 0, 1, len(payload).to_bytes(4, "big"))
        assert frames >= 5  # never more than the window at once
        response = await client.response(1)
        assert response.ended and response.status == 0
        assert got[5:] == bytes(range(256)) * 19 + bytes(5000 - 19 * 256)
        await client.close()

    run(body)


def test_reset_stream_cancels_handler_and_connection_goes_on() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        client = await RawClient.connect(port)
        client.call(1, "Wait", message(b""))
        await asyncio.wait_for(service.started.wait(), 5)
        client.send(f.RST_STREAM, 0, 1, f.CANCEL.to_bytes(4, "big"))
        await asyncio.wait_for(service.cancelled.wait(), 5)
        client.call(3, "Echo", message(b"after reset"))
        response = await client.response(3)
        assert response.messages() == [b"after reset"]
        await client.close()

    run(body)


@pytest.mark.parametrize(
    ("send", "code"),
    [
        (lambda c: c.send(f.DATA, 0, 7, message(b"x")), f.PROTOCOL_ERROR),  # idle stream
        (lambda c: c.send(f.PING, 0, 0, b"short"), f.FRAME_SIZE_ERROR),
        (lambda c: c.send(f.CONTINUATION, f.END_HEADERS, 1, b"\x82"), f.PROTOCOL_ERROR),
        (
            lambda c: c.send(f.HEADERS, f.END_HEADERS, 2, c.request_headers("Echo")),
            f.PROTOCOL_ERROR,
        ),
        (lambda c: c.send(f.HEADERS, f.END_HEADERS, 1, b"\xff\xff\xff\xff"), f.COMPRESSION_ERROR),
    ],
    ids=["data-on-idle-stream", "short-ping", "stray-continuation", "even-stream-id", "bad-hpack"],
)
def test_protocol_errors_end_the_connection_with_goaway(send, code) -> None:  # type: ignore[no-untyped-def]
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        client = await RawClient.connect(port)
        send(client)
        response = await client.response(1)
        assert response.goaway is not None
        assert int.from_bytes(response.goaway[4:8], "big") == code
        await client.close()

    run(body)


def test_unary_with_two_messages_is_rejected() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        client = await RawClient.connect(port)
        client.call(1, "Echo", message(b"one") + message(b"two"))
        response = await client.response(1)
        assert response.status == grpc.StatusCode.INTERNAL.value[0]
        assert "exactly one message" in response.message
        await client.close()

    run(body)


def test_unknown_compression_and_bad_timeout_are_answered() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        client = await RawClient.connect(port)
        client.call(1, "Echo", message(b"x", compressed=True), {"grpc-encoding": "snappy"})
        response = await client.response(1)
        assert response.status == grpc.StatusCode.UNIMPLEMENTED.value[0]
        assert "snappy" in response.message
        client.call(3, "Echo", message(b"x"), {"grpc-timeout": "soon"})
        response = await client.response(3)
        assert response.status == grpc.StatusCode.INTERNAL.value[0]
        assert "grpc-timeout" in response.message
        compressed = gzip.compress(b"zipped")
        client.call(5, "Echo", message(compressed, compressed=True), {"grpc-encoding": "gzip"})
        response = await client.response(5)
        assert response.messages() == [b"zipped"]
        raw = zlib.compress(b"deflated")
        client.call(7, "Echo", message(raw, compressed=True), {"grpc-encoding": "deflate"})
        response = await client.response(7)
        assert response.messages() == [b"deflated"]
        await client.close()

    run(body)


def test_not_grpc_content_type_is_refused() -> None:
    async def body(service, port) -> None:  # type: ignore[no-untyped-def]
        client = await RawClient.connect(port)
        block = client.encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", f"/{SERVICE}/Echo"),
                (":authority", "x"),
                ("content-type", "application/json"),
            ]
        )
        client.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, block)
        response = await client.response(1)
        assert response.status == grpc.StatusCode.INTERNAL.value[0]
        assert "application/grpc" in response.message
        await client.close()

    run(body)
