"""One HTTP/2 connection, server side: frame parsing, streams, flow control, write coalescing.

This module knows HTTP/2 and nothing of gRPC: a complete request header block opens a stream and
is handed to `Endpoint.open_call`, which returns the `CallSink` that receives the stream's DATA
and learns of resets. The call answers through `Stream.respond` / `Stream.send`.

Why not grpc.aio: its per-RPC cost in Python (~430 us of CPU here, see docs/benchmarks.md) was
the ceiling of the whole server on small machines. An asyncio protocol that parses frames itself
and writes every response produced in one loop iteration with one `write` costs a fraction.

Flow control, receiving: a large initial stream window and connection window are advertised up
front. Unary requests are bounded by the message size limit, so their bytes are credited back as
they arrive; streaming calls credit a message back only when the handler consumes it, which is
what pushes back on a client that sends faster than the server works.
Sending: the peer's windows are honoured; what does not fit waits on the stream until
WINDOW_UPDATE, and the trailers wait behind it.

What the peer sends is checked against RFC 9113 (stream states, frame sizes, the windows
advertised, header validation) by the functions of `rules`, called from the frame handlers
below; what they raise becomes GOAWAY (`ConnectionError_`) or RST_STREAM (`rules.StreamError`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import hpack

from pipeserve.api.h2 import frames as f
from pipeserve.api.h2 import rules
from pipeserve.api.h2.rules import ConnectionError_

log = logging.getLogger(__name__)

# What this side advertises.
RECV_STREAM_WINDOW = 4 << 20
RECV_CONNECTION_WINDOW = 1 << 30
MAX_RECV_FRAME = 1 << 20
MAX_CONCURRENT = 65_536
MAX_HEADER_LIST = 64 << 10
HEADER_TABLE = 4096

_STREAM_CREDIT_AT = RECV_STREAM_WINDOW // 4
_CONNECTION_CREDIT_AT = RECV_CONNECTION_WINDOW // 4
_HEADER_CACHE = 64

_SERVER_SETTINGS = f.settings(
    {
        f.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT,
        f.INITIAL_WINDOW_SIZE: RECV_STREAM_WINDOW,
        f.MAX_FRAME_SIZE: MAX_RECV_FRAME,
        f.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        f.ENABLE_PUSH: 0,
    }
) + f.window_update(0, RECV_CONNECTION_WINDOW - f.DEFAULT_WINDOW)

_NOT_HTTP2 = (
    b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain\r\n"
    b"Connection: close\r\nContent-Length: 52\r\n\r\n"
    b"pipeserve serves gRPC here, which needs HTTP/2 (h2c)"
)


class CallSink(Protocol):
    def data(self, payload: memoryview, end: bool) -> None: ...

    def reset(self) -> None: ...


class Endpoint(Protocol):
    def open_call(self, stream: Stream, headers: dict[bytes, bytes]) -> CallSink:
        """Called with a validated request header block; may raise `rules.StreamError` to have
        the stream reset instead of answered."""
        ...

    def connection_closed(self, connection: Connection) -> None: ...


class Stream:
    """Server half of one HTTP/2 stream."""

    __slots__ = (
        "conn",
        "id",
        "call",
        "send_window",
        "headers_sent",
        "pending",
        "pending_trailers",
        "remote_closed",
        "done",
        "uncredited",
        "recv_window",
        "drained",
    )

    def __init__(self, conn: Connection, stream_id: int, send_window: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.call: CallSink | None = None
        self.send_window = send_window
        self.headers_sent = False
        self.pending = bytearray()  # framed gRPC bytes waiting for window
        self.pending_trailers: bytes | None = None
        self.remote_closed = False
        self.done = False
        self.uncredited = 0
        self.recv_window = RECV_STREAM_WINDOW  # what the client may still send (RFC 9113 6.9)
        self.drained: asyncio.Future[None] | None = None

    # ---- sending (used by the call) ---------------------------------------------------------

    def send(self, data: bytes, trailers: bytes | None = None) -> None:
        """Response headers (first time), `data` as DATA frames, then `trailers` if given (ends
        the stream). A reset or finished stream drops it silently: nobody is listening."""
        if self.done:
            return
        conn = self.conn
        if not self.headers_sent:
            self.headers_sent = True
            conn.write(
                f.frame_header(len(f.RESPONSE_HEADERS), f.HEADERS, f.END_HEADERS, self.id)
                + f.RESPONSE_HEADERS
            )
        if self.pending:
            self.pending += data
        elif data:
            sent = conn.send_data(self, data)
            if sent < len(data):
                self.pending += memoryview(data)[sent:]
        if trailers is not None:
            if self.pending:
                self.pending_trailers = trailers
                conn.blocked[self.id] = self
            else:
                self._trailers(trailers)
        elif self.pending:
            conn.blocked[self.id] = self

    def respond_only(self, block: bytes, head: bytes = f.RESPONSE_HEADERS) -> None:
        """A trailers-only response (an error before any message): one HEADERS frame, `head`
        (`:status` and content-type) then `block`."""
        if self.done:
            return
        if self.headers_sent:
            self.send(b"", block)
            return
        self.headers_sent = True
        block = head + block
        self.conn.write(
            f.frame_header(len(block), f.HEADERS, f.END_HEADERS | f.END_STREAM, self.id) + block
        )
        self._close()

    def backlog(self) -> int:
        return len(self.pending)

    async def wait_drained(self) -> None:
        """For streaming responses: returns once the queued bytes went out (or the stream died)."""
        if not self.pending or self.done:
            return
        if self.drained is None:
            self.drained = asyncio.get_running_loop().create_future()
        await self.drained

    def credit(self, n: int) -> None:
        """Bytes the call consumed: returned to the client's window for this stream."""
        if self.done or self.remote_closed:
            return
        self.uncredited += n
        if self.uncredited >= _STREAM_CREDIT_AT:
            self.conn.write(f.window_update(self.id, self.uncredited))
            self.recv_window += self.uncredited
            self.uncredited = 0

    # ---- internal -----------------------------------------------------------------------------

    def _trailers(self, block: bytes) -> None:
        self.conn.write(
            f.frame_header(len(block), f.HEADERS, f.END_HEADERS | f.END_STREAM, self.id) + block
        )
        self._close()

    def _close(self) -> None:
        self.done = True
        conn = self.conn
        conn.streams.pop(self.id, None)
        conn.blocked.pop(self.id, None)
        if not self.remote_closed:
            # The answer is complete; tell the client to stop sending (gRPC over HTTP/2 spec).
            conn.write(f.rst_stream(self.id, f.NO_ERROR))
            conn.closed_streams.add(self.id, rules.RESET_BY_US)
        else:
            conn.closed_streams.add(self.id, rules.ENDED)
        self._wake()
        conn.stream_finished()

    def _wake(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    def flush(self) -> None:
        """Sends what the windows now allow; the trailers follow once nothing is left."""
        if self.pending:
            sent = self.conn.send_data(self, memoryview(self.pending))
            del self.pending[:sent]
        if not self.pending:
            self.conn.blocked.pop(self.id, None)
            if self.pending_trailers is not None:
                block, self.pending_trailers = self.pending_trailers, None
                self._trailers(block)
            else:
                self._wake()

    def abandon(self, how: int = rules.RESET_BY_PEER) -> None:
        """The stream was reset (`how` says by whom) or the peer went away: drop output, tell
        the call."""
        if self.done:
            return
        self.done = True
        self.pending.clear()
        self.conn.closed_streams.add(self.id, how)
        self.conn.streams.pop(self.id, None)
        self.conn.blocked.pop(self.id, None)
        self._wake()
        if self.call is not None:
            self.call.reset()
        self.conn.stream_finished()


class Connection(asyncio.Protocol):
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.blocked: dict[int, Stream] = {}  # streams with data waiting for window
        self.last_stream_id = 0
        self.closed_streams = rules.ClosedStreams()
        self.going_away = False
        self.closed = False
        self._buf = bytearray()
        self._preface = True
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._loop = asyncio.get_event_loop()
        # Peer settings and our send windows.
        self.peer_window = f.DEFAULT_WINDOW
        self.peer_max_frame = f.DEFAULT_MAX_FRAME
        self.send_window = f.DEFAULT_WINDOW
        self._uncredited = 0
        self._recv_window = RECV_CONNECTION_WINDOW  # what the client may still send
        # Header block decoding, plus a cache of blocks that left the table unchanged.
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._decoder.max_allowed_table_size = HEADER_TABLE
        self._table_generation = 0
        self._header_cache: dict[bytes, tuple[int, dict[bytes, bytes]]] = {}
        # stream, flags, the stream it depends on (-1: none given), block
        self._continuation: tuple[int, int, int, bytearray] | None = None

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self._receive(data)
        except ConnectionError_ as exc:
            log.debug("HTTP/2 connection error: %s", exc)
            self.abort(exc.code, str(exc))
            return
        self._flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for stream in list(self.streams.values()):
            stream.abandon()
        self.endpoint.connection_closed(self)

    # ---- writing --------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queued and written once per loop iteration: a batch of answers costs one syscall."""
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.closed:
            out = self._out
            self._out = []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def send_data(self, stream: Stream, data: bytes | memoryview) -> int:
        """Writes as many DATA frames of `data` as both windows allow; returns bytes sent."""
        total = len(data)
        sent = 0
        while sent < total:
            room = min(stream.send_window, self.send_window, self.peer_max_frame, total - sent)
            if room <= 0:
                break
            chunk = data[sent : sent + room]
            self._out.append(f.frame_header(room, f.DATA, 0, stream.id))
            self._out.append(chunk if isinstance(chunk, bytes) else bytes(chunk))
            sent += room
            stream.send_window -= room
            self.send_window -= room
        if sent and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return sent

    # ---- shutting down ------------------------------------------------------------------------

    def goaway(self) -> None:
        """Graceful: no new streams, the ones in flight finish."""
        if self.going_away or self.closed:
            return
        self.going_away = True
        self.write(f.goaway(self.last_stream_id, f.NO_ERROR))
        if not self.streams:
            self._close_soon()

    def abort(self, code: int, message: str) -> None:
        if self.closed:
            return
        self.write(f.goaway(self.last_stream_id, code, message.encode()[:256]))
        self._flush()
        self.closed = True
        for stream in list(self.streams.values()):
            stream.abandon()
        if self.transport is not None:
            self.transport.close()

    def stream_finished(self) -> None:
        if not self.streams and self.going_away:
            self._close_soon()

    def _close_soon(self) -> None:
        def close() -> None:
            self._flush()
            if self.transport is not None and not self.closed:
                self.transport.close()

        self._loop.call_soon(close)

    # ---- reading --------------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray = buf
        else:
            src = data
        pos = 0
        if self._preface:
            if len(src) < len(f.PREFACE):
                if not f.PREFACE.startswith(bytes(src)):
                    self._not_http2()
                    return
                if src is data:
                    self._buf = bytearray(data)
                return
            if bytes(src[: len(f.PREFACE)]) != f.PREFACE:
                self._not_http2()
                return
            self._preface = False
            pos = len(f.PREFACE)
            # Our SETTINGS go first, once the client proved to speak HTTP/2.
            self._out.append(_SERVER_SETTINGS)
        view = memoryview(src)
        end = len(src)
        try:
            while end - pos >= 9:
                length = (src[pos] << 16) | (src[pos + 1] << 8) | src[pos + 2]
                if length > MAX_RECV_FRAME:
                    raise ConnectionError_(
                        f.FRAME_SIZE_ERROR, f"frame of {length} bytes over {MAX_RECV_FRAME}"
                    )
                if end - pos - 9 < length:
                    break
                kind = src[pos + 3]
                flags = src[pos + 4]
                stream_id = f.u32(view[pos + 5 : pos + 9])
                payload = view[pos + 9 : pos + 9 + length]
                pos += 9 + length
                try:
                    self._frame(kind, flags, stream_id, payload)
                except rules.StreamError as exc:
                    self._stream_error(exc)
        finally:
            if self._uncredited >= _CONNECTION_CREDIT_AT:
                self._out.append(f.window_update(0, self._uncredited))
                self._recv_window += self._uncredited
                self._uncredited = 0
            payload = view = None  # type: ignore[assignment]
            if src is data:
                self._buf = bytearray(data[pos:]) if pos < end else bytearray()
            else:
                try:
                    del buf[:pos]
                except BufferError:  # a view is still alive somewhere: copy instead
                    self._buf = bytearray(buf[pos:])

    def _not_http2(self) -> None:
        assert self.transport is not None
        self.transport.write(_NOT_HTTP2)
        self.closed = True
        self.transport.close()

    def _stream_error(self, exc: rules.StreamError) -> None:
        """RST_STREAM with the error's code; the stream's call is cancelled, the rest goes on."""
        stream_id = exc.stream_id
        if stream_id > self.last_stream_id:
            # An idle stream cannot be reset (RFC 9113 6.4): the whole connection is wrong.
            raise ConnectionError_(exc.code, str(exc)) from exc
        log.debug("HTTP/2 stream %d error: %s", stream_id, exc)
        self._out.append(f.rst_stream(stream_id, exc.code))
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.remote_closed = True
            stream.abandon(rules.RESET_BY_US)
        else:
            self.closed_streams.add(stream_id, rules.RESET_BY_US)

    def _frame(self, kind: int, flags: int, stream_id: int, payload: memoryview) -> None:
        if self._continuation is not None and kind != f.CONTINUATION:
            raise ConnectionError_(
                f.PROTOCOL_ERROR, f"{rules.frame_name(kind)} where CONTINUATION was expected"
            )
        rules.check_frame(kind, flags, stream_id, len(payload))
        if kind == f.DATA:
            self._data(flags, stream_id, payload)
        elif kind == f.HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == f.CONTINUATION:
            self._continue(flags, stream_id, payload)
        elif kind == f.WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == f.PING:
            if not flags & f.ACK:
                self._out.append(f.frame(f.PING, f.ACK, 0, bytes(payload)))
        elif kind == f.SETTINGS:
            if not flags & f.ACK:
                self._settings(payload)
        elif kind == f.RST_STREAM:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.remote_closed = True
                stream.abandon(rules.RESET_BY_PEER)
            elif stream_id > self.last_stream_id:
                raise ConnectionError_(f.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        elif kind == f.GOAWAY:
            pass  # the client opens no more streams; the ones in flight still get answers
        elif kind == f.PUSH_PROMISE:
            raise ConnectionError_(f.PROTOCOL_ERROR, "clients cannot push")
        elif kind == f.PRIORITY:
            rules.check_dependency(stream_id, rules.dependency(payload))
        # Otherwise priorities and unknown frame types are ignored (RFC 9113 5.3.2, 5.5).

    def _data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        # Every DATA byte counts against the connection window, even on closed streams (6.9).
        n = len(payload)
        if n > self._recv_window:
            raise rules.over_window(0, n, self._recv_window)
        self._recv_window -= n
        self._uncredited += n
        if flags & f.PADDED:
            payload = rules.unpad(payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream_id:
                raise ConnectionError_(f.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            how = self.closed_streams.get(stream_id)
            rules.frame_on_closed(f.DATA, stream_id, how, self.last_stream_id)
            return  # a stream we reset: the client sent these before it knew
        if stream.remote_closed:
            raise rules.half_closed(f.DATA, stream_id)
        if n > stream.recv_window:
            raise rules.over_window(stream_id, n, stream.recv_window)
        stream.recv_window -= n
        if n != len(payload):
            stream.credit(n - len(payload))  # padding is flow-controlled but never consumed
        end = bool(flags & f.END_STREAM)
        if end:
            stream.remote_closed = True
        assert stream.call is not None
        stream.call.data(payload, end)

    def _headers(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if flags & f.PADDED:
            payload = rules.unpad(payload)
        depends_on = -1
        if flags & f.PRIORITY_FLAG:
            depends_on = rules.dependency(payload)
            payload = payload[5:]
        if flags & f.END_HEADERS:
            self._open(stream_id, flags, depends_on, payload)
        else:
            self._continuation = (stream_id, flags, depends_on, bytearray(payload))

    def _continue(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if self._continuation is None or self._continuation[0] != stream_id:
            raise ConnectionError_(
                f.PROTOCOL_ERROR, f"CONTINUATION on stream {stream_id} not after its HEADERS"
            )
        block = self._continuation[3]
        block += payload
        if len(block) > MAX_HEADER_LIST:
            raise ConnectionError_(f.PROTOCOL_ERROR, "header block too large")
        if flags & f.END_HEADERS:
            _, first_flags, depends_on, _ = self._continuation
            self._continuation = None
            self._open(stream_id, first_flags, depends_on, memoryview(block))

    def _open(self, stream_id: int, flags: int, depends_on: int, block: memoryview) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._trailers(stream, flags, depends_on, block)
            return
        if stream_id % 2 == 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, f"client stream id {stream_id} is even")
        if stream_id <= self.last_stream_id:
            self._decode(block)  # keeps the HPACK table in step
            how = self.closed_streams.get(stream_id)
            rules.frame_on_closed(f.HEADERS, stream_id, how, self.last_stream_id)
            return
        self.last_stream_id = stream_id
        # Decoded before anything can refuse the stream: the HPACK table must stay in step.
        headers = self._request(stream_id, block)
        rules.check_dependency(stream_id, depends_on)
        if self.going_away or len(self.streams) >= MAX_CONCURRENT:
            self._out.append(f.rst_stream(stream_id, f.REFUSED_STREAM))
            self.closed_streams.add(stream_id, rules.RESET_BY_US)
            return
        stream = Stream(self, stream_id, self.peer_window)
        self.streams[stream_id] = stream
        stream.call = self.endpoint.open_call(stream, headers)
        if flags & f.END_STREAM and not stream.done:
            stream.remote_closed = True
            stream.call.data(memoryview(b""), True)

    def _trailers(self, stream: Stream, flags: int, depends_on: int, block: memoryview) -> None:
        """A second header block on an open stream: the client's trailers (RFC 9113 8.1)."""
        fields = self._decode(block)
        stream_id = stream.id
        if stream.remote_closed:
            raise rules.half_closed(f.HEADERS, stream_id)
        rules.check_dependency(stream_id, depends_on)
        if not flags & f.END_STREAM:
            raise rules.StreamError(stream_id, f.PROTOCOL_ERROR, "trailers without END_STREAM")
        rules.trailer_fields(stream_id, fields)  # only END_STREAM matters to a gRPC call
        stream.remote_closed = True
        assert stream.call is not None
        stream.call.data(memoryview(b""), True)

    def _request(self, stream_id: int, block: memoryview) -> dict[bytes, bytes]:
        """A request header block, decoded and validated (RFC 9113 8.2, 8.3). A block that left
        the HPACK table unchanged decodes the same way next time: such blocks are cached with
        their validated fields, so the rules cost nothing per call of a steady client."""
        key = bytes(block)
        cached = self._header_cache.get(key)
        if cached is not None and cached[0] == self._table_generation:
            return cached[1]
        table = self._decoder.header_table.dynamic_entries
        before = (len(table), id(table[0]) if table else 0)
        fields = self._decode(key)
        if (len(table), id(table[0]) if table else 0) != before:
            self._table_generation += 1
            self._header_cache.clear()
            return rules.request_fields(stream_id, fields)
        headers = rules.request_fields(stream_id, fields)
        if len(self._header_cache) < _HEADER_CACHE:
            self._header_cache[key] = (self._table_generation, headers)
        return headers

    def _decode(self, block: bytes | memoryview) -> list[tuple[bytes, bytes]]:
        try:
            fields = self._decoder.decode(bytes(block), raw=True)
        except hpack.HPACKError as exc:
            raise ConnectionError_(f.COMPRESSION_ERROR, f"bad header block: {exc}") from exc
        return [(bytes(name), bytes(value)) for name, value in fields]

    def _window_update(self, stream_id: int, payload: memoryview) -> None:
        increment = rules.window_increment(stream_id, payload)
        if stream_id == 0:
            self.send_window = rules.grow_send_window(self.send_window, increment, 0)
            for stream in list(self.blocked.values()):
                stream.flush()
                if self.send_window <= 0:
                    break
        else:
            target = self.streams.get(stream_id)
            if target is not None:
                target.send_window = rules.grow_send_window(
                    target.send_window, increment, stream_id
                )
                if target.pending:
                    target.flush()
            elif stream_id > self.last_stream_id:
                raise ConnectionError_(
                    f.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}"
                )

    def _settings(self, payload: memoryview) -> None:
        values = f.parse_settings(payload)
        rules.check_settings(values)
        for key, value in values:
            if key == f.INITIAL_WINDOW_SIZE:
                # Applies to every open stream's window, by the difference (RFC 9113 6.9.2).
                delta = value - self.peer_window
                self.peer_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    rules.check_initial_window_change(stream.send_window, stream.id)
            elif key == f.MAX_FRAME_SIZE:
                self.peer_max_frame = value
        self._out.append(f.frame(f.SETTINGS, f.ACK, 0))
        for stream in list(self.blocked.values()):
            stream.flush()
