"""Test harness for api/h2: an H2Server in this event loop with a small bytes-in/bytes-out service,
and a raw HTTP/2 client that writes frames by hand (for what real gRPC clients never send)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import hpack

from pipeserve.api.context import DirectResult, DirectStream, DirectUnary, Refused
from pipeserve.api.h2 import frames as f
from pipeserve.api.h2.server import H2Server

SERVICE = "test.Echo"


def _same(b: bytes) -> bytes:
    return b


class EchoService:
    """Echo: returns the request. Big: returns int(request) bytes. Wait: never answers (records
    its cancellation). Abort: fails with NOT_FOUND. Stream: echoes each message of a stream.
    Sum: stream in, one answer. Repeat: one request, int(request) answers."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.direct = DirectService()

    async def echo(self, request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
        return request

    async def big(self, request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
        n = int(request)
        return bytes(range(256)) * (n // 256) + bytes(n % 256)

    async def wait(self, request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b""

    async def abort(self, request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: ünïcode 100%")
        return b""

    async def stream(self, requests: AsyncIterator[bytes], context):  # type: ignore[no-untyped-def]
        async for r in requests:
            yield r

    async def sum(self, requests: AsyncIterator[bytes], context) -> bytes:  # type: ignore[no-untyped-def]
        total = 0
        async for r in requests:
            total += len(r)
        return str(total).encode()

    async def repeat(self, request: bytes, context):  # type: ignore[no-untyped-def]
        for i in range(int(request)):
            yield str(i).encode()

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        kw = dict(request_deserializer=_same, response_serializer=_same)
        return {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo, **kw),
            "Big": grpc.unary_unary_rpc_method_handler(self.big, **kw),
            "Wait": grpc.unary_unary_rpc_method_handler(self.wait, **kw),
            "Abort": grpc.unary_unary_rpc_method_handler(self.abort, **kw),
            "Stream": grpc.stream_stream_rpc_method_handler(self.stream, **kw),
            "Sum": grpc.stream_unary_rpc_method_handler(self.sum, **kw),
            "Repeat": grpc.unary_stream_rpc_method_handler(self.repeat, **kw),
        }


class DirectService:
    """Unary methods served through api.context.DirectUnary (no task per call). DirectEcho:
    answers the request once the loop turns. DirectWait: never answers (its futures are kept,
    so a test sees them cancelled). DirectRefuse: refused at start. DirectFail: refused by its
    finisher. DirectBoom: raises an unexpected error at start. DirectKeep: holds a kept body
    without copying it."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[bytes]] = []
        self.streamed = 0  # messages DirectStream's handler was given
        self.kept: list[bool] = []  # what DirectKeep was told of each body

    def echo(self, request: bytes | memoryview, kept: bool = False) -> DirectResult:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # A copy: the bytes a direct handler is given are only valid during the call.
        asyncio.get_running_loop().call_soon(future.set_result, bytes(request))
        return future, _result

    def wait(self, request: bytes | memoryview, kept: bool = False) -> DirectResult:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        return future, _result

    def refuse(self, request: bytes | memoryview, kept: bool = False) -> DirectResult:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "refused: ünïcode 100%")

    def fail(self, request: bytes | memoryview, kept: bool = False) -> DirectResult:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        future.set_result(bytes(request))

        def finisher(done: asyncio.Future[bytes]) -> bytes:
            raise Refused(grpc.StatusCode.INTERNAL, f"failed after {len(done.result())} bytes")

        return future, finisher

    def boom(self, request: bytes | memoryview, kept: bool = False) -> DirectResult:
        raise RuntimeError("a bug")

    def keep(self, request: bytes | memoryview, kept: bool = False) -> DirectResult:
        """Records `kept`; a kept body is held as given (no copy), answered 50 ms later."""
        self.kept.append(kept)
        held = request if kept else bytes(request)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, lambda: future.set_result(bytes(held)))
        return future, _result

    def methods(self) -> dict[str, DirectUnary]:
        return {
            "DirectEcho": self.echo,
            "DirectWait": self.wait,
            "DirectRefuse": self.refuse,
            "DirectFail": self.fail,
            "DirectBoom": self.boom,
            "DirectKeep": self.keep,
        }

    def stream(self, request: bytes | memoryview) -> bytes | DirectResult:
        """DirectStream (api.context.DirectStream), by what each message says: `hold` is never
        answered (its future is kept in `waiting`), `now:<text>` is answered `<text>` at once,
        `big:<n>` is answered with n bytes at once, `refuse` ends the call INVALID_ARGUMENT,
        `boom` raises an unexpected error; any other message is echoed once the loop turns."""
        self.streamed += 1
        text = bytes(request)
        if text == b"hold":
            return self.wait(request)
        if text.startswith(b"now:"):
            return text[4:]
        if text.startswith(b"big:"):
            return bytes(int(text[4:]))
        if text == b"refuse":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "refused mid-stream")
        if text == b"boom":
            raise RuntimeError("a stream bug")
        return self.echo(request)

    def stream_methods(self) -> dict[str, DirectStream]:
        """Bidirectional methods with a direct handler (their registered handler, which runs a
        call with compressed messages, is EchoService.stream)."""
        return {"DirectStream": self.stream}


def _result(future: asyncio.Future[bytes]) -> bytes:
    return future.result()


async def _never(request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
    raise AssertionError("the own transport runs the direct handler, not this one")


async def start(
    max_message: int = 64 << 20, max_send: int | None = None
) -> tuple[H2Server, EchoService, int]:
    server = H2Server(
        max_receive=max_message, max_send=max_message if max_send is None else max_send
    )
    service = EchoService()
    server.add_registered_method_handlers(SERVICE, service.handlers())
    direct = service.direct
    # Direct methods: registered as ordinary ones too (their serializers, grpc.aio's path).
    kw = dict(request_deserializer=_same, response_serializer=_same)
    server.add_registered_method_handlers(
        SERVICE,
        {name: grpc.unary_unary_rpc_method_handler(_never, **kw) for name in direct.methods()},
    )
    server.add_registered_method_handlers(
        SERVICE,
        {
            name: grpc.stream_stream_rpc_method_handler(service.stream, **kw)
            for name in direct.stream_methods()
        },
    )
    for name, handler in {**direct.methods(), **direct.stream_methods()}.items():
        server.add_direct(SERVICE, name, handler)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, service, port


def run(body: Callable[[H2Server, EchoService, int], Awaitable[None]], **kw: int) -> None:
    """Runs `body(server, service, port)` in a new event loop against a server from `start`
    (keyword arguments go to it), stopped afterwards; the whole run is bounded (60 s)."""

    async def main() -> None:
        server, service, port = await start(**kw)
        try:
            await body(server, service, port)
        finally:
            await server.stop(0)

    asyncio.run(asyncio.wait_for(main(), 60))


async def settled(server: H2Server) -> None:
    """Until every call ended (a reset or cancelled call ends at the loop's next turns)."""
    for _ in range(300):
        if server.call_count() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.call_count()} calls still registered")


def unary(ch: grpc.aio.Channel, method: str):  # type: ignore[no-untyped-def]
    """A bytes-in, bytes-out unary call of the test service on `ch`."""
    return ch.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=_same, response_deserializer=_same
    )


def channel(port: int) -> grpc.aio.Channel:
    """The real grpc C-core client, with message limits that fit the tests' 10-20 MiB calls."""
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )


def message(payload: bytes, compressed: bool = False) -> bytes:
    return bytes((int(compressed),)) + len(payload).to_bytes(4, "big") + payload


class RawClient:
    """Speaks HTTP/2 frame by frame; decodes the server's header blocks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    @classmethod
    async def connect(cls, port: int, settings: dict[int, int] | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        writer.write(f.PREFACE + f.settings(settings or {}))
        return client

    def send(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self.writer.write(f.frame(kind, flags, stream_id, payload))

    def request_headers(self, method: str, extra: dict[str, str] | None = None) -> bytes:
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", f"/{SERVICE}/{method}"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *(extra or {}).items(),
        ]
        return self.encoder.encode(headers)

    def call(
        self, stream_id: int, method: str, body: bytes, extra: dict[str, str] | None = None
    ) -> None:
        self.send(f.HEADERS, f.END_HEADERS, stream_id, self.request_headers(method, extra))
        self.send(f.DATA, f.END_STREAM, stream_id, body)

    async def frame(self, timeout: float = 5.0) -> tuple[int, int, int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(9), timeout)
        length = int.from_bytes(head[:3], "big")
        stream_id = struct.unpack(">I", head[5:9])[0] & 0x7FFF_FFFF
        payload = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return head[3], head[4], stream_id, payload

    async def response(self, stream_id: int, timeout: float = 5.0) -> Response:
        """Frames of one stream until it ends (other streams' frames are kept aside)."""
        out = Response()
        while True:
            kind, flags, sid, payload = await self.frame(timeout)
            if sid == 0:
                out.connection_frames.append((kind, flags, payload))
                if kind == f.GOAWAY:
                    out.goaway = payload
                    return out
                continue
            if sid != stream_id:
                continue
            if kind == f.HEADERS:
                out.header_blocks.append(dict(self.decoder.decode(payload)))
            elif kind == f.DATA:
                out.data += payload
                out.data_frames += 1
            elif kind == f.RST_STREAM:
                out.reset = int.from_bytes(payload, "big")
                return out
            if flags & f.END_STREAM:
                out.ended = True
                return out

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class Response:
    def __init__(self) -> None:
        self.header_blocks: list[dict[str, str]] = []
        self.data = b""
        self.data_frames = 0
        self.ended = False
        self.reset: int | None = None
        self.goaway: bytes | None = None
        self.connection_frames: list[tuple[int, int, bytes]] = []

    @property
    def status(self) -> int:
        return int(self.header_blocks[-1]["grpc-status"])

    @property
    def message(self) -> str:
        return self.header_blocks[-1].get("grpc-message", "")

    def messages(self) -> list[bytes]:
        out, data = [], self.data
        while data:
            size = int.from_bytes(data[1:5], "big")
            out.append(data[5 : 5 + size])
            data = data[5 + size :]
        return out
