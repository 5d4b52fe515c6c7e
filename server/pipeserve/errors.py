"""Domain errors. No grpc here: `api/status.py` maps this tree to status codes in one table.

    PipeserveError
    ├── ModelNotFoundError        unknown model or version              -> NOT_FOUND
    ├── InvalidInputError         bad shape / datatype / size / names   -> INVALID_ARGUMENT
    ├── UnavailableError          cannot serve right now                -> UNAVAILABLE
    │   ├── QueueFullError        "Exceeds maximum queue size"
    │   ├── RequestTimeoutError   "Request timeout expired"
    │   └── ModelNotReadyError    model loading / unloading / failed
    ├── RequestCancelledError     client cancelled or deadline passed   -> CANCELLED
    ├── UnsupportedError          feature not implemented               -> UNIMPLEMENTED
    ├── ResponseTooLargeError     response over the message size limit  -> RESOURCE_EXHAUSTED
    ├── ModelLoadError            a model folder could not be loaded    -> INTERNAL
    │   ├── ConfigError           config.pbtxt / override is invalid    -> INVALID_ARGUMENT
    │   └── LoadFailedError       a requested load ran and failed       -> INVALID_ARGUMENT
    └── ExecutionError            the runtime failed on a batch         -> INTERNAL

Each error carries `reason`, the label used by the failure counters (Triton's REJECTED, CANCELED,
BACKEND, OTHER).
"""

from __future__ import annotations


class PipeserveError(Exception):
    """Base of every error pipeserve raises on purpose."""

    reason = "OTHER"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ModelNotFoundError(PipeserveError):
    @classmethod
    def for_model(cls, name: str, version: str = "") -> ModelNotFoundError:
        if version:
            return cls(f"Request for unknown model: '{name}' version {version} is not found")
        return cls(f"Request for unknown model: '{name}' is not found")


class InvalidInputError(PipeserveError):
    pass


class UnavailableError(PipeserveError):
    reason = "REJECTED"


class QueueFullError(UnavailableError):
    def __init__(self, message: str = "Exceeds maximum queue size") -> None:
        super().__init__(message)


class RequestTimeoutError(UnavailableError):
    def __init__(self, message: str = "Request timeout expired") -> None:
        super().__init__(message)


class ModelNotReadyError(UnavailableError):
    reason = "OTHER"


class RequestCancelledError(PipeserveError):
    reason = "CANCELED"


class UnsupportedError(PipeserveError):
    pass


class ResponseTooLargeError(PipeserveError):
    pass


class ModelLoadError(PipeserveError):
    pass


# Triton's words when a load could not even start (no folder, a malformed `config` override,
# files that could not be laid out).
NOT_POLLED = "failed to poll from model repository"


class ConfigError(ModelLoadError):
    pass


class LoadFailedError(ModelLoadError):
    """The load of a model folder ran and failed, whatever the cause (Triton answers such a load
    request INVALID_ARGUMENT "load failed for model '<name>': ..."; a load that cannot start,
    e.g. no folder, stays a plain ModelLoadError: INTERNAL)."""


class ExecutionError(PipeserveError):
    reason = "BACKEND"
