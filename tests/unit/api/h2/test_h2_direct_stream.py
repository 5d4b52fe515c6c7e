"""Direct streaming handlers (api.context.DirectStream) on the own transport: one response per
request message with no task per message, a bounded window of requests in flight, the client's
pace respected, and the same endings (status, deadline, reset, bad framing) as a task-run stream.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable

import grpc
import pytest

from pipeserve.api.h2 import frames as f
from pipeserve.api.h2.calls import _STREAM_WINDOW
from pipeserve.api.h2.server import H2Server
from tests.unit.h2_driver import (
    SERVICE,
    EchoService,
    RawClient,
    channel,
    message,
    run,
    settled,
)


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def _open(client: RawClient, stream_id: int = 1, extra: dict[str, str] | None = None) -> None:
    """Starts a DirectStream call on `stream_id` (its messages follow as DATA frames)."""
    client.send(f.HEADERS, f.END_HEADERS, stream_id, client.request_headers("DirectStream", extra))


def _stream_call(ch: grpc.aio.Channel):  # type: ignore[no-untyped-def]
    return ch.stream_stream(
        f"/{SERVICE}/DirectStream",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )


def test_every_message_is_answered_past_the_window() -> None:
    """600 messages, more than the window, sent before any answer is read; some answered at
    once, the rest once the loop turns: every one answered, the call ends OK."""

    async def body(server: H2Server, service: EchoService, port: int) -> None:
        sent = [b"now:%d" % i if i % 3 == 0 else b"%d" % i for i in range(600)]
        async with channel(port) as ch:
            call = _stream_call(ch)(iter(sent))
            answers = [answer async for answer in call]
            assert await call.code() == grpc.StatusCode.OK
        assert sorted(answers) == sorted(m.removeprefix(b"now:") for m in sent)
        assert service.direct.streamed == 600
        await settled(server)

    run(body)


def test_the_window_holds_messages_until_answers_free_it() -> None:
    async def body(server: H2Server, service: EchoService, port: int) -> None:
        held = service.direct.waiting
        client = await RawClient.connect(port)
        _open(client)
        client.send(f.DATA, 0, 1, b"".join(message(b"hold") for _ in range(_STREAM_WINDOW + 44)))
        await _until(lambda: len(held) == _STREAM_WINDOW)
        await asyncio.sleep(0.1)
        assert len(held) == _STREAM_WINDOW  # the rest wait in the call's buffer
        for future in held[:10]:
            future.set_result(b"freed")
        await _until(lambda: len(held) == _STREAM_WINDOW + 10)
        for future in held[10:]:
            future.set_result(b"freed")
        await _until(lambda: len(held) == _STREAM_WINDOW + 44)
        for future in held:
            if not future.done():
                future.set_result(b"freed")
        client.send(f.DATA, f.END_STREAM, 1, b"")
        response = await client.response(1)
        assert response.messages() == [b"freed"] * (_STREAM_WINDOW + 44)
        assert response.status == 0
        await client.close()
        await settled(server)

    run(body)


def test_a_lagging_client_stops_the_call_from_running_more() -> None:
    """A client that reads no answers (its receive window is 0): past 1 MiB of answers queued,
    the call runs no further messages until the client reads."""

    async def body(server: H2Server, service: EchoService, port: int) -> None:
        client = await RawClient.connect(port, {f.INITIAL_WINDOW_SIZE: 0})
        _open(client)
        client.send(f.DATA, f.END_STREAM, 1, b"".join(message(b"big:600000") for _ in range(10)))
        await _until(lambda: service.direct.streamed == 2)
        await asyncio.sleep(0.2)
        assert service.direct.streamed == 2  # 1.2 MB queued: it waits for the client
        client.writer.write(f.settings({f.INITIAL_WINDOW_SIZE: f.MAX_WINDOW}))
        client.send(f.WINDOW_UPDATE, 0, 0, (f.MAX_WINDOW - f.DEFAULT_WINDOW).to_bytes(4, "big"))
        response = await client.response(1, timeout=20)
        assert [len(m) for m in response.messages()] == [600_000] * 10
        assert response.status == 0
        await client.close()
        await settled(server)

    run(body)


@pytest.mark.parametrize(
    ("refused", "code", "details"),
    [
        (b"refuse", grpc.StatusCode.INVALID_ARGUMENT, "refused mid-stream"),
        (b"boom", grpc.StatusCode.UNKNOWN, "Unexpected RuntimeError: a stream bug"),
    ],
    ids=["refused", "unexpected-error"],
)
def test_a_refusal_ends_the_call_once_the_requests_in_flight_are_answered(
    refused: bytes, code: grpc.StatusCode, details: str
) -> None:
    """Nothing accepted is lost: the messages before the refused one are answered, none after
    it runs, then the call ends with the refusal's status."""

    async def body(server: H2Server, service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        _open(client)
        sent = [b"now:first", b"hold", refused, b"now:never"]
        client.send(f.DATA, 0, 1, b"".join(message(m) for m in sent))
        await _until(lambda: service.direct.streamed == 3)
        await asyncio.sleep(0.1)
        assert server.call_count() == 1  # waiting for the held request's answer
        client.send(f.DATA, f.END_STREAM, 1, message(b"now:after the end"))
        service.direct.waiting[0].set_result(b"held")
        response = await client.response(1)
        assert response.messages() == [b"first", b"held"]
        assert response.status == code.value[0]
        assert response.message == details
        assert service.direct.streamed == 3
        await client.close()
        await settled(server)

    run(body)


def test_reset_and_deadline_cancel_the_work_in_flight() -> None:
    async def body(server: H2Server, service: EchoService, port: int) -> None:
        held = service.direct.waiting
        client = await RawClient.connect(port)
        _open(client)
        client.send(f.DATA, 0, 1, message(b"hold") * 3)
        await _until(lambda: len(held) == 3)
        client.send(f.RST_STREAM, 0, 1, f.CANCEL.to_bytes(4, "big"))
        await settled(server)
        assert all(future.cancelled() for future in held)

        _open(client, 3, {"grpc-timeout": "300m"})
        client.send(f.DATA, 0, 3, message(b"hold") + message(b"now:answered"))
        response = await client.response(3)
        assert response.messages() == [b"answered"]
        assert response.status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert len(held) == 4 and held[3].cancelled()
        await client.close()
        await settled(server)

    run(body)


def test_a_stream_that_ends_inside_a_message_is_refused() -> None:
    async def body(server: H2Server, service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        _open(client)
        client.send(f.DATA, 0, 1, message(b"hold"))
        client.send(f.DATA, f.END_STREAM, 1, message(b"cut short")[:-3])
        response = await client.response(1)
        assert response.status == grpc.StatusCode.INTERNAL.value[0]
        assert response.message == "stream ended inside a message"
        assert service.direct.waiting[0].cancelled()
        await client.close()
        await settled(server)

    run(body)


def test_an_oversized_message_is_resource_exhausted() -> None:
    async def body(server: H2Server, service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        _open(client)
        client.send(f.DATA, f.END_STREAM, 1, message(b"now:ok") + message(b"x" * 2000))
        response = await client.response(1)
        assert response.messages() == [b"ok"]
        assert response.status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert response.message == "Received message larger than max (2000 vs. 1000)"
        await client.close()
        await settled(server)

    run(body, max_message=1000)


def test_a_compressed_stream_runs_the_registered_handler() -> None:
    """The direct handler never sees compressed bytes: such a call runs in a task."""

    async def body(server: H2Server, service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        _open(client, 1, {"grpc-encoding": "gzip"})
        sent = [b"now:a", b"bb", b"c" * 5000]
        client.send(
            f.DATA, f.END_STREAM, 1, b"".join(message(gzip.compress(m), True) for m in sent)
        )
        response = await client.response(1)
        assert response.messages() == sent  # echoed as they are: EchoService.stream ran
        assert response.status == 0
        assert service.direct.streamed == 0
        await client.close()
        await settled(server)

    run(body)


def test_a_compressed_message_without_an_encoding_is_refused() -> None:
    async def body(server: H2Server, service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        _open(client)
        client.send(f.DATA, f.END_STREAM, 1, message(b"now:ok") + message(b"zz", True))
        response = await client.response(1)
        assert response.messages() == [b"ok"]
        assert response.status == grpc.StatusCode.INTERNAL.value[0]
        assert response.message == "compressed message without a grpc-encoding"
        await client.close()
        await settled(server)

    run(body)


def test_messages_split_across_frames_are_reassembled() -> None:
    async def body(server: H2Server, service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        _open(client)
        data = b"".join(message(b"now:%d" % i) for i in range(50))
        for i in range(0, len(data), 7):  # frames that cut prefixes and bodies
            client.send(f.DATA, 0, 1, data[i : i + 7])
        client.send(f.DATA, f.END_STREAM, 1, b"")
        response = await client.response(1)
        assert response.messages() == [b"%d" % i for i in range(50)]
        assert response.status == 0
        await client.close()
        await settled(server)

    run(body)
