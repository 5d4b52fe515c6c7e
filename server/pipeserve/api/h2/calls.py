"""gRPC calls on top of HTTP/2 streams: message framing, deadlines, handler tasks, status.

Handlers are the same objects grpc.aio would run (`grpc.RpcMethodHandler` built by the generated
`add_*_to_server` functions), called with a `Context` that implements the part of
`grpc.aio.ServicerContext` pipeserve's servicers use. So both transports serve one servicer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from pipeserve.api.context import DirectStream, DirectUnary, Refused, unparsable
from pipeserve.api.h2 import frames as f
from pipeserve.api.h2.connection import Stream

log = logging.getLogger(__name__)

_PREFIX = 5
# Parts of a unary message this large (and most of their read) are kept as views, not copied.
_VIEW_PART = 16 << 10
_OK_TRAILERS = f.TRAILERS_OK

# Why a handler task was cancelled, so its status can say so.
_DEADLINE = "deadline"
_RESET = "reset"
_SHUTDOWN = "shutdown"

# Received, unconsumed request bytes above which a streaming call stops crediting the client.
_QUEUED_LIMIT = 4 << 20

# Queued response bytes above which a streaming handler waits for the client to read.
_STREAM_BACKLOG = 1 << 20

# Requests of one direct stream (api.context.DirectStream) in flight at once, as the servicer's
# STREAM_WINDOW bounds its task-run streams: beyond it, and while the client reads too slowly,
# the call runs no further messages (and, past _QUEUED_LIMIT, stops crediting the client).
_STREAM_WINDOW = 256

# A compressed message inflates on the event loop up to this many bytes; the rest of it inflates
# on a worker thread (zlib lets go of the GIL), so a big inflation never stalls other calls.
_INLINE_INFLATE = 1 << 20
_INFLATE_STEP = 1 << 20


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
    """Message size limits, and the request bytes held by unfinished calls server-wide (one
    object shared by every call: the event loop is its only user)."""

    __slots__ = ("max_receive", "max_send", "max_inflight", "max_inflate", "inflight")

    def __init__(
        self,
        max_receive: int,
        max_send: int,
        max_inflight: int = 1 << 62,
        max_inflate: int = 1 << 62,
    ) -> None:
        self.max_receive = max_receive
        self.max_send = max_send
        self.max_inflight = max_inflight
        self.max_inflate = max_inflate
        self.inflight = 0


class Call:
    """One RPC. Receives the stream's bytes, runs the handler in a task (or, for a method with
    a direct handler, waits on its futures with callbacks), answers."""

    __slots__ = (
        "stream",
        "method",
        "headers",
        "limits",
        "on_done",
        "buffer",
        "parts",
        "received",
        "declared",
        "task",
        "started",
        "timer",
        "cancel_reason",
        "messages",
        "queued",
        "withheld",
        "wbits",
        "charged",
        "direct",
        "future",
        "finisher",
        "flights",
        "ended",
        "stall",
        "closing",
    )

    def __init__(
        self,
        stream: Stream,
        method: grpc.RpcMethodHandler,
        headers: dict[bytes, bytes],
        limits: Limits,
        on_done: Callable[[Call], None],
        direct: DirectUnary | DirectStream | None = None,
    ) -> None:
        self.stream = stream
        self.method = method
        self.headers = headers
        self.limits = limits
        self.on_done = on_done
        self.buffer = bytearray()
        # A unary message in several DATA frames: its parts, the bytes of them, and the size
        # its prefix declares (0 until known).
        self.parts: list[bytearray | memoryview] | None = None
        self.received = 0
        self.declared = 0
        self.task: asyncio.Task[None] | None = None
        self.started = False  # the task's coroutine began (a task cancelled before never does)
        self.timer: asyncio.TimerHandle | None = None
        self.cancel_reason: str | None = None
        self.messages: asyncio.Queue[bytes | _Inflation | None] | None = None
        self.queued = 0  # bytes of received messages the handler has not taken yet
        self.withheld = 0  # bytes received but not credited back while `queued` is high
        self.wbits: int | None = None  # zlib window bits of the request's grpc-encoding
        self.charged = 0  # this call's share of limits.inflight
        self.direct = direct
        # A direct unary handler's work in progress, and what makes the response of it.
        self.future: asyncio.Future[Any] | None = None
        self.finisher: Callable[[asyncio.Future[Any]], bytes] | None = None
        # A direct stream's: its requests' work in flight (None: not a direct stream), whether
        # no more messages will run (the client ended its side, or `closing`), the task that
        # waits while the client lags, and the status a refused message ends the call with.
        self.flights: set[asyncio.Future[Any]] | None = None
        self.ended = False
        self.stall: asyncio.Task[None] | None = None
        self.closing: tuple[grpc.StatusCode, str] | None = None

    # ---- set-up (the endpoint calls this right after opening the stream) -------------------

    def start(self) -> None:
        # No get_running_loop() unless needed: on Python 3.11 it costs a getpid() syscall.
        encoding = self.headers.get(b"grpc-encoding", b"identity")
        if encoding != b"identity":
            self.wbits = _WBITS.get(encoding)
            if self.wbits is None:
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
            self.timer = asyncio.get_running_loop().call_later(seconds, self._expire)
        if self.method.request_streaming:
            if self.direct is not None and self.wbits is None:
                self.flights = set()  # a direct stream: no task (api.context.DirectStream)
                return
            self.direct = None
            self.messages = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._run(self._requests()))

    # ---- receiving (CallSink) -------------------------------------------------------------

    def data(self, payload: memoryview, end: bool) -> None:
        if self.stream.done:
            return
        n = len(payload)
        if n:
            limits = self.limits
            if limits.inflight + n > limits.max_inflight:
                self._over_inflight()
                return
            limits.inflight += n  # _charge, inlined: this runs for every DATA frame
            self.charged += n
        if self.messages is not None:
            self._stream_data(payload, end)
        elif self.flights is not None:
            self._direct_stream_data(payload, end)
        else:
            self._unary_data(payload, end)

    def _charge(self, n: int) -> bool:
        """Counts `n` received bytes against the server-wide in-flight limit; past it the call
        is answered RESOURCE_EXHAUSTED at once (it is not queued: overload is said, not
        suffered)."""
        limits = self.limits
        if limits.inflight + n > limits.max_inflight:
            self._over_inflight()
            return False
        limits.inflight += n
        self.charged += n
        return True

    def _over_inflight(self) -> None:
        self._fail(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"server over its in-flight request limit ({self.limits.max_inflight} bytes held by "
            "calls in progress): retry later",
        )

    def _uncharge(self, n: int) -> None:
        n = min(n, self.charged)
        self.charged -= n
        self.limits.inflight -= n

    def _unary_data(self, payload: memoryview, end: bool) -> None:
        parts = self.parts
        if parts is None:
            if end:
                # The common case: the whole request in one DATA frame, parsed without a copy.
                self._dispatch(payload, kept=False)
                return
            parts = self.parts = []
        # A message in several frames: its large parts are kept as given (the connection's
        # views stay valid, api/h2/connection.py) and joined once, at the end: one copy in all.
        # A part that is small, or a small slice of a larger read, is copied onto the bytes
        # before it instead: what a call holds stays within twice what it was sent, and a
        # client that sends a byte at a time gets one buffer, not an object per byte.
        if len(payload) >= _VIEW_PART and len(payload) * 2 >= len(payload.obj):  # type: ignore[arg-type]
            parts.append(payload)
        elif parts and type(parts[-1]) is bytearray:
            parts[-1] += payload  # type: ignore[operator]
        else:
            parts.append(bytearray(payload))
        self.received += len(payload)
        if not self.declared and self.received >= _PREFIX:
            start = parts[0] if len(parts[0]) >= _PREFIX else b"".join(parts)
            if not self._size_ok(start):
                return
            self.declared = _PREFIX + int.from_bytes(start[1:_PREFIX], "big")
        if self.declared and self.received > self.declared:
            # Refused, not credited: the client may not push more than its one message.
            self._fail(grpc.StatusCode.INTERNAL, _one_message(self.received, self.declared))
            return
        if end:
            # Immutable and the call's own: the handler may keep views of it, not copies.
            message = b"".join(parts)
            parts.clear()
            self._dispatch(memoryview(message), kept=True)
        else:
            self.stream.credit(len(payload))

    def _dispatch(self, data: memoryview, kept: bool) -> None:
        """Parses the one message of a unary request (now, while `data` is valid, unless
        `kept`: it stays valid) and starts the handler."""
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
            self.finish(grpc.StatusCode.INTERNAL, _one_message(len(data), _PREFIX + size))
            return
        body: bytes | memoryview = data[_PREFIX:]
        if data[0]:
            inflation = self._inflation(data[0], data[_PREFIX:])
            if inflation is None:
                return
            if not self._inflate(inflation, _INLINE_INFLATE):
                return
            if not inflation.finished:  # too big to inflate on the loop: the task does it
                self.task = asyncio.get_running_loop().create_task(self._run_inflated(inflation))
                return
            inflated = self._inflated(inflation)
            if inflated is None:
                return
            body, kept = inflated, True
        self._deserialize_and_run(body, kept)

    def _deserialize_and_run(self, body: bytes | memoryview, kept: bool) -> None:
        if self.direct is not None:
            self._start_direct(body, kept)  # it parses the message itself
            return
        try:
            request = self.method.request_deserializer(body)
        except Exception as exc:
            refused = unparsable(exc)
            self.finish(refused.code, refused.details)
            return
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(request))

    # ---- direct handlers (no task) ----------------------------------------------------------

    def _start_direct(self, body: bytes | memoryview, kept: bool) -> None:
        direct: DirectUnary = self.direct  # type: ignore[assignment]
        try:
            future, self.finisher = direct(body, kept)
        except Refused as exc:
            self.finish(exc.code, exc.details)
            return
        except Exception as exc:
            self._unexpected(exc)
            return
        self.future = future
        future.add_done_callback(self._direct_done)

    def _direct_done(self, future: asyncio.Future[Any]) -> None:
        self.future = None
        if future.cancelled():
            self._end_cancelled()
            return
        assert self.finisher is not None
        finisher, self.finisher = self.finisher, None
        try:
            # The finisher gives the serialized message (api.context.DirectResult).
            self.stream.send(self._framed(finisher(future)), _OK_TRAILERS)
            self._done()
        except Refused as exc:
            self.finish(exc.code, exc.details)
        except _TooLarge as exc:
            self.finish(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Exception as exc:
            self._unexpected(exc)

    def _size_ok(self, data: bytes | bytearray | memoryview) -> bool:
        size = int.from_bytes(data[1:_PREFIX], "big")
        if size > self.limits.max_receive:
            self._fail(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({size} vs. {self.limits.max_receive})",
            )
            return False
        return True

    # ---- compressed messages --------------------------------------------------------------

    def _inflation(self, flag: int, body: memoryview) -> _Inflation | None:
        if flag != 1:
            self._fail(grpc.StatusCode.INTERNAL, f"bad compressed flag {flag} (0 or 1)")
            return None
        if self.wbits is None:
            self._fail(grpc.StatusCode.INTERNAL, "compressed message without a grpc-encoding")
            return None
        limits = self.limits
        cap = min(limits.max_receive, limits.max_inflate, limits.max_inflight - limits.inflight)
        return _Inflation(self.wbits, bytes(body), max(cap, 0))

    def _inflate(self, inflation: _Inflation, budget: int) -> bool:
        """Runs `inflation` on the loop for up to `budget` bytes; False when it failed (and
        the call was answered)."""
        try:
            inflation.run(budget)
        except _InflateError as exc:
            self._fail(exc.code, str(exc))
            return False
        return True

    def _inflated(self, inflation: _Inflation) -> bytes | None:
        """The finished message, its inflated size charged in place of its compressed one."""
        message = inflation.result()
        self._uncharge(len(inflation.source) + _PREFIX)
        if not self._charge(len(message)):
            return None
        return message

    async def _inflate_off_loop(self, inflation: _Inflation) -> None:
        """Inflates the rest of `inflation` on a worker thread. What it may still grow to is
        reserved in the in-flight budget meanwhile, so big inflations running at once stay
        within that budget together (the worker cannot count as it goes: the loop owns it)."""
        limits = self.limits
        room = max(limits.max_inflight - limits.inflight, 0)
        inflation.cap = min(inflation.cap, inflation.total + room)
        reserved = inflation.cap - inflation.total
        limits.inflight += reserved
        self.charged += reserved
        try:
            await asyncio.get_running_loop().run_in_executor(None, inflation.run, inflation.cap + 1)
        finally:
            self._uncharge(reserved)

    async def _run_inflated(self, inflation: _Inflation) -> None:
        self.started = True
        try:
            await self._inflate_off_loop(inflation)
        except asyncio.CancelledError:
            inflation.cancelled = True  # the worker stops at its next step
            self._end_cancelled()
            return
        except _InflateError as exc:
            self.finish(exc.code, str(exc))
            return
        body = self._inflated(inflation)
        if body is None:
            return
        try:
            request = self.method.request_deserializer(body)
        except Exception as exc:
            refused = unparsable(exc)
            self.finish(refused.code, refused.details)
            return
        await self._run(request)

    # ---- streaming requests ---------------------------------------------------------------

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
            message: bytes | _Inflation
            if buffer[0]:
                inflation = self._inflation(buffer[0], memoryview(buffer)[_PREFIX : _PREFIX + size])
                if inflation is None or not self._inflate(inflation, _INLINE_INFLATE):
                    return
                if inflation.finished:
                    inflated = self._inflated(inflation)
                    if inflated is None:
                        return
                    message = inflated
                else:
                    message = inflation  # the handler's task finishes it on a worker
            else:
                message = bytes(buffer[_PREFIX : _PREFIX + size])
            del buffer[: _PREFIX + size]
            self.queued += _PREFIX + size
            self.messages.put_nowait(message)
        if end:
            if buffer:
                self._fail(grpc.StatusCode.INTERNAL, "stream ended inside a message")
                return
            self.messages.put_nowait(None)

    async def _requests(self) -> AsyncIterator[Any]:
        assert self.messages is not None
        deserialize = self.method.request_deserializer
        while (message := await self.messages.get()) is not None:
            if isinstance(message, _Inflation):
                self.queued -= len(message.source) + _PREFIX
                try:
                    await self._inflate_off_loop(message)
                except asyncio.CancelledError:
                    message.cancelled = True
                    raise
                except _InflateError as exc:
                    self._fail(exc.code, str(exc))
                    raise asyncio.CancelledError from exc
                inflated = self._inflated(message)
                if inflated is None:
                    raise asyncio.CancelledError
                body = inflated
                self._uncharge(len(body))
            else:
                self.queued -= len(message) + _PREFIX
                body = message
                self._uncharge(len(body) + _PREFIX)
            if self.withheld and self.queued < _QUEUED_LIMIT:
                self.stream.credit(self.withheld)
                self.withheld = 0
            yield deserialize(body)

    # ---- direct streams (no task) ----------------------------------------------------------

    def _direct_stream_data(self, payload: memoryview, end: bool) -> None:
        # Credit comes back at once (a message being received may exceed the window) unless
        # whole messages pile up undispatched: then it comes back as they are dispatched.
        buffer = self.buffer
        if self.closing is not None:  # the call is ending: what still comes is dropped
            self._uncharge(len(payload))
            self.stream.credit(len(payload))
            return
        if self._lagging():
            self.withheld += len(payload)
        else:
            self.stream.credit(len(payload))
        if buffer:
            buffer += payload
            self._next_messages()
        else:
            # The common case: whole messages in the frame, run without a copy.
            taken = self._run_messages(payload, copy=False)
            if taken < len(payload) and not self.stream.done and self.closing is None:
                buffer += payload[taken:]
        if end and not self.stream.done and self.closing is None:
            self.ended = True
            if _partial(buffer):
                self._fail(grpc.StatusCode.INTERNAL, "stream ended inside a message")
            else:
                self._end_if_answered()

    def _next_messages(self) -> None:
        """Runs the buffered messages the window has room for."""
        buffer = self.buffer
        with memoryview(buffer) as data:
            taken = self._run_messages(data, copy=True)
        del buffer[:taken]
        if self.withheld and not self._lagging():
            self.stream.credit(self.withheld)
            self.withheld = 0

    def _lagging(self) -> bool:
        """Whether messages wait undispatched (the window is full or the client reads too
        slowly) past _QUEUED_LIMIT bytes."""
        assert self.flights is not None
        blocked = len(self.flights) >= _STREAM_WINDOW or self.stall is not None
        return blocked and len(self.buffer) >= _QUEUED_LIMIT

    def _run_messages(self, data: memoryview, copy: bool) -> int:
        """Runs the whole messages at the start of `data` while the window has room and the
        client keeps up; returns the bytes taken. `copy`: give the handler copies (`data` is
        the call's buffer, which is cut afterwards)."""
        flights = self.flights
        assert flights is not None
        at, n = 0, len(data)
        while (
            n - at >= _PREFIX
            and len(flights) < _STREAM_WINDOW
            and self.stall is None
            and self.closing is None
        ):
            if data[at]:  # compressed: this call has no grpc-encoding (start), so it fails
                self._inflation(data[at], data[at:at])
                return at
            if not self._size_ok(data[at : at + _PREFIX]):
                return at
            end = at + _PREFIX + int.from_bytes(data[at + 1 : at + _PREFIX], "big")
            if end > n:
                break
            body = bytes(data[at + _PREFIX : end]) if copy else data[at + _PREFIX : end]
            self._uncharge(end - at)
            at = end
            self._run_message(body)
            if self.stream.done:
                break
        return at

    def _run_message(self, body: bytes | memoryview) -> None:
        assert self.direct is not None and self.flights is not None
        handler: DirectStream = self.direct  # type: ignore[assignment]
        try:
            result = handler(body)
        except Refused as exc:
            self._close_with(exc.code, exc.details)
            return
        except Exception as exc:
            self._close_with(grpc.StatusCode.UNKNOWN, self._unexpected_details(exc))
            return
        if isinstance(result, bytes):  # answered at once
            self._write_answer(result)
            return
        future, finisher = result
        self.flights.add(future)
        future.add_done_callback(functools.partial(self._stream_answered, finisher))

    def _stream_answered(
        self, finisher: Callable[[asyncio.Future[Any]], bytes], future: asyncio.Future[Any]
    ) -> None:
        assert self.flights is not None
        self.flights.discard(future)
        if self.on_done is _ignore or future.cancelled():  # the call has ended
            return
        try:
            answer = finisher(future)
        except Exception as exc:
            self._unexpected(exc)
            return
        self._write_answer(answer)
        if not self.stream.done:
            self._resume()

    def _write_answer(self, answer: bytes) -> None:
        try:
            framed = self._framed(answer)
        except _TooLarge as exc:
            self.finish(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return
        stream = self.stream
        stream.send(framed)
        if stream.backlog() > _STREAM_BACKLOG and self.stall is None:
            self.stall = asyncio.get_running_loop().create_task(self._wait_for_client())

    async def _wait_for_client(self) -> None:
        try:
            await self.stream.wait_drained()
        finally:
            self.stall = None
        if not self.stream.done:
            self._resume()

    def _resume(self) -> None:
        """Room again (an answer written, or the client caught up): run the messages that
        wait, or end the call if no more will run."""
        if self.buffer and self.closing is None:
            self._next_messages()
        if self.ended and not self.stream.done:
            self._end_if_answered()

    def _close_with(self, code: grpc.StatusCode, details: str) -> None:
        """A message was refused: no further message runs, and once the answers of those in
        flight are written the call ends with this status (as a task-run stream's would)."""
        self.closing = (code, details)
        self.ended = True
        self._end_if_answered()

    def _end_if_answered(self) -> None:
        """No more messages will run: the call ends once every answer is written."""
        if self.flights or self.stall is not None:
            return
        if self.closing is not None:
            self.finish(*self.closing)
        elif not self.buffer:
            self.finish(grpc.StatusCode.OK)

    # ---- ending -----------------------------------------------------------------------------

    def _fail(self, code: grpc.StatusCode, details: str) -> None:
        """A transport-level failure while the handler may be running: answer, stop it."""
        self.finish(code, details)
        running = self.future if self.future is not None else self.task
        if running is not None and not running.done():
            self.cancel_reason = self.cancel_reason or _RESET
            running.cancel()  # a direct handler's future: its queued work is dropped

    def reset(self) -> None:
        """The client reset the stream or the connection went away."""
        self.cancel(_RESET)

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.flights is not None:
            self._end_cancelled()  # a direct stream: _done drops its work in flight
            return
        if self.future is not None:
            # Drops work not yet run; _direct_done answers. Work already done answers as
            # finished (its callback is queued), as a task past its last await would.
            self.future.cancel()
            return
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the task answers through _end_cancelled
            if self.started:
                return
        # No coroutine will run to answer (none exists, or its task was cancelled before its
        # first step, which never enters the coroutine): end the call here, or it would stay
        # registered for ever (rapid reset).
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
        self.started = True
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
            self._unexpected(exc)

    def _unexpected(self, exc: Exception) -> None:
        """A handler failed outside its own error mapping: logged (call it in the `except`)."""
        self.finish(grpc.StatusCode.UNKNOWN, self._unexpected_details(exc))

    def _unexpected_details(self, exc: Exception) -> str:
        """Logs `exc` (call it in the `except`); the status message that says what it was."""
        log.exception("unexpected error in %s", self.headers.get(b":path", b"?").decode())
        return f"Unexpected {type(exc).__name__}: {exc}"

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

    def finish(self, code: grpc.StatusCode, details: str = "") -> None:
        """Ends the call with a status (trailers-only when nothing was sent yet)."""
        block = _OK_TRAILERS if code == grpc.StatusCode.OK else f.trailers(code.value[0], details)
        self.stream.respond_only(block)
        self._done()

    def _done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.charged:
            self.limits.inflight -= self.charged
            self.charged = 0
        if self.flights:
            for future in list(self.flights):
                future.cancel()  # drops the stream's work not yet run
        if self.stall is not None:
            self.stall.cancel()
        on_done, self.on_done = self.on_done, _ignore
        on_done(self)


class _TooLarge(Exception):
    pass


def _partial(data: bytearray) -> bool:
    """Whether `data`, a run of gRPC messages, ends inside one."""
    at = 0
    while len(data) - at >= _PREFIX:
        at += _PREFIX + int.from_bytes(data[at + 1 : at + _PREFIX], "big")
    return at != len(data)


def _ignore(call: Call) -> None:
    pass


def _one_message(got: int, declared: int) -> str:
    return (
        f"a unary call carries exactly one message (got {got} bytes, the first message "
        f"declares {declared - _PREFIX})"
    )


_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


class _InflateError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Inflation:
    """One compressed message, inflated in steps with the size limit checked at each step
    (zlib's max_length): a small bomb never grows past the limit. `run` may be called from a
    worker thread; the event loop only reads the result once it returned."""

    __slots__ = ("inflater", "source", "tail", "cap", "parts", "total", "finished", "cancelled")

    def __init__(self, wbits: int, data: bytes, cap: int) -> None:
        self.inflater = zlib.decompressobj(wbits)
        self.source = data
        self.tail = data
        self.cap = cap
        self.parts: list[bytes] = []
        self.total = 0
        self.finished = False
        self.cancelled = False

    def run(self, budget: int) -> None:
        """Inflates up to `budget` more bytes (stops early once the message is complete)."""
        inflater = self.inflater
        while budget > 0 and not self.finished and not self.cancelled:
            want = min(_INFLATE_STEP, budget, self.cap + 1 - self.total)
            try:
                piece = inflater.decompress(self.tail, want)
            except zlib.error as exc:
                raise _InflateError(
                    grpc.StatusCode.INTERNAL, f"could not decompress the message: {exc}"
                ) from exc
            self.tail = inflater.unconsumed_tail
            self.total += len(piece)
            budget -= len(piece)
            if self.total > self.cap:
                self.parts.clear()
                raise _InflateError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"Received message larger than max (more than {self.cap} bytes once "
                    "decompressed: the message or decompression limit, or what the server's "
                    "in-flight limit had left)",
                )
            if piece:
                self.parts.append(piece)
            if inflater.eof:
                self.finished = True
            elif not self.tail and len(piece) < want:
                # zlib returns what it could of a cut stream without an error
                raise _InflateError(grpc.StatusCode.INTERNAL, "the compressed message is truncated")

    def result(self) -> bytes:
        parts, self.parts = self.parts, []
        return parts[0] if len(parts) == 1 else b"".join(parts)
