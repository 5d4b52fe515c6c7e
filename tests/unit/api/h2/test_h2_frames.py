"""api/h2/frames.py: encodings checked against an independent HPACK decoder."""

from __future__ import annotations

import hpack
import pytest

from pipeserve.api.h2 import frames as f


def test_header_blocks_decode_with_a_real_hpack_decoder() -> None:
    decoder = hpack.Decoder()
    assert decoder.decode(f.RESPONSE_HEADERS) == [
        (":status", "200"),
        ("content-type", "application/grpc"),
    ]
    assert decoder.decode(f.trailers(0)) == [("grpc-status", "0")]
    long_value = "x" * 300  # a length that needs HPACK's multi-byte integer form
    assert decoder.decode(f.trailers(5, long_value)) == [
        ("grpc-status", "5"),
        ("grpc-message", long_value),
    ]
    # Literals never enter the peer's dynamic table.
    assert len(decoder.header_table.dynamic_entries) == 0


def test_status_message_is_percent_encoded_and_capped() -> None:
    assert f.percent_encode("plain text: ok") == b"plain text: ok"
    assert f.percent_encode("50% ü\n") == b"50%25 %C3%BC%0A"
    block = hpack.Decoder().decode(f.trailers(13, "y" * 10_000))
    assert len(block[1][1]) == f.MAX_STATUS_MESSAGE and block[1][1].endswith("...")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1S", 1.0), ("250m", 0.25), ("3M", 180.0), ("2H", 7200.0), ("100u", 1e-4), ("5n", 5e-9)],
)
def test_grpc_timeout_units(value: str, seconds: float) -> None:
    assert f.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "S", "10", "10x", "-1S", "123456789S", "1.5S"])
def test_malformed_grpc_timeout_is_none(value: str) -> None:
    assert f.parse_timeout(value) is None


def test_frame_layout() -> None:
    frame = f.frame(f.DATA, f.END_STREAM, 5, b"abc")
    assert frame == b"\x00\x00\x03\x00\x01\x00\x00\x00\x05abc"
    assert f.parse_settings(f.settings({f.INITIAL_WINDOW_SIZE: 70_000})[9:]) == [
        (f.INITIAL_WINDOW_SIZE, 70_000)
    ]
    assert f.u32(f.window_update(0, 2**31 - 1)[9:]) == 2**31 - 1
