"""Connections that never speak, go idle or die are closed: preface timeout, idle timeout
(GOAWAY first), server keepalive pings with a timeout. Timeouts are set short here; the test
asserts what the server does, with generous margins, never how fast."""

from __future__ import annotations

import asyncio

import grpc

from pipeserve.api.h2 import frames as f
from tests.unit.h2.hostile import (
    SERVICE,
    RawClient,
    channel,
    echo,
    ending,
    limits,
    message,
    run,
    serving,
)


def test_a_connection_without_preface_is_closed() -> None:
    async def main() -> None:
        async with serving(limits(preface_timeout_s=0.3)) as (server, _, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PRI * HTTP/2.0\r\n")  # half a preface, then silence
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing said
            writer.close()
            await writer.wait_closed()
            assert await echo(port) == b"still answered"
            assert server.connection_count() <= 1

    run(main())


def test_an_idle_connection_gets_goaway_then_is_closed() -> None:
    async def main() -> None:
        async with serving(limits(idle_timeout_s=0.3)) as (_, _, port):
            client = await RawClient.connect(port)
            client.call(1, "Echo", message(b"before idling"))
            assert (await client.response(1)).messages() == [b"before idling"]
            seen = await ending(client)
            assert seen.goaway_code == f.NO_ERROR and seen.last_stream_id == 1 and seen.closed
            await client.close()

    run(main())


def test_a_connection_with_a_call_in_progress_is_not_idle() -> None:
    async def main() -> None:
        async with serving(limits(idle_timeout_s=0.3)) as (_, service, port):
            client = await RawClient.connect(port)
            client.call(1, "Wait", message(b""))
            await asyncio.wait_for(service.started.wait(), 5)
            seen = await ending(client, timeout=1.0)
            assert seen.goaway_code is None and not seen.closed
            client.send(f.RST_STREAM, 0, 1, f.CANCEL.to_bytes(4, "big"))
            seen = await ending(client)  # now it is idle
            assert seen.goaway_code == f.NO_ERROR and seen.closed
            await client.close()

    run(main())


def test_keepalive_ping_unanswered_closes_a_dead_peer() -> None:
    async def main() -> None:
        quick = limits(keepalive_time_s=0.3, keepalive_timeout_s=0.3)
        async with serving(quick) as (server, _, port):
            client = await RawClient.connect(port)
            seen = await ending(client)  # reads, but never answers the PING
            pings = [fr for fr in seen.frames if fr[0] == f.PING and not fr[1] & f.ACK]
            assert len(pings) == 1 and seen.closed
            await client.close()
            assert await echo(port) == b"still answered"

    run(main())


def test_keepalive_answered_keeps_the_connection_and_grpc_core_answers_it() -> None:
    async def main() -> None:
        quick = limits(keepalive_time_s=0.2, keepalive_timeout_s=0.5)
        async with serving(quick) as (_, _, port):
            client = await RawClient.connect(port)
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.5
            pings = 0
            while loop.time() < end:
                try:
                    kind, flags, _, payload = await client.frame(timeout=end - loop.time())
                except TimeoutError:
                    break
                if kind == f.PING and not flags & f.ACK:
                    pings += 1
                    client.send(f.PING, f.ACK, 0, payload)
            assert pings >= 2
            client.call(1, "Echo", message(b"alive"))
            assert (await client.response(1)).messages() == [b"alive"]
            await client.close()
            # The real client answers pings by itself: its channel outlives several of them.
            async with channel(port) as ch:
                call = ch.unary_unary(
                    f"/{SERVICE}/Echo", request_serializer=bytes, response_deserializer=bytes
                )
                assert await call(b"one") == b"one"
                await asyncio.sleep(1.2)
                assert await call(b"two") == b"two"
                assert ch.get_state() == grpc.ChannelConnectivity.READY

    run(main())
