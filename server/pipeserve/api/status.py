"""The one table from domain errors to gRPC status codes, and the guard that applies it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from pipeserve.api.context import Refused, ServicerContext
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

log = logging.getLogger(__name__)

# Most specific first: ConfigError before its parent ModelLoadError.
STATUS_CODES: tuple[tuple[type[PipeserveError], grpc.StatusCode], ...] = (
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (LoadFailedError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (RequestCancelledError, grpc.StatusCode.CANCELLED),
    (UnsupportedError, grpc.StatusCode.UNIMPLEMENTED),
    (ResponseTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelLoadError, grpc.StatusCode.INTERNAL),
    (ExecutionError, grpc.StatusCode.INTERNAL),
)


def status_code(error: PipeserveError) -> grpc.StatusCode:
    for kind, code in STATUS_CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def refusal(exc: Exception, where: str) -> Refused:
    """The status a handler's exception answers with: domain errors by the table above,
    anything else INTERNAL, logged (call it inside the `except`), never a traceback sent to the
    client."""
    if isinstance(exc, PipeserveError):
        return Refused(status_code(exc), exc.message)
    log.exception("unexpected error in %s", where)
    return Refused(grpc.StatusCode.INTERNAL, f"internal error: {exc}")


def guarded(method: F) -> F:
    """An async handler's exceptions become their status (`refusal`)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            refused = refusal(exc, method.__name__)
            await context.abort(refused.code, refused.details)

    return wrapper  # type: ignore[return-value]
