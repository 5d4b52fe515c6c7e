"""api/h2/rules.py alone: each RFC 9113 rule, the error class (stream or connection) and code."""

from __future__ import annotations

import pytest

from pipeserve.api.h2 import frames as f
from pipeserve.api.h2 import rules
from pipeserve.api.h2.rules import ConnectionError_, StreamError

GOOD = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/test.Echo/Echo"),
    (b":authority", b"localhost"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-timeout", b"5S"),
    (b"x-bin-bin", b"AAEC"),
]


def test_a_well_formed_request_becomes_a_dict() -> None:
    headers = rules.request_fields(1, GOOD)
    assert headers[b":path"] == b"/test.Echo/Echo"
    assert headers[b"te"] == b"trailers"
    assert len(headers) == len(GOOD)


def _without(name: bytes) -> list[tuple[bytes, bytes]]:
    return [field for field in GOOD if field[0] != name]


MALFORMED = {
    "uppercase name": ([*GOOD, (b"X-Trace", b"1")], "not lowercase"),
    "space in name": ([*GOOD, (b"x trace", b"1")], "not lowercase"),
    "colon in name": ([*GOOD, (b"x:y", b"1")], "not lowercase"),
    "empty name": ([*GOOD, (b"", b"1")], "not lowercase"),
    "NUL in name": ([*GOOD, (b"x\x00", b"1")], "not lowercase"),
    "connection": ([*GOOD, (b"connection", b"close")], "connection-specific"),
    "keep-alive": ([*GOOD, (b"keep-alive", b"5")], "connection-specific"),
    "proxy-connection": ([*GOOD, (b"proxy-connection", b"x")], "connection-specific"),
    "transfer-encoding": ([*GOOD, (b"transfer-encoding", b"chunked")], "connection-specific"),
    "upgrade": ([*GOOD, (b"upgrade", b"h2c")], "connection-specific"),
    "te other than trailers": ([*_without(b"te"), (b"te", b"gzip")], "only 'trailers'"),
    "pseudo after regular": ([*_without(b":authority"), (b":authority", b"x")], "after a regular"),
    "duplicate pseudo": ([(b":path", b"/a"), *GOOD], "duplicate pseudo-header ':path'"),
    "unknown pseudo": ([(b":foo", b"1"), *GOOD], "unknown pseudo-header ':foo'"),
    "response pseudo": ([(b":status", b"200"), *GOOD], "unknown pseudo-header ':status'"),
    "missing :method": (_without(b":method"), "without :method"),
    "missing :scheme": (_without(b":scheme"), "without :scheme"),
    "missing :path": (_without(b":path"), "without :path"),
    "empty :path": ([(b":path", b"") if n == b":path" else (n, v) for n, v in GOOD], "empty"),
    "CR in value": ([*GOOD, (b"x-a", b"a\rb")], "NUL, CR, LF"),
    "LF in value": ([*GOOD, (b"x-a", b"a\nb")], "NUL, CR, LF"),
    "NUL in value": ([*GOOD, (b"x-a", b"a\x00b")], "NUL, CR, LF"),
    "LF in pseudo value": ([(b":method", b"PO\nST"), *_without(b":method")], "NUL, CR, LF"),
    "leading space": ([*GOOD, (b"x-a", b" a")], "whitespace"),
    "trailing tab": ([*GOOD, (b"x-a", b"a\t")], "whitespace"),
}


@pytest.mark.parametrize(("fields", "says"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_are_stream_protocol_errors(fields, says) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StreamError) as err:
        rules.request_fields(7, fields)
    assert err.value.stream_id == 7
    assert err.value.code == f.PROTOCOL_ERROR
    assert says in str(err.value)


def test_trailers_take_regular_fields_only() -> None:
    assert rules.trailer_fields(3, [(b"x-checksum", b"abc")]) == {b"x-checksum": b"abc"}
    with pytest.raises(StreamError, match="pseudo-header ':path' in trailers") as err:
        rules.trailer_fields(3, [(b":path", b"/x")])
    assert err.value.code == f.PROTOCOL_ERROR
    with pytest.raises(StreamError, match="connection-specific"):
        rules.trailer_fields(3, [(b"connection", b"close")])


FRAMES = {
    # kind, flags, stream, length -> error class, code
    "SETTINGS on a stream": (f.SETTINGS, 0, 1, 0, ConnectionError_, f.PROTOCOL_ERROR),
    "PING on a stream": (f.PING, 0, 1, 8, ConnectionError_, f.PROTOCOL_ERROR),
    "GOAWAY on a stream": (f.GOAWAY, 0, 1, 8, ConnectionError_, f.PROTOCOL_ERROR),
    "DATA on 0": (f.DATA, 0, 0, 1, ConnectionError_, f.PROTOCOL_ERROR),
    "HEADERS on 0": (f.HEADERS, 0, 0, 1, ConnectionError_, f.PROTOCOL_ERROR),
    "RST_STREAM on 0": (f.RST_STREAM, 0, 0, 4, ConnectionError_, f.PROTOCOL_ERROR),
    "CONTINUATION on 0": (f.CONTINUATION, 0, 0, 1, ConnectionError_, f.PROTOCOL_ERROR),
    "PRIORITY on 0": (f.PRIORITY, 0, 0, 5, ConnectionError_, f.PROTOCOL_ERROR),
    "SETTINGS of 5": (f.SETTINGS, 0, 0, 5, ConnectionError_, f.FRAME_SIZE_ERROR),
    "SETTINGS ACK with payload": (f.SETTINGS, f.ACK, 0, 6, ConnectionError_, f.FRAME_SIZE_ERROR),
    "PING of 7": (f.PING, 0, 0, 7, ConnectionError_, f.FRAME_SIZE_ERROR),
    "WINDOW_UPDATE of 3": (f.WINDOW_UPDATE, 0, 0, 3, ConnectionError_, f.FRAME_SIZE_ERROR),
    "RST_STREAM of 5": (f.RST_STREAM, 0, 1, 5, ConnectionError_, f.FRAME_SIZE_ERROR),
    "PRIORITY of 4": (f.PRIORITY, 0, 1, 4, StreamError, f.FRAME_SIZE_ERROR),
    "GOAWAY of 7": (f.GOAWAY, 0, 0, 7, ConnectionError_, f.FRAME_SIZE_ERROR),
}


@pytest.mark.parametrize(
    ("kind", "flags", "stream_id", "length", "error", "code"), FRAMES.values(), ids=FRAMES.keys()
)
def test_frame_stream_and_size_rules(kind, flags, stream_id, length, error, code) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as err:
        rules.check_frame(kind, flags, stream_id, length)
    assert type(err.value) is error and err.value.code == code


def test_frames_that_follow_the_rules_pass() -> None:
    for kind, flags, stream_id, length in [
        (f.SETTINGS, 0, 0, 12),
        (f.SETTINGS, f.ACK, 0, 0),
        (f.PING, f.ACK, 0, 8),
        (f.WINDOW_UPDATE, 0, 0, 4),
        (f.WINDOW_UPDATE, 0, 3, 4),
        (f.RST_STREAM, 0, 3, 4),
        (f.PRIORITY, 0, 3, 5),
        (f.GOAWAY, 0, 0, 30),
        (f.DATA, 0, 1, 0),
        (0x42, 0, 0, 3),  # unknown types are ignored wherever they come
        (0x42, 0, 5, 3),
    ]:
        rules.check_frame(kind, flags, stream_id, length)


def test_padding() -> None:
    assert bytes(rules.unpad(memoryview(b"\x02abc\x00\x00"))) == b"abc"
    assert bytes(rules.unpad(memoryview(b"\x00abc"))) == b"abc"
    assert bytes(rules.unpad(memoryview(b"\x03ab\x00"))) == b""  # all padding: allowed
    for bad in (b"", b"\x04ab\x00", b"\xffab\x00"):
        with pytest.raises(ConnectionError_) as err:
            rules.unpad(memoryview(bad))
        assert err.value.code == f.PROTOCOL_ERROR


def test_self_dependency_and_short_priority_fields() -> None:
    assert rules.dependency(memoryview(b"\x80\x00\x00\x03\x10")) == 3  # exclusive bit dropped
    with pytest.raises(StreamError) as err:
        rules.check_dependency(3, 3)
    assert err.value.code == f.PROTOCOL_ERROR
    rules.check_dependency(3, 1)
    rules.check_dependency(3, -1)  # no priority given
    with pytest.raises(ConnectionError_) as conn_err:
        rules.dependency(memoryview(b"\x00\x00"))
    assert conn_err.value.code == f.FRAME_SIZE_ERROR


def test_window_update_of_zero() -> None:
    assert rules.window_increment(0, memoryview((5).to_bytes(4, "big"))) == 5
    with pytest.raises(ConnectionError_) as err:
        rules.window_increment(0, memoryview(bytes(4)))
    assert err.value.code == f.PROTOCOL_ERROR
    with pytest.raises(StreamError) as stream_err:
        rules.window_increment(9, memoryview(bytes(4)))
    assert stream_err.value.code == f.PROTOCOL_ERROR and stream_err.value.stream_id == 9


def test_send_window_overflow() -> None:
    assert rules.grow_send_window(f.MAX_WINDOW - 10, 10, 1) == f.MAX_WINDOW
    with pytest.raises(StreamError) as err:
        rules.grow_send_window(f.MAX_WINDOW - 10, 11, 1)
    assert err.value.code == f.FLOW_CONTROL_ERROR
    with pytest.raises(ConnectionError_) as conn_err:
        rules.grow_send_window(f.MAX_WINDOW, 1, 0)
    assert conn_err.value.code == f.FLOW_CONTROL_ERROR
    rules.check_initial_window_change(f.MAX_WINDOW, 1)
    with pytest.raises(ConnectionError_) as change_err:
        rules.check_initial_window_change(f.MAX_WINDOW + 1, 1)
    assert change_err.value.code == f.FLOW_CONTROL_ERROR


def test_receive_window_overflow() -> None:
    stream = rules.over_window(5, 100, 99)
    assert isinstance(stream, StreamError) and stream.code == f.FLOW_CONTROL_ERROR
    assert "100 bytes over the 99-byte window" in str(stream)
    connection = rules.over_window(0, 100, 99)
    assert isinstance(connection, ConnectionError_) and connection.code == f.FLOW_CONTROL_ERROR


SETTINGS = {
    "ENABLE_PUSH 2": (f.ENABLE_PUSH, 2, f.PROTOCOL_ERROR),
    "INITIAL_WINDOW_SIZE 2^31": (f.INITIAL_WINDOW_SIZE, 2**31, f.FLOW_CONTROL_ERROR),
    "MAX_FRAME_SIZE 16383": (f.MAX_FRAME_SIZE, 16_383, f.PROTOCOL_ERROR),
    "MAX_FRAME_SIZE 2^24": (f.MAX_FRAME_SIZE, 2**24, f.PROTOCOL_ERROR),
}


@pytest.mark.parametrize(("key", "value", "code"), SETTINGS.values(), ids=SETTINGS.keys())
def test_bad_settings_values(key, value, code) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConnectionError_) as err:
        rules.check_settings([(f.HEADER_TABLE_SIZE, 0), (key, value)])
    assert err.value.code == code


def test_good_settings_values_and_unknown_settings_pass() -> None:
    rules.check_settings(
        [
            (f.ENABLE_PUSH, 0),
            (f.ENABLE_PUSH, 1),
            (f.INITIAL_WINDOW_SIZE, f.MAX_WINDOW),
            (f.MAX_FRAME_SIZE, 16_384),
            (f.MAX_FRAME_SIZE, 2**24 - 1),
            (0x99, 12345),
        ]
    )


def test_frames_on_closed_streams() -> None:
    rules.frame_on_closed(f.DATA, 3, rules.RESET_BY_US, 5)  # dropped: no error
    rules.frame_on_closed(f.HEADERS, 3, rules.RESET_BY_US, 5)
    with pytest.raises(StreamError) as err:
        rules.frame_on_closed(f.DATA, 3, rules.RESET_BY_PEER, 5)
    assert err.value.code == f.STREAM_CLOSED
    for kind in (f.DATA, f.HEADERS):
        with pytest.raises(ConnectionError_) as conn_err:
            rules.frame_on_closed(kind, 3, rules.ENDED, 5)
        assert conn_err.value.code == f.STREAM_CLOSED
    with pytest.raises(ConnectionError_) as old:  # a lower id that is not remembered
        rules.frame_on_closed(f.DATA, 3, None, 5)
    assert old.value.code == f.STREAM_CLOSED
    with pytest.raises(ConnectionError_, match="not above the last stream opened") as reused:
        rules.frame_on_closed(f.HEADERS, 3, None, 5)
    assert reused.value.code == f.PROTOCOL_ERROR
    half = rules.half_closed(f.DATA, 3)
    assert isinstance(half, StreamError) and half.code == f.STREAM_CLOSED


def test_closed_streams_are_bounded_and_resets_outlive_ordinary_ends() -> None:
    closed = rules.ClosedStreams()
    closed.add(1, rules.RESET_BY_US)
    ordinary = range(3, 3 + 2 * (3 * rules.CLOSED_REMEMBERED), 2)
    for stream_id in ordinary:
        closed.add(stream_id, rules.ENDED)
    assert closed.get(1) == rules.RESET_BY_US  # a run of ordinary calls did not push it out
    assert closed.get(3) is None  # the oldest ordinary ends were forgotten
    newest = list(ordinary)[-rules.CLOSED_REMEMBERED :]
    assert all(closed.get(i) == rules.ENDED for i in newest)  # the newest ones never are
    assert len(closed) <= 2 * rules.CLOSED_REMEMBERED + 1
    resets = range(100_001, 100_001 + 2 * (3 * rules.CLOSED_REMEMBERED), 2)
    for stream_id in resets:
        closed.add(stream_id, rules.RESET_BY_PEER)
    assert closed.get(1) is None
    newest = list(resets)[-rules.CLOSED_REMEMBERED :]
    assert all(closed.get(i) == rules.RESET_BY_PEER for i in newest)
    assert len(closed) <= 4 * rules.CLOSED_REMEMBERED
