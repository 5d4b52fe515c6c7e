"""A bounded table of decoded request heads by their wire bytes, shared by gRPC's ModelInfer
(api/request_wire.py) and REST's binary requests (api/http/binary_heads.py).

A client has a few request shapes, so a handful of heads serve all its requests. The bound is
against a client that sends a new header every time: past it the oldest head is dropped, and
a request whose head is not kept costs its full decode, as it would with no table. Only speed
depends on the bound, never an answer, so it is a constant, not a flag.
"""

from __future__ import annotations

from typing import Generic, TypeVar

H = TypeVar("H")

HEADS_MAX = 1024
HEADER_MAX_BYTES = 4096


class HeadTable(Generic[H]):
    """Header bytes -> head, at most `max_heads` of them, none for a header over
    `max_header_bytes`. Event-loop only."""

    def __init__(self, max_heads: int = HEADS_MAX, max_header_bytes: int = HEADER_MAX_BYTES):
        self._max_heads = max_heads
        self.max_header_bytes = max_header_bytes
        self._heads: dict[bytes, H] = {}

    def __len__(self) -> int:
        return len(self._heads)

    def get(self, header: bytes) -> H | None:
        return self._heads.get(header)

    def keep(self, header: bytes, head: H) -> None:
        if len(header) > self.max_header_bytes:
            return
        heads = self._heads
        if header not in heads and len(heads) >= self._max_heads:
            del heads[next(iter(heads))]  # the oldest
        heads[header] = head
