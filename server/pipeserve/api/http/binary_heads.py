"""Kept JSON headers of binary REST inference requests (the hot path of a REST client such as
perf_analyzer or tritonclient with binary tensors; api/request_wire.py is gRPC's counterpart).

Such a client sends the same JSON header with every request (`Inference-Header-Content-Length`
gives its size); only the binary sections after it change. So a header whose every input is a
binary section, and that has no `id` (a client that sends one changes it every time), is
decoded and checked once (codec.decode_infer builds its `BinaryHead`), and a
later request with the same header bytes and the body size it implies costs a table lookup and
one numpy view per input. Any other request is decoded in full, which gives the answer or the
error: a kept head only answers bodies that its full decode accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeserve.api.head_table import HeadTable
from pipeserve.inference import InferRequest
from pipeserve.tensors import array_from_raw, element_size, numpy_dtype

if TYPE_CHECKING:
    from pipeserve.api.http.codec import OutputChoice


@dataclass(frozen=True, slots=True, eq=False)
class BinaryHead:
    """A decoded, checked JSON header whose inputs are all binary sections. Compared and hashed
    by identity (a key of ServedVersion.submit: every request of a head has one form)."""

    request_id: str
    tensors: tuple[tuple[str, str, tuple[int, ...], int], ...]  # name, datatype, shape, bytes
    parameters: Mapping[str, Any]
    datatypes: Mapping[str, str]
    requested_outputs: tuple[str, ...]
    classification: Mapping[str, int]
    priority: int
    timeout_us: int
    choice: OutputChoice
    # The bytes of all sections: a body is the header plus exactly this.
    sections_size: int = field(init=False, repr=False)
    # Per tensor: name, datatype, shape, byte count, numpy dtype (None for BYTES).
    _plan: tuple[tuple[str, str, tuple[int, ...], int, np.dtype | None], ...] = field(
        init=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "sections_size", sum(t[3] for t in self.tensors))
        plan = tuple(
            (name, datatype, shape, size, None if not element_size(datatype) else dtype)
            for name, datatype, shape, size in self.tensors
            for dtype in (numpy_dtype(datatype),)
        )
        object.__setattr__(self, "_plan", plan)

    def request(
        self, model_name: str, model_version: str, body: memoryview, offset: int
    ) -> InferRequest:
        """The request of this head whose sections start at `offset` of `body` (the caller has
        checked that the body is exactly header plus sections)."""
        inputs: dict[str, np.ndarray] = {}
        for name, datatype, shape, size, dtype in self._plan:
            section = body[offset : offset + size]
            offset += size
            # A read-only view on the body, no copy; BYTES elements are parsed (and checked).
            inputs[name] = (
                np.ndarray(shape, dtype, section)
                if dtype is not None
                else array_from_raw(name, datatype, shape, section)
            )
        return InferRequest(
            model_name,
            model_version,
            self.request_id,
            inputs,
            self.requested_outputs,
            self.parameters,
            self.datatypes,
            self.priority,
            self.timeout_us,
            self.classification,
        )


# JSON header bytes -> BinaryHead (api/head_table.py: bounded, the oldest dropped first).
BinaryHeads = HeadTable[BinaryHead]
