"""gRPC calls on top of HTTP/2 streams: message framing, deadlines, handler tasks, status.

Handlers are the same objects grpc.aio would run (`grpc.RpcMethodHandler` built by the generated
`add_*_to_server` functions), called with a `Context` that implements the part of
`grpc.aio.ServicerContext` pipeserve's servicers use. So both transports serve one servicer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from pipeserve.api.h2 import frames as f
from pipeserve.api.h2.connection import Stream

log = logging.getLogger(__name__)

_PREFIX = 5
_OK_TRAILERS = f.TRAILERS_OK

# Why a handler task was cancelled, so its status can say so.
_DEADLINE = "deadline"
_RESET = "reset"
_SHUTDOWN = "shutdown"

# Received, unconsumed request bytes above which a streaming call stops crediting the client.
_QUEUED_LIMIT = 4 << 20

# Queued response bytes above which a streaming handler waits for the client to read.
_STREAM_BACKLOG = 1 << 20


class Context:
    """The call's side of the servicer-context contract (`pipeserve.api.context`): `abort`,
    `invocation_metadata` and `peer`, as on grpc.aio.ServicerContext. Metadata is built only
    when a servicer asks for it: the hot path never pays for it."""

    __slots__ = ("code", "details", "_call")

    def __init__(self, call: Call) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self._call = call

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        self.code = code
        self.details = details
        raise grpc.aio.AbortError()

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        out: list[tuple[str, str | bytes]] = []
        for name, value in self._call.headers.items():
            if name.startswith(b":") or name in _TRANSPORT_HEADERS:
                continue
            key = name.decode("latin-1")
            if key.endswith("-bin"):
                out.append((key, _unbase64(value)))
            else:
                out.append((key, value.decode("latin-1")))
        return tuple(out)

    def peer(self) -> str:
        transport = self._call.stream.conn.transport
        address = transport.get_extra_info("peername") if transport is not None else None
        if isinstance(address, tuple) and len(address) >= 2:
            host, port = address[0], address[1]
            return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
        return f"unix:{address}" if address else "unknown"


# Headers the transport consumes; grpc.aio leaves them out of invocation_metadata too.
_TRANSPORT_HEADERS = frozenset(
    (b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding")
)


def _unbase64(value: bytes) -> bytes:
    # gRPC sends binary metadata base64-encoded, padding optional.
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return value


class Limits:
    __slots__ = ("max_receive", "max_send")

    def __init__(self, max_receive: int, max_send: int) -> None:
        self.max_receive = max_receive
        self.max_send = max_send


class Call:
    """One RPC. Receives the stream's bytes, runs the handler in a task, answers."""

    __slots__ = (
        "stream",
        "method",
        "headers",
        "limits",
        "on_done",
        "buffer",
        "task",
        "timer",
        "cancel_reason",
        "messages",
        "queued",
        "withheld",
        "decompress",
    )

    def __init__(
        self,
        stream: Stream,
        method: grpc.RpcMethodHandler,
        headers: dict[bytes, bytes],
        limits: Limits,
        on_done: Callable[[Call], None],
    ) -> None:
        self.stream = stream
        self.method = method
        self.headers = headers
        self.limits = limits
        self.on_done = on_done
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.cancel_reason: str | None = None
        self.messages: asyncio.Queue[bytes | None] | None = None
        self.queued = 0  # bytes of received messages the handler has not taken yet
        self.withheld = 0  # bytes received but not credited back while `queued` is high
        self.decompress: Callable[[bytes], bytes] | None = None

    # ---- set-up (the endpoint calls this right after opening the stream) -------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        encoding = self.headers.get(b"grpc-encoding", b"identity")
        if encoding != b"identity":
            self.decompress = _decompressor(encoding, self.limits.max_receive)
            if self.decompress is None:
                self.finish(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"compression algorithm '{encoding.decode('latin-1')}' is not supported "
                    "(identity, gzip and deflate are)",
                )
                return
        timeout = self.headers.get(b"grpc-timeout")
        if timeout is not None:
            seconds = f.parse_timeout(timeout.decode("latin-1"))
            if seconds is None:
                self.finish(grpc.StatusCode.INTERNAL, f"malformed grpc-timeout {timeout!r}")
                return
            self.timer = loop.call_later(seconds, self._expire)
        if self.method.request_streaming:
            self.messages = asyncio.Queue()
            self.task = loop.create_task(self._run(self._requests()))

    # ---- receiving (CallSink) -------------------------------------------------------------

    def data(self, payload: memoryview, end: bool) -> None:
        if self.stream.done:
            return
        if self.messages is None:
            self._unary_data(payload, end)
        else:
            self._stream_data(payload, end)

    def _unary_data(self, payload: memoryview, end: bool) -> None:
        buffer = self.buffer
        if end and not buffer:
            # The common case: the whole request in one DATA frame, parsed without a copy.
            self._dispatch(payload)
            return
        buffer += payload
        if len(buffer) >= _PREFIX and not self._size_ok(buffer):
            return
        if end:
            self._dispatch(memoryview(buffer))
        else:
            self.stream.credit(len(payload))

    def _dispatch(self, data: memoryview) -> None:
        """Parses the one message of a unary request (now, while `data` is valid) and starts
        the handler."""
        if len(data) < _PREFIX:
            self.finish(grpc.StatusCode.INTERNAL, "request ended without a message")
            return
        if not self._size_ok(data):
            return
        size = int.from_bytes(data[1:_PREFIX], "big")
        if len(data) < _PREFIX + size:
            self.finish(
                grpc.StatusCode.INTERNAL,
                f"request ended inside its message (the prefix declares {size} bytes, "
                f"{len(data) - _PREFIX} came)",
            )
            return
        if len(data) != _PREFIX + size:
            self.finish(
                grpc.StatusCode.INTERNAL,
                f"a unary call carries exactly one message (got {len(data)} bytes, the first "
                f"message declares {size})",
            )
            return
        body = self._unpack(data[0], data[_PREFIX:])
        if body is None:
            return
        try:
            request = self.method.request_deserializer(body)
        except Exception as exc:
            self.finish(grpc.StatusCode.INTERNAL, f"could not parse the request message: {exc}")
            return
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(request))

    def _size_ok(self, data: bytes | bytearray | memoryview) -> bool:
        size = int.from_bytes(data[1:_PREFIX], "big")
        if size > self.limits.max_receive:
            self._fail(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({size} vs. {self.limits.max_receive})",
            )
            return False
        return True

    def _unpack(self, flag: int, body: memoryview) -> bytes | memoryview | None:
        if flag == 0:
            return body
        if flag != 1:
            self._fail(grpc.StatusCode.INTERNAL, f"bad compressed flag {flag} (0 or 1)")
            return None
        if self.decompress is None:
            self._fail(grpc.StatusCode.INTERNAL, "compressed message without a grpc-encoding")
            return None
        try:
            return self.decompress(bytes(body))
        except (zlib.error, ValueError) as exc:
            self._fail(grpc.StatusCode.INTERNAL, f"could not decompress the message: {exc}")
            return None

    def _stream_data(self, payload: memoryview, end: bool) -> None:
        # Credit comes back at once (a message may exceed the window, and the half-received one
        # must be buffered anyway) unless the handler lags: then it waits for consumption.
        if self.queued < _QUEUED_LIMIT:
            self.stream.credit(len(payload))
        else:
            self.withheld += len(payload)
        buffer = self.buffer
        buffer += payload
        assert self.messages is not None
        while len(buffer) >= _PREFIX:
            if not self._size_ok(buffer):
                return
            size = int.from_bytes(buffer[1:_PREFIX], "big")
            if len(buffer) < _PREFIX + size:
                break
            body = self._unpack(buffer[0], memoryview(buffer)[_PREFIX : _PREFIX + size])
            if body is None:
                return
            message = bytes(body)
            del body
            del buffer[: _PREFIX + size]
            self.queued += len(message)
            self.messages.put_nowait(message)
        if end:
            if buffer:
                self._fail(grpc.StatusCode.INTERNAL, "stream ended inside a message")
                return
            self.messages.put_nowait(None)

    def _fail(self, code: grpc.StatusCode, details: str) -> None:
        """A transport-level failure while the handler may be running: answer, stop it."""
        self.finish(code, details)
        if self.task is not None and not self.task.done():
            self.cancel_reason = self.cancel_reason or _RESET
            self.task.cancel()

    def reset(self) -> None:
        """The client reset the stream or the connection went away."""
        self.cancel(_RESET)

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the task answers through _end_cancelled
        else:
            self._end_cancelled()

    def _end_cancelled(self) -> None:
        """The status a cancelled call ends with: a reset stream gets none (nobody listens)."""
        if self.cancel_reason == _DEADLINE:
            self.finish(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        elif self.cancel_reason == _SHUTDOWN:
            self.finish(grpc.StatusCode.UNAVAILABLE, "server shutting down")
        else:
            self._done()

    def _expire(self) -> None:
        self.timer = None
        self.cancel(_DEADLINE)

    # ---- running the handler ------------------------------------------------------------------

    async def _run(self, arg: Any) -> None:
        method = self.method
        context = Context(self)
        try:
            if method.response_streaming:
                handler = method.stream_stream if method.request_streaming else method.unary_stream
                await self._stream_responses(handler(arg, context))
                self.finish(grpc.StatusCode.OK)
            else:
                handler = method.stream_unary if method.request_streaming else method.unary_unary
                response = await handler(arg, context)
                self.stream.send(self._framed(method.response_serializer(response)), _OK_TRAILERS)
                self._done()
        except grpc.aio.AbortError:
            self.finish(context.code or grpc.StatusCode.UNKNOWN, context.details)
        except _TooLarge as exc:
            self.finish(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except asyncio.CancelledError:
            self._end_cancelled()
        except Exception as exc:
            log.exception("unexpected error in %s", self.headers.get(b":path", b"?").decode())
            self.finish(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")

    def _framed(self, payload: bytes) -> bytes:
        """One response message with its gRPC prefix; raises _TooLarge over the send limit."""
        if len(payload) > self.limits.max_send:
            raise _TooLarge(
                f"Sent message larger than max ({len(payload)} vs. {self.limits.max_send})"
            )
        return b"\x00" + len(payload).to_bytes(4, "big") + payload

    async def _stream_responses(self, responses: AsyncIterator[Any]) -> None:
        serialize = self.method.response_serializer
        stream = self.stream
        async for response in responses:
            stream.send(self._framed(serialize(response)))
            if stream.backlog() > _STREAM_BACKLOG:
                await stream.wait_drained()
            if stream.done:
                raise asyncio.CancelledError

    async def _requests(self) -> AsyncIterator[Any]:
        assert self.messages is not None
        deserialize = self.method.request_deserializer
        while (message := await self.messages.get()) is not None:
            self.queued -= len(message)
            if self.withheld and self.queued < _QUEUED_LIMIT:
                self.stream.credit(self.withheld)
                self.withheld = 0
            yield deserialize(message)

    def finish(self, code: grpc.StatusCode, details: str = "") -> None:
        """Ends the call with a status (trailers-only when nothing was sent yet)."""
        block = _OK_TRAILERS if code == grpc.StatusCode.OK else f.trailers(code.value[0], details)
        self.stream.respond_only(block)
        self._done()

    def _done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        on_done, self.on_done = self.on_done, _ignore
        on_done(self)


class _TooLarge(Exception):
    pass


def _ignore(call: Call) -> None:
    pass


def _decompressor(encoding: bytes, limit: int) -> Callable[[bytes], bytes] | None:
    wbits = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        return None

    def decompress(data: bytes) -> bytes:
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(data, limit + 1)
        if len(out) > limit:
            raise ValueError(f"decompressed message larger than max ({limit} bytes)")
        if not inflater.eof:  # zlib returns what it could of a cut stream without an error
            raise ValueError("the compressed message is truncated")
        return out

    return decompress
