"""ModelInferRequest wire bytes read without building the message, for ModelInfer and each
ModelStreamInfer message on the own HTTP/2 transport (the hot path: one per request;
response_wire.py writes its answer).

A client sends the same header with every request (model, inputs' names, datatypes and shapes,
outputs, parameters); only the tensor bytes and, with some clients, the id change. Every
serializer writes fields in field-number order, so those tensor bytes, `raw_input_contents`
(field 7), come last. `RequestReader` walks the top-level fields, cuts the message there, and
keeps the decoded, checked head (codec.RequestHead) of each header it has seen, so a request
costs a walk of a few fields, a table lookup and one numpy view per input, where parsing the
message and decoding its fields cost several times that.

Anything not in that form (fields out of order, an unknown or non-length-delimited field, no
raw contents, a header that does not decode) is left to the caller's full parse, which gives
the answer or the error. Concatenated protobuf messages merge, so a message cut this way means
exactly its head with those contents: both paths answer alike, kept head or not.
"""

from __future__ import annotations

from pipeserve.api.codec import RequestHead, decode_head
from pipeserve.api.generated import grpc_service_pb2 as pb
from pipeserve.api.kept_heads import HeadTable

# One-byte keys (field number << 3 | 2, length-delimited) of ModelInferRequest's fields 1-6
# (model_name, model_version, id, parameters, inputs, outputs) ...
_HEADER_KEYS = frozenset((0x0A, 0x12, 0x1A, 0x22, 0x2A, 0x32))
_ID = 0x1A
# ... and of field 7, raw_input_contents.
_RAW = 0x3A


class RequestReader:
    """Splits ModelInferRequest bytes into a kept head and the raw tensors. Event-loop only."""

    def __init__(self, heads: HeadTable[RequestHead] | None = None) -> None:
        self._heads: HeadTable[RequestHead] = HeadTable() if heads is None else heads

    def __len__(self) -> int:
        """Heads kept."""
        return len(self._heads)

    def read(
        self, body: bytes | memoryview, kept: bool = False
    ) -> tuple[RequestHead, list[bytes | memoryview], str] | None:
        """(head, raw contents, request id), or None: parse it in full. The contents are
        copied out of `body`, or, when it is `kept` (stays valid and unchanged), views of it:
        a large tensor costs no copy."""
        buf = memoryview(body) if kept else body
        n = len(buf)
        i = 0
        header_end = 0  # where the header fields end and the contents begin
        id_at: tuple[int, int, int] | None = None  # key, value and end offsets of the id field
        raw: list[bytes | memoryview] = []
        while i < n:
            key = buf[i]
            if key != _RAW and (raw or key not in _HEADER_KEYS):
                return None  # an unknown field, or a header field after the contents
            length = buf[i + 1] if i + 1 < n else 0x80
            if length < 0x80:  # the usual one-byte length, read here: this runs per field
                start = i + 2
            else:
                length, start = _length(buf, i + 1)
            end = start + length
            if end > n:
                return None
            if key == _RAW:
                raw.append(buf[start:end] if kept else bytes(buf[start:end]))
            else:
                if key == _ID:
                    if id_at is not None:
                        return None  # two ids: the last would win; leave that to the parser
                    id_at = (i, start, end)
                header_end = end
            i = end
        if not raw or header_end > self._heads.max_header_bytes:
            return None
        if id_at is None:
            header = bytes(buf[:header_end])
            request_id = ""
        else:
            at, start, end = id_at
            header = bytes(buf[:at]) + bytes(buf[end:header_end])
            try:
                request_id = bytes(buf[start:end]).decode()
            except UnicodeDecodeError:
                return None  # the parser names it
        head = self._heads.get(header)
        if head is None:
            try:
                head = decode_head(pb.ModelInferRequest.FromString(header), len(raw))
            except Exception:  # a parse error or a refusal: the full parse answers it
                return None
            self._heads.keep(header, head)
        elif len(head.form.tensors) != len(raw):
            return None  # the parser's decode names the count
        return head, raw, request_id


def _length(buf: bytes | memoryview, i: int) -> tuple[int, int]:
    """The varint at `i` and the offset after it. A truncated varint, or one over 64 bits,
    gives a length past the buffer's end, which the caller refuses like any such length."""
    if i >= len(buf):
        return len(buf) + 1, i
    b = buf[i]
    if b < 0x80:
        return b, i + 1
    value = b & 0x7F
    shift = 7
    i += 1
    while i < len(buf) and shift < 64:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7
    return len(buf) + 1, i  # truncated or over 64 bits: an end past the buffer
