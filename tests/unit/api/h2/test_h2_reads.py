"""How reads fall does not change what a connection does: the same client bytes, cut anywhere
(a frame's header, its payload, a padded frame, a frame larger than a read), give every call the
same bytes and its end with the last of them. Large DATA frames reach their call in parts as
they arrive (never kept whole first), and are still checked, counted and refused as a whole.

These drive `Connection` directly, bytes in and bytes out, with calls that record what they
are given: no sockets, so every cut is exact."""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Iterator
from typing import Any

import hpack
import pytest

from pipeserve.api.h2 import connection
from pipeserve.api.h2 import frames as f
from pipeserve.api.h2.connection import MAX_RECV_FRAME, RECV_STREAM_WINDOW, Connection, Stream
from pipeserve.api.h2.server import H2Server
from tests.unit.h2_driver import EchoService, run

HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/test.Echo/Echo"),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


class Sink:
    """A call that keeps what it is given, as given (CallSink: the views stay valid), and
    checks the end comes once, last."""

    def __init__(self) -> None:
        self.views: list[memoryview] = []
        self.ended = False
        self.resets = 0

    @property
    def got(self) -> bytes:
        return b"".join(self.views)

    def data(self, payload: memoryview, end: bool) -> None:
        assert not self.ended, "data after the end"
        self.views.append(payload)
        self.ended = end

    def reset(self) -> None:
        self.resets += 1


class Recorder:
    """The endpoint: one Sink per stream opened."""

    def __init__(self) -> None:
        self.sinks: dict[int, Sink] = {}

    def open_call(self, stream: Stream, headers: dict[bytes, bytes]) -> Sink:
        sink = self.sinks[stream.id] = Sink()
        return sink

    def connection_closed(self, connection: Connection) -> None:
        pass


class Wire:
    """The transport: keeps what the server writes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def frames(self) -> Iterator[tuple[int, int, int, bytes]]:
        out, at = bytes(self.out), 0
        while at < len(out):
            length = int.from_bytes(out[at : at + 3], "big")
            kind, flags, stream_id = (
                out[at + 3],
                out[at + 4],
                struct.unpack(">I", out[at + 5 : at + 9])[0],
            )
            yield kind, flags, stream_id, out[at + 9 : at + 9 + length]
            at += 9 + length


def _pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Client:
    def __init__(self) -> None:
        self.encoder = hpack.Encoder()
        self.wire = bytearray(f.PREFACE + f.settings({}))
        self.sent: dict[int, bytes] = {}

    def open(self, stream_id: int) -> None:
        self.wire += f.frame(f.HEADERS, f.END_HEADERS, stream_id, self.encoder.encode(HEADERS))

    def data(self, stream_id: int, payload: bytes, end: bool, pad: int = 0) -> None:
        flags = f.END_STREAM if end else 0
        if pad:
            self.wire += f.frame(
                f.DATA, flags | f.PADDED, stream_id, bytes((pad,)) + payload + bytes(pad)
            )
        else:
            self.wire += f.frame(f.DATA, flags, stream_id, payload)
        self.sent[stream_id] = self.sent.get(stream_id, b"") + payload

    def call(self, stream_id: int, *sizes: int, pad: int = 0) -> None:
        self.open(stream_id)
        for i, size in enumerate(sizes):
            self.data(stream_id, _pattern(size, stream_id * 100 + i), i == len(sizes) - 1, pad)


def serve(reads: list[bytes]) -> tuple[Recorder, Wire]:
    """A connection fed `reads` one `data_received` each; its endpoint and transport."""

    async def main() -> tuple[Recorder, Wire]:
        endpoint, wire = Recorder(), Wire()
        conn = Connection(endpoint)  # type: ignore[arg-type]
        conn.connection_made(wire)  # type: ignore[arg-type]
        for data in reads:
            conn.data_received(data)
        await asyncio.sleep(0)  # queued writes go out
        return endpoint, wire

    return asyncio.run(main())


def cut(data: bytes, at: list[int]) -> list[bytes]:
    edges = [0, *sorted(set(at)), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


def _mixed() -> Client:
    client = Client()
    client.call(1, 10)  # small, one frame
    client.call(3, 100_000)  # large: in parts whenever a read cuts it
    client.wire += f.frame(f.PING, 0, 0, b"12345678")
    client.call(5, 70_000, 200_000, 3)  # large frames and a small one, one message
    client.call(7, 80_000, pad=7)  # large but padded: kept until whole
    client.call(9, MAX_RECV_FRAME)  # the largest frame allowed
    client.call(11, 0)  # an empty frame that ends the stream
    return client


def _check(client: Client, endpoint: Recorder, wire: Wire) -> None:
    _check_calls(client, endpoint)
    assert not any(s.resets for s in endpoint.sinks.values())
    kinds = [(kind, flags, payload) for kind, flags, _, payload in wire.frames()]
    assert (f.PING, f.ACK, b"12345678") in kinds
    assert not [k for k in kinds if k[0] in (f.GOAWAY, f.RST_STREAM)], kinds


@pytest.mark.parametrize("size", [9, 1000, 16_384, 65_539, 256 << 10, 10 << 20])
def test_reads_of_one_size_give_the_same_calls(size: int) -> None:
    client = _mixed()
    data = bytes(client.wire)
    endpoint, wire = serve([data[i : i + size] for i in range(0, len(data), size)])
    _check(client, endpoint, wire)


@pytest.mark.parametrize("seed", range(8))
def test_reads_cut_anywhere_give_the_same_calls(seed: int) -> None:
    client = _mixed()
    data = bytes(client.wire)
    rng = random.Random(seed)
    endpoint, wire = serve(
        cut(data, [rng.randrange(len(data)) for _ in range(rng.choice([3, 40, 400]))])
    )
    _check(client, endpoint, wire)


def test_a_read_cut_at_every_byte_of_small_frames() -> None:
    client = Client()
    client.call(1, 30)
    client.call(3, 5, 6, pad=2)
    data = bytes(client.wire)
    for at in range(1, len(data)):
        endpoint, wire = serve([data[:at], data[at:]])
        _check_calls(client, endpoint)
    endpoint, wire = serve([data[i : i + 1] for i in range(len(data))])
    _check_calls(client, endpoint)


def _check_calls(client: Client, endpoint: Recorder) -> None:
    assert {sid: bytes(s.got) for sid, s in endpoint.sinks.items()} == client.sent
    assert all(s.ended for s in endpoint.sinks.values())


@pytest.mark.parametrize("header_cut", [False, True], ids=["whole-header", "header-cut"])
def test_a_large_frame_reaches_its_call_as_it_arrives(header_cut: bool) -> None:
    """Half a 600 KB frame is passed on at once, not kept until the rest comes, also when the
    read before ended inside the frame's header."""
    client = Client()
    client.call(1, 600_000)
    data = bytes(client.wire)
    start = len(data) - 600_000 - 9  # the DATA frame's header
    half = len(data) - 300_000
    reads = [data[: start + 4], data[start + 4 : half]] if header_cut else [data[:half]]

    async def main() -> None:
        endpoint, wire = Recorder(), Wire()
        conn = Connection(endpoint)  # type: ignore[arg-type]
        conn.connection_made(wire)  # type: ignore[arg-type]
        for read in reads:
            conn.data_received(read)
        sink = endpoint.sinks[1]
        assert len(sink.got) == 300_000 and not sink.ended
        conn.data_received(data[half:])
        assert bytes(sink.got) == client.sent[1] and sink.ended

    asyncio.run(main())


def test_a_frame_over_the_limit_is_refused_from_its_header_alone() -> None:
    client = Client()
    client.open(1)
    header = struct.pack(">I", MAX_RECV_FRAME + 1)[1:] + bytes((f.DATA, 0)) + struct.pack(">I", 1)
    data = bytes(client.wire) + header
    endpoint, wire = serve([data[:-4], data[-4:]])  # the header cut in two, no payload sent
    goaways = [p for kind, _, _, p in wire.frames() if kind == f.GOAWAY]
    assert goaways and struct.unpack(">I", goaways[0][4:8])[0] == f.FRAME_SIZE_ERROR
    assert b"over" in goaways[0][8:]


def test_a_frame_in_parts_over_the_stream_window_resets_only_its_stream() -> None:
    """The window is checked for the whole frame when its header arrives; the rest of the frame
    is dropped as it comes, and the connection goes on."""
    client = Client()
    client.open(1)
    frame_size = 1 << 20
    for i in range(RECV_STREAM_WINDOW // frame_size):
        client.data(1, _pattern(frame_size, i), end=False)  # the window, used up (nothing consumed)
    client.data(1, _pattern(frame_size, 99), end=True)  # over it
    client.call(3, 100)
    data = bytes(client.wire)
    endpoint, wire = serve([data[i : i + 65_536] for i in range(0, len(data), 65_536)])
    resets = [(sid, p) for kind, _, sid, p in wire.frames() if kind == f.RST_STREAM]
    assert resets == [(1, struct.pack(">I", f.FLOW_CONTROL_ERROR))]
    assert len(endpoint.sinks[1].got) == RECV_STREAM_WINDOW and not endpoint.sinks[1].ended
    assert endpoint.sinks[3].ended and bytes(endpoint.sinks[3].got) == client.sent[3]
    assert not [kind for kind, *_ in wire.frames() if kind == f.GOAWAY]


def test_a_frame_in_parts_for_a_stream_the_client_reset_ends_the_connection_as_whole() -> None:
    """DATA after the client's own RST_STREAM is a stream error (RFC 9113 5.1) whether the frame
    arrives whole or in parts; the next call still gets its bytes."""
    for size in (100_000, 100):
        client = Client()
        client.open(1)
        client.wire += f.rst_stream(1, f.CANCEL)
        client.data(1, _pattern(size, 1), end=True)
        client.call(3, 50)
        data = bytes(client.wire)
        endpoint, wire = serve([data[i : i + 4096] for i in range(0, len(data), 4096)])
        resets = [(sid, p) for kind, _, sid, p in wire.frames() if kind == f.RST_STREAM]
        assert resets == [(1, struct.pack(">I", f.STREAM_CLOSED))], size
        assert bytes(endpoint.sinks[3].got) == client.sent[3] and endpoint.sinks[3].ended


def test_a_large_frame_where_continuation_was_expected_ends_the_connection() -> None:
    client = Client()
    block = client.encoder.encode(HEADERS)
    client.wire += f.frame(f.HEADERS, 0, 1, block[:5])  # no END_HEADERS: CONTINUATION must follow
    client.wire += f.frame(f.DATA, 0, 1, bytes(100_000))
    data = bytes(client.wire)
    endpoint, wire = serve([data[:-50_000], data[-50_000:]])
    goaways = [p for kind, _, _, p in wire.frames() if kind == f.GOAWAY]
    assert goaways and struct.unpack(">I", goaways[0][4:8])[0] == f.PROTOCOL_ERROR
    assert b"CONTINUATION" in goaways[0][8:]
    assert not endpoint.sinks


def test_a_frame_in_parts_counts_against_the_connection_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counted whole when its header arrives: over the connection window, the connection ends
    before any of the frame's payload is passed on."""
    monkeypatch.setattr(connection, "RECV_CONNECTION_WINDOW", 200_000)
    client = Client()
    client.call(1, 120_000)
    client.call(3, 120_000)  # 240,000 bytes in all: over the 200,000 advertised
    data = bytes(client.wire)
    endpoint, wire = serve([data[i : i + 50_000] for i in range(0, len(data), 50_000)])
    goaways = [p for kind, _, _, p in wire.frames() if kind == f.GOAWAY]
    assert goaways and struct.unpack(">I", goaways[0][4:8])[0] == f.FLOW_CONTROL_ERROR
    assert bytes(endpoint.sinks[1].got) == client.sent[1]
    assert not endpoint.sinks[3].got


def test_end_stream_of_a_frame_in_parts_closes_the_clients_side() -> None:
    """The stream is half-closed once the frame's last byte came: DATA after it is refused."""
    client = Client()
    client.call(1, 100_000)
    client.data(1, b"more", end=True)
    client.call(3, 10)
    data = bytes(client.wire)
    endpoint, wire = serve([data[i : i + 30_000] for i in range(0, len(data), 30_000)])
    resets = [(sid, p) for kind, _, sid, p in wire.frames() if kind == f.RST_STREAM]
    assert resets == [(1, struct.pack(">I", f.STREAM_CLOSED))]
    assert len(endpoint.sinks[1].got) == 100_000 and endpoint.sinks[1].ended
    assert endpoint.sinks[3].ended


def test_a_call_keeps_whole_reads_as_views_and_copies_small_slices_of_them() -> None:
    """A unary message in parts: a part that is most of its read is kept as a view, one that is
    a small slice of a large read (here beside 200 KB the server ignores) is copied, so the
    call never holds that read. The message is answered whole either way."""

    async def body(server: H2Server, service: EchoService, port: int) -> None:
        conn = server._connection()
        wire = Wire()
        conn.connection_made(wire)  # type: ignore[arg-type]
        client = Client()
        client.wire[len(f.PREFACE) :] = f.settings({f.INITIAL_WINDOW_SIZE: f.MAX_WINDOW})
        client.wire += f.window_update(0, f.MAX_WINDOW - f.DEFAULT_WINDOW)
        headers = [(k, "/test.Echo/DirectKeep" if k == ":path" else v) for k, v in HEADERS]
        client.wire += f.frame(f.HEADERS, f.END_HEADERS, 1, client.encoder.encode(headers))
        client.wire += f.frame(0xFA, 0, 0, bytes(200_000))  # an unknown frame type: ignored
        grpc_message = b"\0" + (100_000).to_bytes(4, "big") + _pattern(100_000, 1)
        client.data(1, grpc_message, end=True)
        data = bytes(client.wire)
        first = len(data) - len(grpc_message) + 1_000  # the DATA frame's first 1,000 bytes
        conn.data_received(data[:first])
        (call,) = server._calls
        assert call.parts is not None
        assert [type(p) for p in call.parts] == [bytearray]  # copied: 1 KB of a 200 KB read
        conn.data_received(data[first:])  # the rest, one read: taken as it is (a view)
        assert service.direct.kept == [True]
        for _ in range(100):
            await asyncio.sleep(0.01)
            if any(kind == f.HEADERS and sid == 1 and flags & f.END_STREAM
                   for kind, flags, sid, _ in wire.frames()):  # fmt: skip
                break
        answer = b"".join(p for kind, _, sid, p in wire.frames() if kind == f.DATA and sid == 1)
        assert answer == grpc_message

    run(body)


def test_a_message_sent_a_byte_at_a_time_is_held_in_one_buffer() -> None:
    """A client that trickles a large frame one byte per read costs the call one growing
    buffer, not an object per byte; the message still arrives whole."""

    async def body(server: H2Server, service: EchoService, port: int) -> None:
        conn = server._connection()
        wire = Wire()
        conn.connection_made(wire)  # type: ignore[arg-type]
        client = Client()
        headers = [(k, "/test.Echo/DirectKeep" if k == ":path" else v) for k, v in HEADERS]
        client.wire += f.frame(f.HEADERS, f.END_HEADERS, 1, client.encoder.encode(headers))
        grpc_message = b"\0" + (70_000).to_bytes(4, "big") + _pattern(70_000, 2)
        client.data(1, grpc_message, end=True)
        data = bytes(client.wire)
        start = len(data) - len(grpc_message)
        conn.data_received(data[:start])
        for i in range(start, len(data) - 1):
            conn.data_received(data[i : i + 1])
        (call,) = server._calls
        assert call.parts is not None and len(call.parts) == 1
        assert len(call.parts[0]) == len(grpc_message) - 1
        conn.data_received(data[-1:])
        assert service.direct.kept == [True]

    run(body)
