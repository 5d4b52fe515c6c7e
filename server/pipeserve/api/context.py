"""The servicer-context contract: what pipeserve's gRPC servicers may ask of their call.

Both gRPC front ends implement it: grpc.aio's `ServicerContext` (a superset) and the own
transport's `api.h2.calls.Context`. A servicer that needs more than this must add it here and to
the own transport first; `tests/e2e/test_frontends.py` runs every RPC on both front ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol

import grpc

# One metadata entry as grpc.aio gives it: text values are str, `-bin` keys carry bytes.
MetadataEntry = tuple[str, str | bytes]


class ServicerContext(Protocol):
    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        """End the call with `code` and `details` (raises; never returns)."""
        ...

    def invocation_metadata(self) -> Sequence[MetadataEntry] | None:
        """The client's custom metadata (request headers other than HTTP/2 pseudo-headers and
        the transport's own), keys in lower case, in the order sent."""
        ...

    def peer(self) -> str:
        """The client's address as gRPC writes it: `ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`."""
        ...


class Refused(Exception):
    """What a direct handler (below) raises to end its call with a status instead of a message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def unparsable(exc: Exception) -> Refused:
    """How a request message that does not parse is answered (as grpc.aio answers it)."""
    return Refused(grpc.StatusCode.INTERNAL, f"could not parse the request message: {exc}")


# A unary RPC the own transport runs without a task or a coroutine: called with the request
# message's serialized bytes and whether they are kept (True: they stay valid and unchanged,
# the handler may keep views of them; False: valid only during the call, a handler keeps
# copies), it parses them (raising `unparsable(...)` when they do not parse), validates and
# queues the work at once, and returns a future with the function that turns that future, once
# done, into the response message's serialized bytes. So a handler may read and write the wire
# form itself (api/request_wire.py, api/response_wire.py). Both raise Refused to answer with a
# status. grpc.aio runs the same RPC's ordinary async handler; both must give the same answers.
DirectResult = tuple["asyncio.Future[Any]", Callable[["asyncio.Future[Any]"], bytes]]
DirectUnary = Callable[[bytes | memoryview, bool], DirectResult]

# A bidirectional streaming RPC whose every request gets one response message, run by the own
# transport without a task or a coroutine per message: called with each request message's bytes
# as it arrives (valid only during the call), it queues that request's work at once and returns
# a DirectResult, or, when the answer is known at once (an error the RPC answers in a message),
# that response message's bytes. Its finisher answers a failed request in a message too. It
# raises Refused (`unparsable(...)` included) only to end the whole call with a status. The
# transport writes each response as its future is done, holds a bounded number in flight, and
# ends the call once the client has ended its side and every response is written.
DirectStream = Callable[[bytes | memoryview], bytes | DirectResult]
