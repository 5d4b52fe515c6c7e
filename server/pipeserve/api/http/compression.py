"""Request and response compression of inference bodies, as Triton does it: `Content-Encoding`
gzip or deflate (zlib format) on requests, the best of gzip / deflate named in `Accept-Encoding`
on responses. Decompression is bounded: a small body cannot expand past the body limit."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from pipeserve.api.http.errors import HttpError

# zlib window bits: 16 + 15 = gzip wrapper, 15 = zlib wrapper (HTTP's "deflate").
_WBITS = {"gzip": 31, "deflate": 15}
_SUPPORTED = b"gzip, deflate"


def decompress(body: bytes, encoding: bytes | None, limit: int) -> bytes:
    """The body as sent, decoded per `Content-Encoding`. 413 past `limit` decoded bytes, 400 for
    a corrupt stream, 501 (with Accept-Encoding: gzip, deflate) for another encoding."""
    name = (encoding or b"").decode("latin-1").strip().lower()
    if name in ("", "identity"):
        return body
    wbits = _WBITS.get(name)
    if wbits is None:
        raise HttpError(
            501,
            f"Unsupported compression type '{name}': pipeserve accepts gzip and deflate",
            ((b"accept-encoding", _SUPPORTED),),
        )
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(body, limit + 1)
        if len(out) > limit:
            raise HttpError(
                413,
                f"request body decompresses to more than the server's --max-message-bytes "
                f"limit of {limit} bytes",
            )
        if decoder.unconsumed_tail or not decoder.eof:
            raise zlib.error("truncated or trailing data in the compressed stream")
    except zlib.error as exc:
        raise HttpError(400, f"failed to decompress the {name} request body: {exc}") from None
    return out


def response_encoding(accept: bytes | None) -> str | None:
    """gzip or deflate when the client accepts one (the higher q wins, gzip on a tie), else
    None (identity)."""
    if not accept:
        return None
    best, best_q = None, 0.0
    for item in accept.decode("latin-1").split(","):
        token, _, params = item.strip().partition(";")
        token = token.strip().lower()
        if token not in _WBITS:
            continue
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                continue
        if q <= 0:
            continue  # q=0: not acceptable
        if q > best_q or (q == best_q and token == "gzip"):
            best, best_q = token, q
    return best


def compress(chunks: Sequence[bytes | memoryview], encoding: str) -> bytes:
    encoder = zlib.compressobj(wbits=_WBITS[encoding])
    parts = [encoder.compress(c) for c in chunks]
    parts.append(encoder.flush())
    return b"".join(parts)
