"""HTTP/2 wire pieces (RFC 9113) and the gRPC-over-HTTP/2 header encodings the server needs.

Only what a gRPC server sends is encoded here: frames, SETTINGS, and header blocks made of HPACK
literals that never touch the peer's dynamic table (so no encoder state has to be kept in step
with the client). Decoding the client's header blocks needs full HPACK and lives in the
connection, which uses the `hpack` package for it.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# SETTINGS identifiers.
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6

# Error codes.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1

_HEADER = struct.Struct(">BHBBI")
# A frame header read in one call (length's high byte, its low 16 bits, type, flags, stream
# id with its reserved bit): the receive loop runs it for every frame.
read_header = _HEADER.unpack_from
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_GOAWAY = struct.Struct(">II")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEADER.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id)


def settings(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in values.items()))


def parse_settings(payload: bytes | memoryview) -> list[tuple[int, int]]:
    return [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, code) + debug)


def u32(payload: bytes | memoryview) -> int:
    return int(_U32.unpack_from(payload)[0]) & 0x7FFF_FFFF


# ---- HPACK literals (RFC 7541 6.2.2: literal header field without indexing, new name) --------


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """One header field, raw (not Huffman) strings, never added to the peer's table."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


STATUS_200 = b"\x88"  # static table entry 8
RESPONSE_HEADERS = STATUS_200 + literal(b"content-type", b"application/grpc")
# gRPC over HTTP/2: a request that is not gRPC gets 415, so no HTTP client reads it as a 200.
# (`:status` is static entry 8's name: a literal value with an indexed name, RFC 7541 6.2.2.)
UNSUPPORTED_MEDIA_TYPE = b"\x08\x03415" + literal(b"content-type", b"application/grpc")


def percent_encode(text: str) -> bytes:
    """grpc-message encoding: UTF-8, then every byte outside printable ASCII and '%' as %XX."""
    raw = text.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


# Long messages are cut so a trailer block always fits one frame and the peer's header limits.
MAX_STATUS_MESSAGE = 4096


def trailers(code: int, message: str = "") -> bytes:
    block = literal(b"grpc-status", str(code).encode())
    if message:
        encoded = percent_encode(message)
        if len(encoded) > MAX_STATUS_MESSAGE:
            encoded = encoded[: MAX_STATUS_MESSAGE - 3] + b"..."
        block += literal(b"grpc-message", encoded)
    return block


TRAILERS_OK = trailers(0)

# grpc-timeout units (gRPC over HTTP/2 spec) in seconds.
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float | None:
    """Seconds from a grpc-timeout header ("100m", "5S"); None when it is malformed."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit
