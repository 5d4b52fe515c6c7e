"""Kept JSON headers of binary REST inference requests (the hot path of a REST client such as
perf_analyzer or tritonclient with binary tensors; api/request_wire.py is gRPC's counterpart).

Such a client sends the same JSON header with every request (`Inference-Header-Content-Length`
gives its size); only the binary sections after it change. So a header whose every input is a
binary section, and that has no `id` (a client that sends one changes it every time), is
decoded and checked once (codec.decode_infer builds its `BinaryHead`), and a later request
with the same header bytes and the body size it implies costs a table lookup and one numpy
view per input. Any other request is decoded in full, which gives the answer or the error: a
kept head only answers bodies that its full decode accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from pipeserve.api.kept_heads import HeadTable, RequestForm
from pipeserve.inference import InferRequest

if TYPE_CHECKING:
    from pipeserve.api.http.codec import OutputChoice


@dataclass(frozen=True, slots=True, eq=False)
class BinaryHead:
    """A decoded, checked JSON header whose inputs are all binary sections: its form
    (api/kept_heads.py), each section's size and how the outputs go back. Compared and hashed
    by identity (a key of ServedVersion.submit)."""

    form: RequestForm
    section_sizes: tuple[int, ...]  # per input, in order
    choice: OutputChoice
    # The bytes of all sections: a body is the header plus exactly this.
    sections_size: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sections_size", sum(self.section_sizes))

    def request(
        self, model_name: str, model_version: str, body: memoryview, offset: int
    ) -> InferRequest:
        """The request of this head whose sections start at `offset` of `body` (the caller has
        checked that the body is exactly header plus sections)."""
        sections = []
        for size in self.section_sizes:
            sections.append(body[offset : offset + size])
            offset += size
        return self.form.request(model_name, model_version, "", sections)


# JSON header bytes -> BinaryHead (api/kept_heads.py: bounded, the oldest dropped first).
BinaryHeads: TypeAlias = HeadTable[BinaryHead]
