"""gzip / deflate request bodies (bounded); the response encoding chosen from Accept-Encoding."""

from __future__ import annotations

import gzip
import zlib

import pytest

from pipeserve.api.http.compression import compress, decompress, response_encoding
from pipeserve.api.http.errors import HttpError

DATA = b'{"inputs": []}' * 100


@pytest.mark.parametrize(
    ("encoding", "packed"),
    [(b"gzip", gzip.compress(DATA)), (b"deflate", zlib.compress(DATA)), (b"identity", DATA)],
)
def test_request_bodies_are_decoded(encoding, packed):
    assert decompress(packed, encoding, 1 << 20) == DATA
    assert decompress(DATA, None, 1 << 20) == DATA


def test_a_body_that_expands_past_the_limit_is_refused_without_expanding_it():
    bomb = gzip.compress(b"\0" * (50 << 20))
    with pytest.raises(HttpError) as info:
        decompress(bomb, b"gzip", 1 << 20)
    assert info.value.status == 413 and "--max-message-bytes" in info.value.message


@pytest.mark.parametrize("packed", [b"not gzip at all", gzip.compress(DATA)[:-10]])
def test_corrupt_or_truncated_streams_are_400(packed):
    with pytest.raises(HttpError) as info:
        decompress(packed, b"gzip", 1 << 20)
    assert info.value.status == 400 and "failed to decompress the gzip" in info.value.message


def test_unknown_encoding_is_501_naming_the_supported_ones():
    with pytest.raises(HttpError) as info:
        decompress(DATA, b"br", 1 << 20)
    assert info.value.status == 501
    assert (b"accept-encoding", b"gzip, deflate") in info.value.headers


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, None),
        (b"identity", None),
        (b"gzip", "gzip"),
        (b"deflate", "deflate"),
        (b"gzip, deflate", "gzip"),
        (b"gzip;q=0.5, deflate;q=0.9", "deflate"),
        (b"br, *", None),
        (b"gzip;q=0", None),
    ],
)
def test_response_encoding(accept, chosen):
    assert response_encoding(accept) == chosen


def test_compress_round_trips():
    chunks = [b"abc", memoryview(b"def" * 50)]
    assert gzip.decompress(compress(chunks, "gzip")) == b"abc" + b"def" * 50
    assert zlib.decompress(compress(chunks, "deflate")) == b"abc" + b"def" * 50
