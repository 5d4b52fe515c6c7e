"""The one table from domain errors to HTTP statuses, and the JSON error body.

Triton's HTTP front end maps its error codes in `HttpCodeFromError` (src/http_server.cc):
NOT_FOUND -> 404, UNAVAILABLE -> 503, UNSUPPORTED -> 501, INTERNAL -> 500, and every code with no
direct match (INVALID_ARG, CANCELLED, ALREADY_EXISTS, UNKNOWN) -> 400. The message is the same
text the gRPC front end sends; the body is `{"error": "<message>"}`.
"""

from __future__ import annotations

import orjson

from pipeserve.errors import (
    ConfigError,
    ExecutionError,
    InvalidInputError,
    LoadFailedError,
    ModelLoadError,
    ModelNotFoundError,
    PipeserveError,
    RequestCancelledError,
    ResponseTooLargeError,
    UnavailableError,
    UnsupportedError,
)

# Most specific first: ConfigError before its parent ModelLoadError.
HTTP_STATUSES: tuple[tuple[type[PipeserveError], int], ...] = (
    (ModelNotFoundError, 404),
    (InvalidInputError, 400),
    (ConfigError, 400),
    (LoadFailedError, 400),
    (UnavailableError, 503),
    (RequestCancelledError, 400),
    (UnsupportedError, 501),
    # gRPC's RESOURCE_EXHAUSTED has no Triton HTTP counterpart: Triton's fallback is 400.
    (ResponseTooLargeError, 400),
    (ModelLoadError, 500),
    (ExecutionError, 500),
)


class HttpError(Exception):
    """A protocol-level answer that is no domain error: unknown path, wrong method, body too
    large, unsupported encoding. Raised by the routing and body layers only."""

    def __init__(
        self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def http_status(error: PipeserveError) -> int:
    for kind, status in HTTP_STATUSES:
        if isinstance(error, kind):
            return status
    return 500


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})
