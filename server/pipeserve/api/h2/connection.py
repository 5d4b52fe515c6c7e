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
WINDOW_UPDATE, and the trailers wait behind it. Streams that wait only for the connection window
sit in one ordered queue (`ready`), the others aside (`stalled`): a WINDOW_UPDATE or SETTINGS
frame costs work for the streams it lets send, never a walk over every waiting stream.

Resources and floods: every bound comes from the server's `H2Limits` (limits.py). The socket's
write-pressure signal pauses reading (a peer that does not read cannot make the server queue
more answers), output held by shut windows past its bound refuses new streams, control answers
owed to a peer are counted, and timers close connections that never speak, go idle or die.

What the peer sends is checked against RFC 9113 (stream states, frame sizes, the windows
advertised, header validation) by the functions of `rules`, called from the frame handlers
below; what they raise becomes GOAWAY (`ConnectionError_`) or RST_STREAM (`rules.StreamError`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from typing import Protocol

import hpack

from pipeserve.api.h2 import frames as f
from pipeserve.api.h2 import rules
from pipeserve.api.h2.limits import H2Limits
from pipeserve.api.h2.rules import ConnectionError_

log = logging.getLogger(__name__)

# What this side advertises.
RECV_STREAM_WINDOW = 4 << 20
RECV_CONNECTION_WINDOW = 1 << 30
MAX_RECV_FRAME = 1 << 20
HEADER_TABLE = 4096

# DATA frames from this size on are passed on in parts as they arrive, not kept until whole
# (one copy fewer for each large tensor; smaller frames cut by a read cost little to keep).
_PARTS_FROM = 64 << 10
_STREAM_CREDIT_AT = RECV_STREAM_WINDOW // 4
_CONNECTION_CREDIT_AT = RECV_CONNECTION_WINDOW // 4
_HEADER_CACHE = 64

# Seconds a closed connection may take to deliver its last frames to a peer that stopped reading.
_LINGER = 2.0
# Opaque data of the server's keepalive PING.
_KEEPALIVE = b"pipeserv"
# HPACK dynamic table size updates one header block may start with (RFC 7541 4.2: only the
# smallest and the final one mean anything).
_MAX_TABLE_UPDATES = 2


@functools.lru_cache(maxsize=8)
def _server_settings(limits: H2Limits) -> bytes:
    return f.settings(
        {
            f.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            f.INITIAL_WINDOW_SIZE: RECV_STREAM_WINDOW,
            f.MAX_FRAME_SIZE: MAX_RECV_FRAME,
            f.MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
            f.ENABLE_PUSH: 0,
        }
    ) + f.window_update(0, RECV_CONNECTION_WINDOW - f.DEFAULT_WINDOW)


_NOT_HTTP2 = (
    b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain\r\n"
    b"Connection: close\r\nContent-Length: 52\r\n\r\n"
    b"pipeserve serves gRPC here, which needs HTTP/2 (h2c)"
)


class CallSink(Protocol):
    def data(self, payload: memoryview, end: bool) -> None:
        """The stream's next DATA bytes; `end`: the client's END_STREAM came with the last of
        them. `payload` stays valid and unchanged after the call (the connection never changes
        bytes it handed out): a call may keep it instead of a copy."""
        ...

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
        "window_adj",
        "headers_sent",
        "pending",
        "pending_trailers",
        "remote_closed",
        "done",
        "uncredited",
        "recv_window",
        "drained",
    )

    def __init__(self, conn: Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.call: CallSink | None = None
        # The stream's send window is the peer's SETTINGS_INITIAL_WINDOW_SIZE plus this: a
        # SETTINGS change then moves every stream's window at once, without visiting them.
        self.window_adj = 0
        self.headers_sent = False
        self.pending = bytearray()  # framed gRPC bytes waiting for window
        self.pending_trailers: bytes | None = None
        self.remote_closed = False
        self.done = False
        self.uncredited = 0
        self.recv_window = RECV_STREAM_WINDOW  # what the client may still send (RFC 9113 6.9)
        self.drained: asyncio.Future[None] | None = None

    @property
    def send_window(self) -> int:
        return self.conn.peer_window + self.window_adj

    @send_window.setter
    def send_window(self, value: int) -> None:
        self.window_adj = value - self.conn.peer_window

    # ---- sending (used by the call) ---------------------------------------------------------

    def send(self, data: bytes, trailers: bytes | None = None) -> None:
        """Response headers (first time), `data` as DATA frames, then `trailers` if given (ends
        the stream). A reset or finished stream drops it silently: nobody is listening."""
        if self.done:
            return
        conn = self.conn
        conn.answered = True
        if not self.headers_sent:
            self.headers_sent = True
            conn.write(
                f.frame_header(len(f.RESPONSE_HEADERS), f.HEADERS, f.END_HEADERS, self.id)
                + f.RESPONSE_HEADERS
            )
        if self.pending:
            self.pending += data
            conn.held += len(data)
        elif data:
            sent = conn.send_data(self, data)
            if sent < len(data):
                self.pending += memoryview(data)[sent:]
                conn.held += len(data) - sent
        if trailers is not None:
            if self.pending:
                self.pending_trailers = trailers
                conn.hold(self)
            else:
                self._trailers(trailers)
        elif self.pending:
            conn.hold(self)

    def respond_only(self, block: bytes, head: bytes = f.RESPONSE_HEADERS) -> None:
        """A trailers-only response (an error before any message): one HEADERS frame, `head`
        (`:status` and content-type) then `block`."""
        if self.done:
            return
        if self.headers_sent:
            self.send(b"", block)
            return
        self.headers_sent = True
        self.conn.answered = True
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
        if conn.ready or conn.stalled:
            conn.release(self)
        if not self.remote_closed:
            # The answer is complete; tell the client to stop sending (gRPC over HTTP/2 spec).
            conn.write(f.rst_stream(self.id, f.NO_ERROR))
            conn.closed_streams.add(self.id, rules.RESET_BY_US)
        else:
            conn.closed_streams.add(self.id, rules.ENDED)
        self._wake()
        conn.stream_finished(True)

    def _wake(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    def flush(self) -> None:
        """Sends what the windows now allow; the trailers follow once nothing is left."""
        conn = self.conn
        if self.pending:
            sent = conn.send_data(self, memoryview(self.pending))
            del self.pending[:sent]
            conn.held -= sent
        if not self.pending:
            conn.release(self)
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
        conn = self.conn
        conn.held -= len(self.pending)
        self.pending = bytearray()
        conn.closed_streams.add(self.id, how)
        conn.streams.pop(self.id, None)
        conn.release(self)
        self._wake()
        if self.call is not None:
            self.call.reset()
        conn.stream_finished(False)


class Connection(asyncio.Protocol):
    def __init__(self, endpoint: Endpoint, limits: H2Limits | None = None) -> None:
        self.endpoint = endpoint
        self.limits = limits = limits or H2Limits()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        # Streams with output waiting: `ready` ones have stream window and wait for the
        # connection window (served in order), `stalled` ones wait for their own window.
        self.ready: OrderedDict[int, Stream] = OrderedDict()
        self.stalled: dict[int, Stream] = {}
        self.held = 0  # bytes those streams hold
        self.last_stream_id = 0
        self.closed_streams = rules.ClosedStreams()
        self.going_away = False
        self.closed = False
        self._buf = bytearray()  # a frame cut by the end of a read, kept until it is whole
        # A large DATA frame whose payload is passed on as it arrives (`_next_part`): its
        # stream (None: the frame is dropped), the bytes still to come, END_STREAM.
        self._part: Stream | None = None
        self._part_left = 0
        self._part_end = False
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
        # The highest Stream.window_adj a WINDOW_UPDATE made: a SETTINGS change that cannot
        # overflow any stream window with it needs no walk over the streams.
        self._adj_high = 0
        # Header block decoding, plus a cache of blocks that left the table unchanged.
        self._decoder = hpack.Decoder(max_header_list_size=limits.max_header_list_bytes)
        self._decoder.max_allowed_table_size = HEADER_TABLE
        self._table_generation = 0
        self._header_cache: dict[bytes, tuple[int, dict[bytes, bytes]]] = {}
        # stream, flags, the stream it depends on (-1: none given), block
        self._continuation: tuple[int, int, int, bytearray] | None = None
        self._continuations = 0  # CONTINUATION frames of the block being received
        # Write pressure: the transport asked us to stop writing, so we stop reading.
        self._write_paused = False
        self._owed = 0  # control answers queued since the peer last drained our output
        # Timers: one handle, armed for the nearest deadline (see _tick).
        now = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._made_at = now
        self._last_read = now
        self._idle_since = now
        self._ping_due: float | None = None  # keepalive PING sent, answer expected by then
        # Flood accounting: grpc-core's ping strikes, nghttp2's reset bucket, frame rates.
        self.answered = False  # response HEADERS or DATA written since the last client PING
        self._ping_strikes = 0
        self._last_ping = -1e18
        self._reset_burst = limits.reset_burst
        self._reset_tokens = float(limits.reset_burst)
        # Read on every new stream: kept at hand.
        self._max_streams = limits.max_concurrent_streams
        self._max_held = limits.max_held_output_bytes
        self._reset_at = now
        self._rates: dict[str, list[float]] = {}

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._arm(self._loop.time())

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if type(data) is not bytes:
            # Calls may keep the views they are given (CallSink): only immutable bytes will do.
            data = bytes(data)
        self._last_read = self._loop.time()
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for stream in list(self.streams.values()):
            stream.abandon()
        self.endpoint.connection_closed(self)

    def pause_writing(self) -> None:
        """The socket buffer is over its high mark: the peer is not reading. Stop reading it
        too, so it cannot make us queue more (answers, ACKs) until it catches up."""
        self._write_paused = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._owed = 0
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self._send_ready()

    # ---- writing --------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queued and written once per loop iteration: a batch of answers costs one syscall."""
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def control(self, data: bytes) -> None:
        """A control answer the peer made us owe (ACK, refusal): counted until it drains."""
        self._owed += 1
        if self._owed > self.limits.max_owed_control_frames:
            raise ConnectionError_(
                f.ENHANCE_YOUR_CALM,
                f"more than {self.limits.max_owed_control_frames} control frames owed to a "
                "peer that does not read them",
            )
        self._out.append(data)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.closed:
            out = self._out
            self._out = []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            if self._owed and not self.transport.get_write_buffer_size():
                self._owed = 0

    def send_data(self, stream: Stream, data: bytes | memoryview) -> int:
        """Writes as many DATA frames of `data` as both windows allow; returns bytes sent.
        Nothing while the socket is over its high mark: the rest waits on the stream, counted
        in `held`, and goes out on resume_writing."""
        if self._write_paused:
            return 0
        total = len(data)
        sent = 0
        window = self.peer_window + stream.window_adj
        while sent < total:
            room = min(window, self.send_window, self.peer_max_frame, total - sent)
            if room <= 0:
                break
            chunk = data[sent : sent + room]
            self._out.append(f.frame_header(room, f.DATA, 0, stream.id))
            self._out.append(chunk if isinstance(chunk, bytes) else bytes(chunk))
            sent += room
            window -= room
            self.send_window -= room
        if sent:
            # Data written resets the client's ping strikes, as in grpc-core: a client reading a
            # long answer pings as it reads (its BDP probe), and those pings are no flood.
            self.answered = True
            stream.window_adj -= sent
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        return sent

    def hold(self, stream: Stream) -> None:
        """`stream` has output its windows do not allow yet: queue it where it belongs."""
        if self.peer_window + stream.window_adj > 0:
            self.stalled.pop(stream.id, None)
            if stream.id not in self.ready:
                self.ready[stream.id] = stream
        elif stream.id not in self.ready:
            self.stalled[stream.id] = stream

    def release(self, stream: Stream) -> None:
        self.ready.pop(stream.id, None)
        self.stalled.pop(stream.id, None)

    def _send_ready(self) -> None:
        """The connection window opened: ready streams send, in order, while it lasts. Each
        stream visited either sends or moves aside, so the work follows the bytes sent."""
        ready = self.ready
        while ready and self.send_window > 0 and not self._write_paused:
            stream_id, stream = ready.popitem(last=False)
            stream.flush()
            if stream.pending and not stream.done:
                if self.peer_window + stream.window_adj > 0:  # connection window or socket full
                    ready[stream_id] = stream
                    ready.move_to_end(stream_id, last=False)
                    return
                self.stalled[stream_id] = stream

    def _unstall(self) -> None:
        """SETTINGS raised every stream window: the stalled streams that can send now queue."""
        for stream_id, stream in list(self.stalled.items()):
            if self.peer_window + stream.window_adj > 0:
                del self.stalled[stream_id]
                self.ready[stream_id] = stream
        self._send_ready()

    # ---- shutting down ------------------------------------------------------------------------

    def goaway(self) -> None:
        """Graceful: no new streams, the ones in flight finish."""
        if self.going_away or self.closed:
            return
        self.going_away = True
        self.write(f.goaway(self.last_stream_id, f.NO_ERROR))
        if not self.streams:
            self._close_soon()

    def abort(self, code: int, message: str, linger: bool = True) -> None:
        """GOAWAY with `code`, every stream dropped. With `linger` the socket is half-closed
        and its input read and discarded for up to _LINGER seconds: closing it with unread
        input would make the kernel reset the connection, and the reset can destroy the GOAWAY
        before the peer reads it. Without (server stop), it closes once the output is out."""
        transport = self.transport
        if self.closed:
            if not linger and transport is not None:
                transport.close()  # ends a lingering close now
            return
        self._out.append(f.goaway(self.last_stream_id, code, message.encode()[:256]))
        self._flush()
        self.closed = True
        for stream in list(self.streams.values()):
            stream.abandon()
        if transport is None:
            return
        if linger and transport.can_write_eof():
            transport.write_eof()
            if self._write_paused:
                transport.resume_reading()
            self._loop.call_later(_LINGER, transport.abort)
            return
        transport.close()
        if transport.get_write_buffer_size():
            # A peer that does not read would hold the socket open for ever.
            self._loop.call_later(_LINGER, transport.abort)

    def stream_finished(self, answered: bool) -> None:
        if answered and self._reset_tokens < self._reset_burst:
            self._reset_tokens += 1  # a stream answered earns the client one more reset
        if not self.streams:
            self._idle_since = self._loop.time()
            if self.going_away:
                self._close_soon()

    def _close_soon(self) -> None:
        def close() -> None:
            self._flush()
            if self.transport is not None and not self.closed:
                self.transport.close()

        self._loop.call_soon(close)

    def _drop(self, why: str) -> None:
        """Closes at once, without waiting for output the peer will never read."""
        log.debug("HTTP/2 connection closed: %s", why)
        self.closed = True
        for stream in list(self.streams.values()):
            stream.abandon()
        if self.transport is not None:
            self.transport.abort()

    # ---- timers ---------------------------------------------------------------------------------

    def _arm(self, now: float) -> None:
        """One timer per connection, at the nearest of its deadlines. Busy connections push
        their idle deadline ahead, so at worst the timer fires once per idle_timeout_s."""
        limits = self.limits
        due: list[float] = []
        if self._preface:
            if limits.preface_timeout_s:
                due.append(self._made_at + limits.preface_timeout_s)
        else:
            if limits.idle_timeout_s:
                start = self._idle_since if not self.streams else now
                due.append(start + limits.idle_timeout_s)
            if limits.max_connection_age_s and not self.going_away:
                due.append(self._made_at + limits.max_connection_age_s)
            if self._ping_due is not None:
                due.append(self._ping_due)
            elif limits.keepalive_time_s:
                due.append(self._last_read + limits.keepalive_time_s)
        if due:
            self._timer = self._loop.call_at(max(min(due), now), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.closed:
            return
        limits = self.limits
        now = self._loop.time()
        if self._preface:
            if limits.preface_timeout_s and now >= self._made_at + limits.preface_timeout_s:
                self._drop(f"no HTTP/2 preface within {limits.preface_timeout_s:g}s")
                return
        else:
            if self._ping_due is not None and now >= self._ping_due:
                self._drop(f"keepalive PING unanswered for {limits.keepalive_timeout_s:g}s")
                return
            if (
                limits.max_connection_age_s
                and not self.going_away
                and now >= self._made_at + limits.max_connection_age_s
            ):
                log.debug("HTTP/2 connection older than %gs: GOAWAY", limits.max_connection_age_s)
                self.goaway()
            if (
                limits.idle_timeout_s
                and not self.streams
                and not self.going_away
                and now >= self._idle_since + limits.idle_timeout_s
            ):
                log.debug("HTTP/2 connection idle for %gs: GOAWAY", limits.idle_timeout_s)
                self.goaway()
                return
            if (
                limits.keepalive_time_s
                and self._ping_due is None
                and now >= self._last_read + limits.keepalive_time_s
            ):
                self.write(f.frame(f.PING, 0, 0, _KEEPALIVE))
                self._ping_due = now + (limits.keepalive_timeout_s or limits.keepalive_time_s)
        self._arm(now)

    # ---- flood accounting -----------------------------------------------------------------------

    def _rate(self, what: str, limit: int) -> None:
        """Counts one `what` frame in the current one-second window."""
        now = self._loop.time()
        window = self._rates.get(what)
        if window is None or now - window[0] >= 1.0:
            self._rates[what] = window = [now, 0.0]
        window[1] += 1
        if window[1] > limit:
            raise ConnectionError_(
                f.ENHANCE_YOUR_CALM, f"more than {limit} {what} frames in one second"
            )

    def _count_reset(self) -> None:
        """A stream reset by the client before it was answered (rapid reset, CVE-2023-44487)."""
        limits = self.limits
        now = self._loop.time()
        tokens = self._reset_tokens + (now - self._reset_at) * limits.reset_rate
        self._reset_at = now
        self._reset_tokens = min(tokens, float(limits.reset_burst)) - 1
        if self._reset_tokens < 0:
            raise ConnectionError_(
                f.ENHANCE_YOUR_CALM, "streams reset faster than they are answered"
            )

    def _ping_received(self) -> None:
        """grpc-core's ping policy: a PING too soon after the last one, with no response sent
        in between, is a strike; past max_ping_strikes the connection goes."""
        limits = self.limits
        self._rate("PING", limits.max_pings_per_second)
        now = self._loop.time()
        if self.answered:
            self.answered = False
            self._ping_strikes = 0
            self._last_ping = -1e18
        interval = (
            limits.min_ping_interval_s if self.streams else max(limits.min_ping_interval_s, 7200.0)
        )
        if now < self._last_ping + interval:
            self._ping_strikes += 1
            if self._ping_strikes > limits.max_ping_strikes:
                raise ConnectionError_(f.ENHANCE_YOUR_CALM, "too_many_pings")
        self._last_ping = now

    # ---- reading --------------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        # Frames are handled where they lie in `data`: only a frame cut by the read's end is
        # kept (`_buf`), and completed from the next read with just the bytes it lacks. A large
        # DATA frame is not kept whole: its payload goes to the call in parts, as it arrives
        # (`_next_part`). So a read's bytes are copied once at most, however frames fall.
        if self._preface:
            rest = self._read_preface(data)
            if rest is None:
                return
            data = rest
        view = memoryview(data)
        pos, end = 0, len(data)
        try:
            if self._part_left:
                pos = self._next_part(view)
            elif self._buf:
                pos = self._complete(view)
            if pos < end and not self._part_left and not self._buf:
                pos = self._frames(data, view, pos)
                if pos < end and not self._part_left:
                    self._buf = bytearray(view[pos:])
        finally:
            if self._uncredited >= _CONNECTION_CREDIT_AT:
                self._out.append(f.window_update(0, self._uncredited))
                self._recv_window += self._uncredited
                self._uncredited = 0

    def _read_preface(self, data: bytes) -> bytes | None:
        """What follows the client's connection preface in `data`, or None while the preface
        is incomplete (or was not HTTP/2's)."""
        got = bytes(self._buf) + data if self._buf else data
        if len(got) < len(f.PREFACE):
            if not f.PREFACE.startswith(got):
                self._not_http2()
            else:
                self._buf = bytearray(got)
            return None
        if got[: len(f.PREFACE)] != f.PREFACE:
            self._not_http2()
            return None
        self._buf = bytearray()
        self._preface = False
        # Our SETTINGS go first, once the client proved to speak HTTP/2.
        self._out.append(_server_settings(self.limits))
        if self._timer is not None:
            self._timer.cancel()
        self._idle_since = self._last_read
        self._arm(self._last_read)
        return got[len(f.PREFACE) :]

    def _frames(self, src: bytes | bytearray, view: memoryview, pos: int) -> int:
        """Handles the whole frames of `src` from `pos` on, and starts a large DATA frame cut
        by its end in parts; returns where the rest (a cut frame, to be kept) begins."""
        end = len(src)
        read_header = f.read_header
        while end - pos >= 9:
            # (_header, inlined: this runs for every frame)
            high, low, kind, flags, stream_id = read_header(src, pos)
            length = (high << 16) | low
            if length > MAX_RECV_FRAME:
                raise _too_large(length)
            stream_id &= 0x7FFF_FFFF  # the reserved bit is ignored on receipt (RFC 9113 4.1)
            if end - pos - 9 < length:
                if _in_parts(kind, flags, length):
                    self._start_parts(flags, stream_id, length)
                    return pos + 9 + self._next_part(view[pos + 9 :])
                break
            payload = view[pos + 9 : pos + 9 + length]
            pos += 9 + length
            try:
                self._frame(kind, flags, stream_id, payload)
            except rules.StreamError as exc:
                self._stream_error(exc)
        return pos

    def _complete(self, view: memoryview) -> int:
        """Takes from `view` (a new read) the bytes the kept frame lacks and handles it once
        whole, or goes on with it in parts (a large DATA frame); returns the bytes taken."""
        buf = self._buf
        pos = 0
        if len(buf) < 9:
            pos = min(9 - len(buf), len(view))
            buf += view[:pos]
            if len(buf) < 9:
                return pos
        kind, flags, stream_id, length = _header(buf, 0)
        missing = 9 + length - len(buf)
        if missing > len(view) - pos and _in_parts(kind, flags, length):
            self._buf = bytearray()
            self._start_parts(flags, stream_id, length)
            self._next_part(memoryview(buf)[9:])
            return pos + self._next_part(view[pos:])
        take = min(missing, len(view) - pos)
        buf += view[pos : pos + take]
        if take == missing:
            self._buf = bytearray()  # (`buf` is not resized again: views of it may live on)
            self._frames(buf, memoryview(buf), 0)
        return pos + take

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
        self.control(f.rst_stream(stream_id, exc.code))
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
        if kind == f.DATA or kind == f.HEADERS:  # the hot path: one check, the rest is below
            if stream_id == 0:
                rules.check_frame(kind, flags, stream_id, len(payload))
            if kind == f.HEADERS:
                self._headers(flags, stream_id, payload)
                return
            if not payload and not flags & f.END_STREAM:
                self._rate("empty", self.limits.max_empty_frames_per_second)
            self._data(flags, stream_id, payload)
            return
        rules.check_frame(kind, flags, stream_id, len(payload))
        if kind == f.CONTINUATION:
            self._continue(flags, stream_id, payload)
        elif kind == f.WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == f.PING:
            if flags & f.ACK:
                if payload == _KEEPALIVE:
                    self._ping_due = None
            else:
                self._ping_received()
                self.control(f.frame(f.PING, f.ACK, 0, bytes(payload)))
        elif kind == f.SETTINGS:
            if not flags & f.ACK:
                self._rate("SETTINGS", self.limits.max_settings_per_second)
                self._settings(payload)
        elif kind == f.RST_STREAM:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.remote_closed = True
                stream.abandon(rules.RESET_BY_PEER)
                self._count_reset()
            elif stream_id > self.last_stream_id:
                raise ConnectionError_(f.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        elif kind == f.GOAWAY:
            pass  # the client opens no more streams; the ones in flight still get answers
        elif kind == f.PUSH_PROMISE:
            raise ConnectionError_(f.PROTOCOL_ERROR, "clients cannot push")
        else:
            # Priorities and unknown frame types are ignored (RFC 9113 5.3.2, 5.5), but
            # counted: they cost work and carry nothing.
            self._rate("empty", self.limits.max_empty_frames_per_second)
            if kind == f.PRIORITY:
                rules.check_dependency(stream_id, rules.dependency(payload))

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
        if stream is None or stream.remote_closed or n > stream.recv_window:
            self._refuse_data(stream_id, n)
            return  # a stream we reset: the client sent these before it knew
        stream.recv_window -= n
        if n != len(payload):
            stream.credit(n - len(payload))  # padding is flow-controlled but never consumed
        end = bool(flags & f.END_STREAM)
        if end:
            stream.remote_closed = True
        assert stream.call is not None
        stream.call.data(payload, end)

    def _refuse_data(self, stream_id: int, n: int) -> None:
        """An `n`-byte DATA frame its stream cannot take: raises what RFC 9113 says of it, or
        returns when it is to be dropped (a stream we reset)."""
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream_id:
                raise ConnectionError_(f.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            how = self.closed_streams.get(stream_id)
            rules.frame_on_closed(f.DATA, stream_id, how, self.last_stream_id)
            return
        if stream.remote_closed:
            raise rules.half_closed(f.DATA, stream_id)
        raise rules.over_window(stream_id, n, stream.recv_window)

    def _start_parts(self, flags: int, stream_id: int, length: int) -> None:
        """A large DATA frame whose payload is still arriving: checked and counted whole now,
        as `_frame` and `_data` would; `_next_part` passes its payload on."""
        if self._continuation is not None:
            raise ConnectionError_(f.PROTOCOL_ERROR, "DATA where CONTINUATION was expected")
        if stream_id == 0:
            rules.check_frame(f.DATA, flags, stream_id, length)
        if length > self._recv_window:
            raise rules.over_window(0, length, self._recv_window)
        self._recv_window -= length
        self._part, self._part_left, self._part_end = None, length, bool(flags & f.END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed or length > stream.recv_window:
            try:  # the rest of the frame is dropped as it comes
                self._refuse_data(stream_id, length)
            except rules.StreamError as exc:
                self._stream_error(exc)
            return
        stream.recv_window -= length
        self._part = stream

    def _next_part(self, view: memoryview) -> int:
        """Passes the start of `view`, up to what the frame in parts still has to come, to its
        call; returns the bytes taken. END_STREAM takes effect with the frame's last byte."""
        n = min(self._part_left, len(view))
        self._part_left -= n
        self._uncredited += n
        stream = self._part
        if stream is not None:
            last = not self._part_left
            end = last and self._part_end
            if last:
                self._part = None
                if end:
                    stream.remote_closed = True
            if not stream.done and (n or end):
                assert stream.call is not None
                try:
                    stream.call.data(view[:n], end)
                except rules.StreamError as exc:
                    self._stream_error(exc)
        return n

    def _headers(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if flags & f.PADDED:
            payload = rules.unpad(payload)
        depends_on = -1
        if flags & f.PRIORITY_FLAG:
            depends_on = rules.dependency(payload)
            payload = payload[5:]
        self._check_block_size(len(payload))
        if flags & f.END_HEADERS:
            self._open(stream_id, flags, depends_on, payload)
        else:
            if not payload:
                self._rate("empty", self.limits.max_empty_frames_per_second)
            self._continuation = (stream_id, flags, depends_on, bytearray(payload))
            self._continuations = 0

    def _continue(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if self._continuation is None or self._continuation[0] != stream_id:
            raise ConnectionError_(
                f.PROTOCOL_ERROR, f"CONTINUATION on stream {stream_id} not after its HEADERS"
            )
        self._continuations += 1
        if self._continuations > self.limits.max_continuations:
            raise ConnectionError_(
                f.ENHANCE_YOUR_CALM,
                f"header block in more than {self.limits.max_continuations} CONTINUATION frames",
            )
        if not payload and not flags & f.END_HEADERS:
            self._rate("empty", self.limits.max_empty_frames_per_second)
        block = self._continuation[3]
        self._check_block_size(len(block) + len(payload))
        block += payload
        if flags & f.END_HEADERS:
            _, first_flags, depends_on, _ = self._continuation
            self._continuation = None
            self._open(stream_id, first_flags, depends_on, memoryview(block))

    def _check_block_size(self, size: int) -> None:
        """A header block longer than the advertised header list limit is refused before it
        is decoded or buffered further: its encoded size bounds the decoding work."""
        limit = self.limits.max_header_list_bytes
        if size > limit:
            raise ConnectionError_(
                f.ENHANCE_YOUR_CALM,
                f"header block of {size} bytes or more, over SETTINGS_MAX_HEADER_LIST_SIZE {limit}",
            )

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
        if depends_on == stream_id:
            rules.check_dependency(stream_id, depends_on)
        if self.going_away or len(self.streams) >= self._max_streams or self.held > self._max_held:
            self.control(f.rst_stream(stream_id, f.REFUSED_STREAM))
            self.closed_streams.add(stream_id, rules.RESET_BY_US)
            return
        stream = Stream(self, stream_id)
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
        """Decoding costs at most what the block's size allows: its length is bounded before
        (_check_block_size), table size update storms are refused, and the decoded list stops
        at the advertised limit."""
        key = bytes(block)
        _check_table_updates(key)
        try:
            fields = self._decoder.decode(key, raw=True)
        except hpack.OversizedHeaderListError as exc:
            raise ConnectionError_(f.ENHANCE_YOUR_CALM, f"header list too large: {exc}") from exc
        except hpack.HPACKError as exc:
            raise ConnectionError_(f.COMPRESSION_ERROR, f"bad header block: {exc}") from exc
        return [(bytes(name), bytes(value)) for name, value in fields]

    def _window_update(self, stream_id: int, payload: memoryview) -> None:
        increment = rules.window_increment(stream_id, payload)
        if stream_id == 0:
            self.send_window = rules.grow_send_window(self.send_window, increment, 0)
            self._send_ready()
        else:
            target = self.streams.get(stream_id)
            if target is None:
                if stream_id > self.last_stream_id:
                    raise ConnectionError_(
                        f.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}"
                    )
            else:
                target.send_window = rules.grow_send_window(
                    target.send_window, increment, stream_id
                )
                if target.window_adj > self._adj_high:
                    self._adj_high = target.window_adj
                if target.pending and target.id not in self.ready:
                    self.stalled.pop(stream_id, None)
                    target.flush()
                    if target.pending and not target.done:
                        self.hold(target)

    def _settings(self, payload: memoryview) -> None:
        if len(payload) // 6 > self.limits.max_settings_entries:
            raise ConnectionError_(
                f.ENHANCE_YOUR_CALM,
                f"SETTINGS frame with more than {self.limits.max_settings_entries} entries",
            )
        values = f.parse_settings(payload)
        rules.check_settings(values)
        raised = False
        for key, value in values:
            if key == f.INITIAL_WINDOW_SIZE:
                # Applies to every open stream's window, by the difference (RFC 9113 6.9.2):
                # Stream.window_adj is relative to peer_window, so this moves them all at once.
                if value + self._adj_high > f.MAX_WINDOW:
                    # Only then can a stream window overflow: look at each.
                    for stream in self.streams.values():
                        rules.check_initial_window_change(value + stream.window_adj, stream.id)
                raised = raised or value > self.peer_window
                self.peer_window = value
            elif key == f.MAX_FRAME_SIZE:
                self.peer_max_frame = value
        self.control(f.frame(f.SETTINGS, f.ACK, 0))
        if raised and self.stalled:
            self._unstall()


def _header(src: bytes | bytearray, pos: int) -> tuple[int, int, int, int]:
    """(type, flags, stream id, payload length) of the frame header at `pos`; a length over
    what we advertised is refused before any of the payload is kept."""
    high, low, kind, flags, stream_id = f.read_header(src, pos)
    length = (high << 16) | low
    if length > MAX_RECV_FRAME:
        raise _too_large(length)
    # The reserved bit is ignored on receipt (RFC 9113 4.1).
    return kind, flags, stream_id & 0x7FFF_FFFF, length


def _too_large(length: int) -> ConnectionError_:
    return ConnectionError_(f.FRAME_SIZE_ERROR, f"frame of {length} bytes over {MAX_RECV_FRAME}")


def _in_parts(kind: int, flags: int, length: int) -> bool:
    """Whether a frame cut by a read's end goes on in parts: large DATA frames without padding
    (whose pad length tells only at the frame's end where its data stops)."""
    return kind == f.DATA and length >= _PARTS_FROM and not flags & f.PADDED


def _check_table_updates(block: bytes) -> None:
    """HPACK bomb guard: a block may open with at most two dynamic table size updates (RFC 7541
    4.2); thousands of them cost the decoder seconds while meaning nothing."""
    pos = 0
    count = 0
    while pos < len(block) and block[pos] & 0xE0 == 0x20:
        count += 1
        if count > _MAX_TABLE_UPDATES:
            raise ConnectionError_(
                f.COMPRESSION_ERROR,
                f"header block opens with more than {_MAX_TABLE_UPDATES} table size updates",
            )
        pos += 1
        if block[pos - 1] & 0x1F == 0x1F:  # multi-byte integer: skip its continuation bytes
            while pos < len(block) and block[pos] & 0x80:
                pos += 1
            pos += 1
