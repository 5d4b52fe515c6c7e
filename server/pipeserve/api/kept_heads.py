"""Decoded request heads kept by their wire bytes, shared by gRPC's ModelInfer
(api/request_wire.py) and REST's binary requests (api/http/binary_heads.py).

A client repeats everything of a request but its tensor bytes (and, with some clients, its id):
`RequestForm` is that part, decoded and checked once; a request of a kept form then costs one
numpy view per input. `HeadTable` keeps the heads by their header bytes.

A client has a few request shapes, so a handful of heads serve all its requests. The bound is
against a client that sends a new header every time: past it the oldest head is dropped, and
a request whose head is not kept costs its full decode, as it would with no table. Only speed
depends on the bound, never an answer, so it is a constant, not a flag.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from pipeserve.inference import InferRequest
from pipeserve.tensors import array_from_raw, numpy_dtype

H = TypeVar("H")

HEADS_MAX = 1024
HEADER_MAX_BYTES = 4096


@dataclass(frozen=True, slots=True, eq=False)
class RequestForm:
    """All a request says but its model, id and tensor bytes, checked: each input's name,
    datatype and shape, the outputs asked for, the parameters. Compared and hashed by identity
    (a key of ServedVersion.submit: every request of one form validates alike)."""

    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, datatype, shape), in order
    requested_outputs: tuple[str, ...]
    parameters: Mapping[str, Any]
    datatypes: Mapping[str, str]
    priority: int
    timeout_us: int
    classification: Mapping[str, int]
    # Per tensor: name, datatype, shape, numpy dtype and byte count (None, 0 for BYTES), in
    # one tuple worked out once (request() unpacks one per input).
    _plan: tuple[tuple[str, str, tuple[int, ...], np.dtype | None, int], ...] = field(
        init=False, repr=False
    )

    def __post_init__(self) -> None:
        plan: list[tuple[str, str, tuple[int, ...], np.dtype | None, int]] = []
        for name, datatype, shape in self.tensors:
            if datatype == "BYTES":
                plan.append((name, datatype, shape, None, 0))
            else:
                dtype = numpy_dtype(datatype)
                plan.append((name, datatype, shape, dtype, math.prod(shape) * dtype.itemsize))
        object.__setattr__(self, "_plan", tuple(plan))

    def request(
        self,
        model_name: str,
        model_version: str,
        request_id: str,
        sections: Sequence[bytes | memoryview],
    ) -> InferRequest:
        """The request of this form with `sections` (one per input, in order: the caller has
        counted them) as its tensors."""
        inputs: dict[str, np.ndarray] = {}
        for (name, datatype, shape, dtype, size), data in zip(self._plan, sections, strict=True):
            if dtype is not None and len(data) == size:
                # A read-only view on the request's buffer: no copy.
                inputs[name] = np.ndarray(shape, dtype, data)
            else:  # BYTES elements to parse, or the byte count's error to raise
                inputs[name] = array_from_raw(name, datatype, shape, data, model_name)
        return InferRequest(
            model_name,
            model_version,
            request_id,
            inputs,
            self.requested_outputs,
            self.parameters,
            self.datatypes,
            self.priority,
            self.timeout_us,
            self.classification,
        )


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
