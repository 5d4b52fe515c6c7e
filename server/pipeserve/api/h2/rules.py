"""RFC 9113 rules the server checks on what it receives, as small pure functions.

The connection calls these and turns what they raise into the answer the RFC names:

    ProtocolError            an error code (frames.PROTOCOL_ERROR, ...) and a message
     +- ConnectionError_     the whole connection is wrong: GOAWAY with the code, then close
     +- StreamError          one stream is wrong: RST_STREAM with the code; the rest goes on

Nothing here keeps connection state except `ClosedStreams` (which recent streams ended how), so
each rule can be unit-tested on its own. Checks run once per frame (or once per distinct header
block: the connection caches validated blocks), never per byte of a message.
"""

from __future__ import annotations

import re

from pipeserve.api.h2 import frames as f


class ProtocolError(Exception):
    """A rule of RFC 9113 broken by the peer; `code` is the RFC error code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConnectionError_(ProtocolError):
    """A connection error (RFC 9113 5.4.1): answered with GOAWAY and the connection closed."""


class StreamError(ProtocolError):
    """A stream error (RFC 9113 5.4.2): answered with RST_STREAM on `stream_id` only."""

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        super().__init__(code, message)
        self.stream_id = stream_id


# ---- frames (RFC 9113 section 6) -----------------------------------------------------------

# Frames that belong to a stream, and frames that belong to the connection (stream 0).
_STREAM_FRAMES = frozenset({f.DATA, f.HEADERS, f.PRIORITY, f.RST_STREAM, f.CONTINUATION})
_CONNECTION_FRAMES = frozenset({f.SETTINGS, f.PING, f.GOAWAY})
_NAMES = {
    f.DATA: "DATA",
    f.HEADERS: "HEADERS",
    f.PRIORITY: "PRIORITY",
    f.RST_STREAM: "RST_STREAM",
    f.SETTINGS: "SETTINGS",
    f.PUSH_PROMISE: "PUSH_PROMISE",
    f.PING: "PING",
    f.GOAWAY: "GOAWAY",
    f.WINDOW_UPDATE: "WINDOW_UPDATE",
    f.CONTINUATION: "CONTINUATION",
}


def frame_name(kind: int) -> str:
    return _NAMES.get(kind, f"frame type {kind:#x}")


# Frames whose payload has one fixed size. PRIORITY alone is a stream error (6.3).
_FIXED_SIZE = {f.PING: 8, f.WINDOW_UPDATE: 4, f.RST_STREAM: 4, f.PRIORITY: 5}


def check_frame(kind: int, flags: int, stream_id: int, length: int) -> None:
    """The stream-id and size rules every frame of `kind` obeys, before its payload is looked
    at (RFC 9113 6.1-6.10). Unknown frame types pass: they are ignored (5.5)."""
    if stream_id == 0:
        if kind in _STREAM_FRAMES:
            raise ConnectionError_(f.PROTOCOL_ERROR, f"{frame_name(kind)} on stream 0")
    elif kind in _CONNECTION_FRAMES:
        raise ConnectionError_(
            f.PROTOCOL_ERROR, f"{frame_name(kind)} on stream {stream_id} (must be stream 0)"
        )
    size = _FIXED_SIZE.get(kind)
    if size is not None and length != size:
        message = f"{frame_name(kind)} payload of {length} bytes, not {size}"
        if kind == f.PRIORITY:
            raise StreamError(stream_id, f.FRAME_SIZE_ERROR, message)
        raise ConnectionError_(f.FRAME_SIZE_ERROR, message)
    if kind == f.SETTINGS:
        if flags & f.ACK and length:
            raise ConnectionError_(f.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
        if length % 6:
            raise ConnectionError_(
                f.FRAME_SIZE_ERROR, f"SETTINGS payload of {length} bytes, not a multiple of 6"
            )
    elif kind == f.GOAWAY and length < 8:
        raise ConnectionError_(f.FRAME_SIZE_ERROR, f"GOAWAY payload of {length} bytes, under 8")


def unpad(payload: memoryview) -> memoryview:
    """The payload of a PADDED frame without its pad length byte and padding (RFC 9113 6.1)."""
    if not payload:
        raise ConnectionError_(f.PROTOCOL_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ConnectionError_(
            f.PROTOCOL_ERROR, f"padding of {pad} bytes in a {len(payload)}-byte payload"
        )
    return payload[1 : len(payload) - pad]


def dependency(payload: memoryview) -> int:
    """The stream a PRIORITY frame or a HEADERS frame with the PRIORITY flag depends on."""
    if len(payload) < 5:
        raise ConnectionError_(f.FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
    return f.u32(payload)


def check_dependency(stream_id: int, depends_on: int) -> None:
    """A stream cannot depend on itself (RFC 9113 5.3.1)."""
    if depends_on == stream_id:
        raise StreamError(stream_id, f.PROTOCOL_ERROR, f"stream {stream_id} depends on itself")


def window_increment(stream_id: int, payload: memoryview) -> int:
    """A WINDOW_UPDATE's increment; 0 is a PROTOCOL_ERROR of the stream or connection it names
    (RFC 9113 6.9)."""
    increment = f.u32(payload)
    if increment == 0:
        if stream_id == 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, "connection WINDOW_UPDATE of 0")
        raise StreamError(stream_id, f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
    return increment


MAX_FRAME_LIMIT = 16_777_215  # 2^24-1, the largest SETTINGS_MAX_FRAME_SIZE


def check_settings(values: list[tuple[int, int]]) -> None:
    """The values RFC 9113 6.5.2 bounds; unknown settings are ignored."""
    for key, value in values:
        if key == f.ENABLE_PUSH and value > 1:
            raise ConnectionError_(f.PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH of {value}, not 0/1")
        if key == f.INITIAL_WINDOW_SIZE and value > f.MAX_WINDOW:
            raise ConnectionError_(
                f.FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE of {value} over 2^31-1"
            )
        if key == f.MAX_FRAME_SIZE and not f.DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
            raise ConnectionError_(
                f.PROTOCOL_ERROR,
                f"SETTINGS_MAX_FRAME_SIZE of {value} outside "
                f"{f.DEFAULT_MAX_FRAME}..{MAX_FRAME_LIMIT}",
            )


# ---- flow control (RFC 9113 6.9) ----------------------------------------------------------


def over_window(stream_id: int, n: int, available: int) -> ProtocolError:
    """DATA of `n` bytes (padding included) when the window this side advertised has only
    `available` left: FLOW_CONTROL_ERROR of the stream, or of the connection for stream 0.
    Callers compare first (`n > available`) so the hot path costs one comparison."""
    message = f"DATA of {n} bytes over the {available}-byte window advertised"
    if stream_id == 0:
        return ConnectionError_(f.FLOW_CONTROL_ERROR, "connection " + message)
    return StreamError(stream_id, f.FLOW_CONTROL_ERROR, message)


def grow_send_window(window: int, increment: int, stream_id: int) -> int:
    """A send window after a WINDOW_UPDATE; past 2^31-1 is a FLOW_CONTROL_ERROR of the stream
    or connection (RFC 9113 6.9.1)."""
    window += increment
    if window > f.MAX_WINDOW:
        if stream_id == 0:
            raise ConnectionError_(f.FLOW_CONTROL_ERROR, "connection send window over 2^31-1")
        raise StreamError(stream_id, f.FLOW_CONTROL_ERROR, "stream send window over 2^31-1")
    return window


def check_initial_window_change(window: int, stream_id: int) -> None:
    """A stream's send window after a SETTINGS_INITIAL_WINDOW_SIZE change: past 2^31-1 is a
    connection error FLOW_CONTROL_ERROR (RFC 9113 6.9.2)."""
    if window > f.MAX_WINDOW:
        raise ConnectionError_(
            f.FLOW_CONTROL_ERROR, f"new initial window takes stream {stream_id} over 2^31-1"
        )


# ---- stream states (RFC 9113 5.1) ------------------------------------------------------------

# How a stream that is no longer open ended, for the frames that still arrive on it.
RESET_BY_US = 1  # we sent RST_STREAM: frames already in flight are ignored (5.4.2)
RESET_BY_PEER = 2  # the peer sent RST_STREAM: more DATA/HEADERS is a stream error STREAM_CLOSED
ENDED = 3  # END_STREAM both ways: more DATA/HEADERS is a connection error STREAM_CLOSED

CLOSED_REMEMBERED = 4096


class ClosedStreams:
    """How the most recent closed streams ended: at least the last `CLOSED_REMEMBERED` resets
    and, apart (so a run of ordinary calls cannot push a recent reset out), at least the last
    `CLOSED_REMEMBERED` streams that ended normally; never more than twice that. The bound keeps
    a peer from growing this; a stream older than a few thousand closures is long past the
    round trip in which the peer could still have had frames in flight for it.

    Two generations of each: when the newest holds `CLOSED_REMEMBERED`, it becomes the old one
    and the old one is dropped. One store per closed stream on the hot path, nothing copied."""

    __slots__ = ("_resets", "_old_resets", "_ended", "_old_ended")

    def __init__(self) -> None:
        self._resets: dict[int, int] = {}
        self._old_resets: dict[int, int] = {}
        self._ended: set[int] = set()
        self._old_ended: set[int] = set()

    def add(self, stream_id: int, how: int) -> None:
        if how == ENDED:
            ended = self._ended
            ended.add(stream_id)
            if len(ended) >= CLOSED_REMEMBERED:
                self._old_ended, self._ended = ended, set()
        else:
            resets = self._resets
            resets[stream_id] = how
            if len(resets) >= CLOSED_REMEMBERED:
                self._old_resets, self._resets = resets, {}

    def get(self, stream_id: int) -> int | None:
        how = self._resets.get(stream_id)
        if how is None:
            how = self._old_resets.get(stream_id)
        if how is None and (stream_id in self._ended or stream_id in self._old_ended):
            how = ENDED
        return how

    def __len__(self) -> int:
        return len(self._resets) + len(self._old_resets) + len(self._ended) + len(self._old_ended)


def frame_on_closed(kind: int, stream_id: int, how: int | None, last_stream_id: int) -> None:
    """DATA or HEADERS on a stream at or below the last one opened that is no longer open:
    returns when it is to be dropped (we reset it: the peer could not know yet), otherwise
    raises the error RFC 9113 5.1 names for how it closed."""
    name = frame_name(kind)
    if how == RESET_BY_US:
        return
    if how == RESET_BY_PEER:
        raise StreamError(stream_id, f.STREAM_CLOSED, f"{name} after RST_STREAM on {stream_id}")
    if how == ENDED or kind != f.HEADERS:
        raise ConnectionError_(f.STREAM_CLOSED, f"{name} on closed stream {stream_id}")
    raise ConnectionError_(
        f.PROTOCOL_ERROR,
        f"HEADERS opening stream {stream_id}, not above the last stream opened ({last_stream_id})",
    )


def half_closed(kind: int, stream_id: int) -> StreamError:
    """DATA or HEADERS after the peer's END_STREAM (half-closed remote, RFC 9113 5.1)."""
    return StreamError(
        stream_id, f.STREAM_CLOSED, f"{frame_name(kind)} after END_STREAM on stream {stream_id}"
    )


# ---- header fields (RFC 9113 8.2 and 8.3) ----------------------------------------------------

# 8.2.1: a name is lowercase visible ASCII without ':' (pseudo-headers begin with one ':').
_BAD_NAME = re.compile(rb"[^\x21-\x39\x3b-\x40\x5b-\x7e]")
# 8.2.1: a value has no NUL, CR or LF, and no leading or trailing space or tab.
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
# 8.2.2
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})


def request_fields(stream_id: int, fields: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The fields of a request header block as a dict, once each one passed the rules of
    RFC 9113 8.2 and 8.3; a malformed request is a stream error PROTOCOL_ERROR (8.1.1).
    A later regular field of the same name wins, as before (gRPC metadata is read that way)."""
    headers: dict[bytes, bytes] = {}
    regular = False
    for name, value in fields:
        if name[:1] == b":":
            if regular:
                raise _malformed(stream_id, f"pseudo-header {_show(name)} after a regular field")
            if name not in _REQUEST_PSEUDO:
                raise _malformed(stream_id, f"unknown pseudo-header {_show(name)} in a request")
            if name in headers:
                raise _malformed(stream_id, f"duplicate pseudo-header {_show(name)}")
            _check_value(stream_id, name, value)
        else:
            regular = True
            _check_field(stream_id, name, value)
        headers[name] = value
    for required in (b":method", b":scheme", b":path"):
        if required not in headers:
            raise _malformed(stream_id, f"request without {required.decode()}")
    if not headers[b":path"]:
        raise _malformed(stream_id, "empty :path")
    return headers


def trailer_fields(stream_id: int, fields: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """A trailer block: the same field rules, and no pseudo-headers at all (8.1)."""
    headers: dict[bytes, bytes] = {}
    for name, value in fields:
        if name[:1] == b":":
            raise _malformed(stream_id, f"pseudo-header {_show(name)} in trailers")
        _check_field(stream_id, name, value)
        headers[name] = value
    return headers


def _check_field(stream_id: int, name: bytes, value: bytes) -> None:
    if not name or _BAD_NAME.search(name):
        raise _malformed(stream_id, f"field name {_show(name)} is not lowercase visible ASCII")
    _check_value(stream_id, name, value)
    if name in _CONNECTION_SPECIFIC:
        raise _malformed(stream_id, f"connection-specific field {_show(name)}")
    if name == b"te" and value != b"trailers":
        raise _malformed(stream_id, f"te: {_show(value)} (only 'trailers' is allowed)")


def _check_value(stream_id: int, name: bytes, value: bytes) -> None:
    if _BAD_VALUE.search(value):
        raise _malformed(
            stream_id,
            f"value of {_show(name)} has NUL, CR, LF or leading/trailing whitespace",
        )


def _malformed(stream_id: int, message: str) -> StreamError:
    return StreamError(stream_id, f.PROTOCOL_ERROR, "malformed request: " + message)


def _show(raw: bytes) -> str:
    return repr(raw.decode("latin-1"))[:80]
