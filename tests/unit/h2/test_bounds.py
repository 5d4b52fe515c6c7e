"""What a peer can make the own transport hold is bounded: streams, header blocks, output it
cannot send, control answers it does not read, connections, in-flight request bytes, bytes past
a unary call's message, decompressed size. Each case: the server's answer on the wire, then a
well-behaved grpc C-core client still served; memory cases read the server's RSS from /proc."""

from __future__ import annotations

import asyncio
import zlib

import grpc
import pytest

from pipeserve.api.h2 import frames as f
from pipeserve.api.h2.limits import H2Limits
from tests.unit.h2.hostile import (
    SERVICE,
    RawClient,
    echo,
    ending,
    limits,
    message,
    rss_settled,
    run,
    serving,
    settle,
    stats,
    subprocess_server,
)

MiB = 1 << 20
OWN = 5  # in-flight bytes of the Stats call itself: its empty message's prefix


def server_settings(frames: list[tuple[int, int, int, bytes]]) -> dict[int, int]:
    for kind, flags, _, payload in frames:
        if kind == f.SETTINGS and not flags & f.ACK:
            return dict(f.parse_settings(payload))
    raise AssertionError("no SETTINGS from the server")


async def first_frames(client: RawClient, count: int) -> list[tuple[int, int, int, bytes]]:
    return [await client.frame() for _ in range(count)]


def test_concurrent_streams_are_advertised_and_refused_past_the_limit() -> None:
    async def main() -> None:
        async with serving(limits(max_concurrent_streams=8)) as (_, service, port):
            client = await RawClient.connect(port)
            frames = await first_frames(client, 2)  # SETTINGS, WINDOW_UPDATE
            assert server_settings(frames)[f.MAX_CONCURRENT_STREAMS] == 8
            for i in range(10):
                client.call(1 + 2 * i, "Wait", message(b""))
            seen = await ending(client, timeout=1.0)
            assert seen.resets == {17: f.REFUSED_STREAM, 19: f.REFUSED_STREAM}
            assert seen.goaway_code is None and not seen.closed
            assert await echo(port) == b"still answered"
            for i in range(8):
                client.send(f.RST_STREAM, 0, 1 + 2 * i, f.CANCEL.to_bytes(4, "big"))
            client.call(21, "Echo", message(b"room again"))
            assert (await client.response(21)).messages() == [b"room again"]
            assert (await settle(port))["calls"] == 1
            await client.close()

    run(main())


def test_default_concurrency_limit_is_in_the_hundreds() -> None:
    assert 100 <= H2Limits().max_concurrent_streams <= 1000


@pytest.mark.parametrize("split", [False, True], ids=["one-headers-frame", "continuations"])
def test_header_block_over_the_advertised_list_size_ends_the_connection(split: bool) -> None:
    async def main() -> None:
        async with serving() as (_, _, port):
            client = await RawClient.connect(port)
            frames = await first_frames(client, 2)
            limit = server_settings(frames)[f.MAX_HEADER_LIST_SIZE]
            assert limit == H2Limits().max_header_list_bytes
            block = client.request_headers("Echo") + f.literal(b"x-big", b"v" * (limit + 100))
            if split:
                quarter = len(block) // 4 + 1
                client.send(f.HEADERS, 0, 1, block[:quarter])
                client.send(f.CONTINUATION, 0, 1, block[quarter : 2 * quarter])
                client.send(f.CONTINUATION, 0, 1, block[2 * quarter : 3 * quarter])
                client.send(f.CONTINUATION, f.END_HEADERS, 1, block[3 * quarter :])
            else:
                client.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, block)
            seen = await ending(client)
            assert seen.goaway_code == f.ENHANCE_YOUR_CALM, seen.goaway_debug
            assert b"MAX_HEADER_LIST_SIZE" in seen.goaway_debug and seen.closed
            await client.close()
            assert await echo(port) == b"still answered"

    run(main())


def test_output_held_by_shut_windows_is_bounded_then_refuses_new_streams() -> None:
    async def main() -> None:
        async with serving(limits(max_held_output_bytes=MiB)) as (_, _, port):
            client = await RawClient.connect(port, {f.INITIAL_WINDOW_SIZE: 0})
            for i in range(4):  # 4 x 300 kB answers, none of which may be sent
                client.call(1 + 2 * i, "Big", message(b"300000"))
            headers = set()
            while len(headers) < 4:
                kind, _, sid, _ = await client.frame()
                if kind == f.HEADERS:
                    headers.add(sid)
            client.call(9, "Echo", message(b"one too many"))
            seen = await ending(client, timeout=1.0)
            assert seen.resets == {9: f.REFUSED_STREAM}
            assert not any(kind == f.DATA for kind, *_ in seen.frames)
            assert await echo(port) == b"still answered"  # other connections are not held up
            # The window opens: everything held goes out, and the connection takes streams again.
            client.send(f.SETTINGS, 0, 0, f.settings({f.INITIAL_WINDOW_SIZE: 1 << 20})[9:])
            client.send(f.WINDOW_UPDATE, 0, 0, (8 << 20).to_bytes(4, "big"))
            for i in range(4):
                response = await client.response(1 + 2 * i)
                assert response.status == 0 and len(response.messages()[0]) == 300_000
            client.call(11, "Echo", message(b"back"))
            assert (await client.response(11)).messages() == [b"back"]
            await client.close()

    run(main())


def test_a_peer_that_does_not_read_is_not_read_either_and_memory_stays_flat() -> None:
    """2,000 calls of 200 kB answers (400 MB) from a client that never reads: the socket fills,
    the server stops reading it, so it holds at most what its accepted streams produced."""

    async def main() -> None:
        with subprocess_server(limits(max_concurrent_streams=32)) as server:
            port = server.port
            before = await rss_settled(server, port)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            client = RawClient(reader, writer)
            writer.write(f.PREFACE + f.settings({f.INITIAL_WINDOW_SIZE: f.MAX_WINDOW}))
            client.send(f.WINDOW_UPDATE, 0, 0, (f.MAX_WINDOW - f.DEFAULT_WINDOW).to_bytes(4, "big"))
            for i in range(2000):  # ~120 kB of requests: the kernel takes them all
                client.call(1 + 2 * i, "Big", message(b"200000"))
                if i % 100 == 99:
                    await writer.drain()
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
            peak = server.rss()
            print("RSS before, peak:", before, peak)
            assert peak - before < 48 * MiB, (before, peak)
            assert await echo(port) == b"still answered"
            # Now read: each stream the server read got its answer (or REFUSED_STREAM).
            await client.close()
            after = await rss_settled(server, port)
            assert after - before < 8 * MiB, (before, peak, after)

    run(main())


def test_control_answers_owed_to_a_peer_are_bounded() -> None:
    async def main() -> None:
        quiet = limits(
            max_owed_control_frames=500, max_pings_per_second=10**6, max_ping_strikes=10**6
        )
        async with serving(quiet) as (_, _, port):
            client = await RawClient.connect(port)
            client.writer.write(f.frame(f.PING, 0, 0, b"12345678") * 2000)
            seen = await ending(client)
            assert seen.goaway_code == f.ENHANCE_YOUR_CALM and b"owed" in seen.goaway_debug
            assert seen.closed
            await client.close()
            assert await echo(port) == b"still answered"

    run(main())


def test_connections_are_capped_server_wide() -> None:
    async def main() -> None:
        async with serving(limits(max_connections=3)) as (_, _, port):
            clients = [await RawClient.connect(port) for _ in range(3)]
            for c in clients:
                await c.frame()  # the server's SETTINGS: accepted
            extra = await RawClient.connect(port)
            seen = await ending(extra)
            assert seen.goaway_code == f.REFUSED_STREAM and seen.closed
            assert b"3 connections" in seen.goaway_debug
            await extra.close()
            await clients.pop().close()
            await asyncio.sleep(0.2)
            assert await echo(port) == b"still answered"
            for c in clients:
                await c.close()

    run(main())


def test_inflight_request_bytes_are_capped_server_wide() -> None:
    async def main() -> None:
        async with serving(limits(max_inflight_request_bytes=MiB)) as (_, service, port):
            client = await RawClient.connect(port)
            client.call(1, "Wait", message(b"w" * 700_000))  # held by a handler that waits
            await asyncio.wait_for(service.started.wait(), 5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await echo(port, b"e" * 500_000)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "in-flight" in (err.value.details() or "")
            assert await echo(port, b"small") == b"small"
            client.send(f.RST_STREAM, 0, 1, f.CANCEL.to_bytes(4, "big"))
            await asyncio.wait_for(service.cancelled.wait(), 5)
            assert (await settle(port))["inflight"] == OWN
            assert await echo(port, b"e" * 500_000) == b"e" * 500_000
            await client.close()

    run(main())


def test_bytes_past_a_unary_message_are_refused_not_credited() -> None:
    async def main() -> None:
        async with serving() as (_, _, port):
            client = await RawClient.connect(port)
            client.send(f.HEADERS, f.END_HEADERS, 1, client.request_headers("Echo"))
            client.send(f.DATA, 0, 1, message(b"0123456789"))
            for _ in range(100):  # 1.6 MB more: once a 4 MiB window's quarter, credited back
                client.send(f.DATA, 0, 1, b"x" * 16_384)
            response = await client.response(1)
            assert response.status == grpc.StatusCode.INTERNAL.value[0]
            assert "exactly one message" in response.message
            seen = await ending(client, timeout=0.5)
            assert not [fr for fr in seen.frames if fr[0] == f.WINDOW_UPDATE and fr[2] == 1]
            assert (await stats(port))["inflight"] == OWN
            await client.close()

    run(main())


def _gzip_of_zeros(size: int) -> bytes:
    deflate = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(MiB)
    out = [deflate.compress(chunk) for _ in range(size // MiB)]
    return b"".join(out) + deflate.flush()


def _gzip_bomb(size: int) -> bytes:
    """The start of a gzip stream of `size` zeros, made in milliseconds: after a full flush the
    compressor forgets its history, so every further MiB compresses to the same bytes. It has
    no end: the server must give up long before it would need one."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(MiB)
    first = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    return first + again * (size // MiB - 1)


def test_decompression_bomb_is_stopped_while_inflating() -> None:
    """256 MiB of zeros in ~250 kB of gzip against a 16 MiB message limit."""

    async def main() -> None:
        with subprocess_server(max_message=16 * MiB) as server:
            port = server.port
            before = await rss_settled(server, port)
            bomb = _gzip_bomb(256 * MiB)
            client = await RawClient.connect(port, {f.INITIAL_WINDOW_SIZE: f.MAX_WINDOW})
            client.send(f.WINDOW_UPDATE, 0, 0, (64 * MiB).to_bytes(4, "big"))
            client.call(1, "Echo", message(bomb, compressed=True), {"grpc-encoding": "gzip"})
            response = await client.response(1, timeout=20)
            assert response.status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "decompressed" in response.message
            # A big but allowed message inflates off the event loop and is answered.
            fine = _gzip_of_zeros(8 * MiB)
            client.call(3, "Sum", message(fine, compressed=True), {"grpc-encoding": "gzip"})
            sums = await client.response(3, timeout=20)
            assert sums.messages() == [str(8 * MiB).encode()]
            client.call(5, "Size", message(fine, compressed=True), {"grpc-encoding": "gzip"})
            sized = await client.response(5, timeout=20)
            assert sized.messages() == [str(8 * MiB).encode()]
            await client.close()
            assert await echo(port) == b"still answered"
            after = await rss_settled(server, port)
            assert after - before < 24 * MiB, (before, after)

    run(main())


def test_compressed_streaming_messages_big_and_small_arrive_in_order() -> None:
    async def main() -> None:
        async with serving() as (_, _, port):
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}",
                compression=grpc.Compression.Gzip,
                options=[("grpc.max_receive_message_length", 64 << 20)],
            ) as ch:
                bidi = ch.stream_stream(
                    f"/{SERVICE}/Stream", request_serializer=bytes, response_deserializer=bytes
                )
                sent = [b"a" * 10, bytes(3 * MiB), b"b" * 100, b"c" * (2 * MiB)]
                assert [r async for r in bidi(iter(sent))] == sent
            assert (await settle(port))["inflight"] == OWN

    run(main())


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        H2Limits(max_concurrent_streams=0)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        H2Limits(idle_timeout_s=-1)
    assert H2Limits(idle_timeout_s=0).idle_timeout_s == 0  # timeouts may be turned off


def test_decompressed_size_has_its_own_limit_below_the_message_limit() -> None:
    async def main() -> None:
        async with serving(limits(max_decompressed_bytes=2 * MiB)) as (_, _, port):
            client = await RawClient.connect(port)
            over = _gzip_of_zeros(3 * MiB)
            client.call(1, "Size", message(over, compressed=True), {"grpc-encoding": "gzip"})
            response = await client.response(1)
            assert response.status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert f"more than {2 * MiB} bytes once decompressed" in response.message
            # Uncompressed, 3 MiB is only held to the message limit (64 MiB here).
            client.send(f.HEADERS, f.END_HEADERS, 3, client.request_headers("Size"))
            body = message(bytes(3 * MiB))
            for at in range(0, len(body), 512 << 10):
                last = at + (512 << 10) >= len(body)
                client.send(f.DATA, f.END_STREAM if last else 0, 3, body[at : at + (512 << 10)])
            assert (await client.response(3)).messages() == [str(3 * MiB).encode()]
            await client.close()
            assert (await settle(port))["inflight"] == OWN

    run(main())
