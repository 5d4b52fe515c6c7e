"""Known attacks on HTTP/2 servers, mitigated as nghttp2 and grpc-core do: rapid reset,
CONTINUATION floods, HPACK bombs, SETTINGS/PING/empty-frame floods, and frames whose cost grows
with the number of blocked streams. Each case: the server's answer on the wire, a well-behaved
grpc C-core client still served, and (rapid reset) the server's memory back where it was."""

from __future__ import annotations

import asyncio

from pipeserve.api.h2 import frames as f
from pipeserve.api.h2.limits import H2Limits
from tests.unit.api.h2.hostile import (
    RawClient,
    echo,
    ending,
    limits,
    message,
    rss_settled,
    run,
    serving,
    settle,
    subprocess_server,
)

MiB = 1 << 20
CANCEL = f.CANCEL.to_bytes(4, "big")


def rapid_resets(client: RawClient, count: int, first: int = 1) -> bytes:
    """HEADERS + DATA(END_STREAM) + RST_STREAM for `count` streams, as one burst: each call is
    created and reset before its handler task ever runs."""
    block = client.request_headers("Echo")
    body = message(b"r" * 100)
    out = bytearray()
    for i in range(count):
        sid = first + 2 * i
        out += f.frame(f.HEADERS, f.END_HEADERS, sid, block)
        out += f.frame(f.DATA, f.END_STREAM, sid, body)
        out += f.frame(f.RST_STREAM, 0, sid, CANCEL)
    return bytes(out)


def test_rapid_reset_streams_are_freed_and_memory_returns() -> None:
    async def main() -> None:
        with subprocess_server(limits(reset_burst=10**6)) as server:
            port = server.port
            before = await rss_settled(server, port)
            client = await RawClient.connect(port)
            client.writer.write(rapid_resets(client, 5000))
            await client.writer.drain()
            client.call(10_001, "Echo", message(b"after the resets"))
            assert (await client.response(10_001, timeout=20)).messages() == [b"after the resets"]
            assert await echo(port) == b"still answered"
            assert (await settle(port))["calls"] == 1  # only the Stats call itself
            await client.close()
            after = await rss_settled(server, port)
            assert after - before < 4 * MiB, (before, after)

    run(main())


def test_rapid_reset_flood_gets_goaway_enhance_your_calm() -> None:
    async def main() -> None:
        async with serving() as (_, _, port):
            client = await RawClient.connect(port)
            client.writer.write(rapid_resets(client, 5000))
            seen = await ending(client)
            assert seen.goaway_code == f.ENHANCE_YOUR_CALM and seen.closed
            assert b"reset" in seen.goaway_debug
            # nghttp2's bucket: about reset_burst streams went through before the GOAWAY.
            assert seen.last_stream_id is not None
            assert 1000 <= seen.last_stream_id // 2 <= 1100
            await client.close()
            assert (await settle(port))["calls"] == 1
            assert await echo(port) == b"still answered"

    run(main())


def test_resets_of_answered_streams_and_cancellations_at_a_normal_rate_are_fine() -> None:
    async def main() -> None:
        async with serving(limits(reset_burst=10)) as (_, service, port):
            client = await RawClient.connect(port)
            ids = iter(range(1, 1000, 2))
            for i in range(40):  # 40 answered calls, each followed by a stray reset
                sid = next(ids)
                client.call(sid, "Echo", message(b"x"))
                assert (await client.response(sid)).messages() == [b"x"]
                client.send(f.RST_STREAM, 0, sid, CANCEL)
                if i % 4 == 0:  # and one real cancellation in four: answered calls pay for it
                    sid = next(ids)
                    client.call(sid, "Wait", message(b""))
                    client.send(f.RST_STREAM, 0, sid, CANCEL)
            sid = next(ids)
            client.call(sid, "Echo", message(b"fine"))
            response = await client.response(sid)
            assert response.goaway is None and response.messages() == [b"fine"]
            await client.close()

    run(main())


def test_continuation_flood_is_cut_off() -> None:
    async def main() -> None:
        async with serving() as (_, _, port):
            client = await RawClient.connect(port)
            block = client.request_headers("Echo")
            client.send(f.HEADERS, 0, 1, block[:3])
            for _ in range(50):
                client.send(f.CONTINUATION, 0, 1, b"")
            seen = await ending(client)
            assert seen.goaway_code == f.ENHANCE_YOUR_CALM and seen.closed
            assert b"CONTINUATION" in seen.goaway_debug
            await client.close()
            assert await echo(port) == b"still answered"

    run(main())


def test_hpack_table_size_update_storm_is_a_compression_error() -> None:
    async def main() -> None:
        async with serving() as (_, _, port):
            client = await RawClient.connect(port)
            bomb = b"\x20" * 10_000 + client.request_headers("Echo")  # 10,000 size updates
            client.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, bomb)
            seen = await ending(client)
            assert seen.goaway_code == f.COMPRESSION_ERROR and seen.closed
            assert b"table size updates" in seen.goaway_debug
            await client.close()
            assert await echo(port) == b"still answered"

    run(main())


def test_hpack_bomb_of_references_to_one_big_entry_is_stopped() -> None:
    """One 4 kB header added to the table, then a block of 2,000 one-byte references to it:
    8 MB of headers from 2 kB. Decoding stops at the header list limit."""

    async def main() -> None:
        async with serving() as (_, _, port):
            client = await RawClient.connect(port)
            seed = client.request_headers("Echo", {"x-seed": "s" * 4000})
            client.send(f.HEADERS, f.END_HEADERS, 1, seed)
            client.send(f.DATA, f.END_STREAM, 1, message(b"seeded"))
            assert (await client.response(1)).messages() == [b"seeded"]
            newest = 0x80 | 62  # indexed field: dynamic table entry 62, the latest added
            bomb = client.request_headers("Echo") + bytes((newest,)) * 2000
            client.send(f.HEADERS, f.END_HEADERS | f.END_STREAM, 3, bomb)
            seen = await ending(client)
            assert seen.goaway_code == f.ENHANCE_YOUR_CALM and seen.closed
            assert b"header list" in seen.goaway_debug
            await client.close()
            assert await echo(port) == b"still answered"

    run(main())


def test_settings_flood_gets_enhance_your_calm() -> None:
    async def main() -> None:
        async with serving() as (_, _, port):
            client = await RawClient.connect(port)
            client.writer.write(f.settings({f.MAX_FRAME_SIZE: 16_384}) * 500)
            seen = await ending(client)
            assert seen.goaway_code == f.ENHANCE_YOUR_CALM and seen.closed
            assert b"SETTINGS" in seen.goaway_debug
            acks = [fr for fr in seen.frames if fr[0] == f.SETTINGS and fr[1] & f.ACK]
            assert len(acks) <= H2Limits().max_settings_per_second + 1
            await client.close()
            assert await echo(port) == b"still answered"

    run(main())


def test_settings_frame_with_too_many_entries_is_refused() -> None:
    async def main() -> None:
        async with serving() as (_, _, port):
            client = await RawClient.connect(port)
            client.send(f.SETTINGS, 0, 0, f.settings({f.MAX_FRAME_SIZE: 16_384})[9:] * 100)
            seen = await ending(client)
            assert seen.goaway_code == f.ENHANCE_YOUR_CALM and b"entries" in seen.goaway_debug
            await client.close()

    run(main())


def test_ping_flood_gets_enhance_your_calm() -> None:
    async def main() -> None:
        async with serving(limits(max_ping_strikes=10**6)) as (_, _, port):
            client = await RawClient.connect(port)
            client.writer.write(f.frame(f.PING, 0, 0, b"12345678") * 900)
            await client.writer.drain()
            await asyncio.sleep(0.05)
            client.writer.write(f.frame(f.PING, 0, 0, b"12345678") * 200)
            seen = await ending(client)
            assert seen.goaway_code == f.ENHANCE_YOUR_CALM and b"PING" in seen.goaway_debug
            await client.close()
            assert await echo(port) == b"still answered"

    run(main())


def test_pinging_too_often_gets_too_many_pings_as_from_grpc_core() -> None:
    async def main() -> None:
        async with serving() as (_, _, port):
            client = await RawClient.connect(port)
            for _ in range(4):  # the first is free, then two strikes are tolerated
                client.send(f.PING, 0, 0, b"12345678")
            seen = await ending(client)
            assert seen.goaway_code == f.ENHANCE_YOUR_CALM and seen.closed
            assert seen.goaway_debug == b"too_many_pings"
            await client.close()
            # Pings between answers are not strikes: the server sent data since the last one.
            client = await RawClient.connect(port)
            for i in range(6):
                client.send(f.PING, 0, 0, b"12345678")
                client.call(1 + 2 * i, "Echo", message(b"p"))
                response = await client.response(1 + 2 * i)
                assert response.goaway is None and response.messages() == [b"p"]
            await client.close()

    run(main())


def test_pings_while_a_long_answer_is_read_are_not_strikes() -> None:
    """grpc-core's client pings as it reads a big answer (its BDP probe): every DATA frame the
    server writes resets the strikes, not only the start of an answer. (A 1.9 GB answer to
    tritonclient was cut off with too_many_pings before.)"""

    async def main() -> None:
        async with serving() as (_, _, port):
            client = await RawClient.connect(port, {f.INITIAL_WINDOW_SIZE: 0})
            client.call(1, "Big", message(b"100000"))
            got = 0
            for _ in range(10):  # each round: windows for 10,000 more bytes, then a ping
                client.send(f.WINDOW_UPDATE, 0, 0, (10_000).to_bytes(4, "big"))
                client.send(f.WINDOW_UPDATE, 0, 1, (10_000).to_bytes(4, "big"))
                client.send(f.PING, 0, 0, b"12345678")
                while True:
                    kind, _, sid, payload = await client.frame()
                    assert kind != f.GOAWAY, payload
                    if kind == f.DATA and sid == 1:
                        got += len(payload)
                    if kind == f.PING:  # its ACK comes after the data this window allowed
                        break
            assert got >= 90_000
            client.send(f.WINDOW_UPDATE, 0, 1, (1 << 20).to_bytes(4, "big"))
            response = await client.response(1)
            assert response.goaway is None and response.status == 0
            await client.close()

    run(main())


def test_empty_frame_flood_gets_enhance_your_calm() -> None:
    async def main() -> None:
        async with serving() as (_, _, port):
            client = await RawClient.connect(port)
            client.send(f.HEADERS, f.END_HEADERS, 1, client.request_headers("Sum"))
            client.writer.write(f.frame(f.DATA, 0, 1, b"") * 2000)
            seen = await ending(client)
            assert seen.goaway_code == f.ENHANCE_YOUR_CALM and b"empty" in seen.goaway_debug
            await client.close()
            assert (await settle(port))["calls"] == 1
            assert await echo(port) == b"still answered"

    run(main())


def test_blocked_streams_are_served_in_order_as_windows_open() -> None:
    """200 answers held by shut windows; 500 connection WINDOW_UPDATEs and SETTINGS frames that
    open nothing cost nothing per blocked stream (ready queue); the windows then open and every
    answer arrives, in stream order for the connection window."""

    async def main() -> None:
        async with serving(limits(max_settings_per_second=1000)) as (_, _, port):
            client = await RawClient.connect(port, {f.INITIAL_WINDOW_SIZE: 0})
            streams = [1 + 2 * i for i in range(200)]
            for sid in streams:
                client.call(sid, "Big", message(b"1000"))
            headers = set()
            while len(headers) < len(streams):
                kind, _, sid, _ = await client.frame()
                if kind == f.HEADERS:
                    headers.add(sid)
            for _ in range(250):
                client.send(f.WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big"))
                client.send(f.SETTINGS, 0, 0, f.settings({f.MAX_FRAME_SIZE: 16_384})[9:])
            seen = await ending(client, timeout=0.5)
            assert not [fr for fr in seen.frames if fr[0] == f.DATA]
            assert seen.goaway_code is None
            # Every stream window opens (SETTINGS), the connection window is 65,535 + 250:
            # 65 answers of 1,005 bytes fit, the rest waits for the connection window, in order.
            client.send(f.SETTINGS, 0, 0, f.settings({f.INITIAL_WINDOW_SIZE: 1 << 20})[9:])
            order: list[int] = []
            got: dict[int, int] = {}
            ended: set[int] = set()

            async def read_one() -> None:
                kind, flags, sid, payload = await client.frame()
                if kind == f.DATA:
                    got[sid] = got.get(sid, 0) + len(payload)
                    if sid not in order:
                        order.append(sid)
                elif kind == f.HEADERS and flags & f.END_STREAM:
                    ended.add(sid)

            while sum(got.values()) < 65_535 + 250:
                await read_one()
            assert order == streams[: len(order)] and len(order) == 66
            client.send(f.WINDOW_UPDATE, 0, 0, (1 << 20).to_bytes(4, "big"))
            while len(ended) < len(streams):
                await read_one()
            assert all(got[sid] == 1005 for sid in streams)
            await client.close()
            assert await echo(port) == b"still answered"

    run(main())
