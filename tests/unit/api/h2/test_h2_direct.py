"""Direct unary handlers (api.context.DirectUnary) on the own transport: no task per call, the
same answers, deadlines, cancellations and resets as a handler run in a task."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pipeserve.api.h2 import frames as f
from pipeserve.api.h2.server import H2Server
from tests.unit.h2_driver import EchoService, RawClient, channel, message, run, settled, unary


def test_direct_calls_answer_like_task_calls() -> None:
    async def body(server: H2Server, service: EchoService, port: int) -> None:
        async with channel(port) as ch:
            echo = unary(ch, "DirectEcho")
            payloads = [str(i).encode() * (i % 50 + 1) for i in range(300)]
            assert await asyncio.gather(*(echo(p) for p in payloads)) == payloads
            big = bytes(range(256)) * 40_000  # 10 MiB: an answer over many frames and windows
            assert await echo(big) == big
        await settled(server)

    run(body)


@pytest.mark.parametrize(
    ("method", "code", "details"),
    [
        ("DirectRefuse", grpc.StatusCode.INVALID_ARGUMENT, "refused: ünïcode 100%"),
        ("DirectFail", grpc.StatusCode.INTERNAL, "failed after 5 bytes"),
        ("DirectBoom", grpc.StatusCode.UNKNOWN, "Unexpected RuntimeError: a bug"),
    ],
    ids=["refused-at-start", "refused-by-finisher", "unexpected-error"],
)
def test_direct_refusals_reach_the_client_as_their_status(
    method: str, code: grpc.StatusCode, details: str
) -> None:
    async def body(server: H2Server, service: EchoService, port: int) -> None:
        async with channel(port) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch, method)(b"hello")
            assert err.value.code() == code
            assert err.value.details() == details
            assert await unary(ch, "DirectEcho")(b"still fine") == b"still fine"
        await settled(server)

    run(body)


def test_direct_deadline_cancels_the_work_and_answers_deadline_exceeded() -> None:
    async def body(server: H2Server, service: EchoService, port: int) -> None:
        async with channel(port) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch, "DirectWait")(b"", timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        (future,) = service.direct.waiting
        assert future.cancelled()
        await settled(server)

    run(body)


def test_direct_client_cancel_cancels_the_work() -> None:
    async def body(server: H2Server, service: EchoService, port: int) -> None:
        async with channel(port) as ch:
            call = unary(ch, "DirectWait")(b"")
            for _ in range(500):
                if service.direct.waiting:
                    break
                await asyncio.sleep(0.01)
            call.cancel()
            await settled(server)
            assert service.direct.waiting[0].cancelled()
            assert await unary(ch, "DirectEcho")(b"after") == b"after"

    run(body)


def test_direct_reset_stream_cancels_the_work_and_the_connection_goes_on() -> None:
    async def body(server: H2Server, service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        client.call(1, "DirectWait", message(b""))
        client.call(3, "DirectWait", message(b""))
        for _ in range(500):
            if len(service.direct.waiting) == 2:
                break
            await asyncio.sleep(0.01)
        client.send(f.RST_STREAM, 0, 1, f.CANCEL.to_bytes(4, "big"))
        client.send(f.RST_STREAM, 0, 3, f.CANCEL.to_bytes(4, "big"))
        await settled(server)
        assert all(future.cancelled() for future in service.direct.waiting)
        client.call(5, "DirectEcho", message(b"after reset"))
        response = await client.response(5)
        assert response.messages() == [b"after reset"]
        assert response.status == 0
        await client.close()

    run(body)


def test_direct_answer_over_the_send_limit_is_resource_exhausted() -> None:
    async def body(server: H2Server, service: EchoService, port: int) -> None:
        client = await RawClient.connect(port)
        client.call(1, "DirectEcho", message(b"x" * 1000))
        response = await client.response(1)
        assert response.status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert response.message == "Sent message larger than max (1000 vs. 999)"
        await client.close()
        await settled(server)

    run(body, max_send=999)


def test_a_request_the_call_assembled_is_kept_by_the_handler_without_a_copy() -> None:
    """A message that came in several DATA frames is whole only in the call's own buffer, which
    is handed over (`kept`): the handler holds a view of it and answers later, unchanged, while
    more calls come and go on the connection. One whole in one frame is lent for the call."""

    async def body(server: H2Server, service: EchoService, port: int) -> None:
        client = await RawClient.connect(port, {f.INITIAL_WINDOW_SIZE: f.MAX_WINDOW})
        client.writer.write(f.window_update(0, f.MAX_WINDOW - f.DEFAULT_WINDOW))
        big = bytes(range(256)) * 1200  # 300 KB, in three frames
        framed = message(big)
        client.send(f.HEADERS, f.END_HEADERS, 1, client.request_headers("DirectKeep"))
        for at in range(0, len(framed), 100_000):
            end = at + 100_000 >= len(framed)
            client.send(f.DATA, f.END_STREAM if end else 0, 1, framed[at : at + 100_000])
        client.call(3, "DirectKeep", message(b"small"))
        for i in range(5, 25, 2):  # other calls' bytes arrive while the first is held
            client.call(i, "DirectEcho", message(bytes([i]) * 70_000))
        answers = {sid: await client.response(sid) for sid in (1, 3)}
        assert answers[1].status == 0 and answers[1].messages() == [big]
        assert answers[3].status == 0 and answers[3].messages() == [b"small"]
        assert service.direct.kept == [True, False]
        await client.close()
        await settled(server)

    run(body)
