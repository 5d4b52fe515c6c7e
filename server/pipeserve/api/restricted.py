"""Restricted protocol groups on gRPC: one check in front of every servicer method, for both
front ends (the own transport and grpc.aio register the same servicer objects).

A refused call gets PERMISSION_DENIED with Triton's message ("This protocol is restricted,
expecting header '...'"; Triton itself answers UNAVAILABLE there) and a WARNING log line naming
the RPC and the peer; the header's value is never logged.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import grpc

from pipeserve.restrictions import Restrictions

log = logging.getLogger(__name__)

S = TypeVar("S")

# Every RPC of inference.GRPCInferenceService and grpc.health.v1.Health by protocol group, as
# Triton's grpc_server.cc registers them.
RPC_GROUPS: Mapping[str, str] = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "Check": "health",
    "Watch": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository",
    "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory",
    "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory",
    "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory",
    "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}


def _header_of(context: Any) -> Callable[[str], str | None]:
    metadata = context.invocation_metadata() or ()

    def header(name: str) -> str | None:
        for key, value in metadata:
            if key == name:
                return value if isinstance(value, str) else None
        return None

    return header


class RestrictedServicer:
    """Stands in for `servicer` when it is registered: each RPC of a restricted group checks
    its call's metadata before the servicer's method runs; every other attribute is the
    servicer's own."""

    def __init__(self, servicer: object, restrictions: Restrictions) -> None:
        self._servicer = servicer
        self._restrictions = restrictions

    def direct_methods(self) -> dict[str, Any]:
        """The servicer's task-free handlers (api.context.DirectUnary) of the RPCs no rule
        restricts. A restricted RPC runs its checked async handler instead: a direct handler
        never sees the call's metadata, so it could not check it."""
        direct: dict[str, Any] = getattr(self._servicer, "direct_methods", dict)()
        return {
            name: handler
            for name, handler in direct.items()
            if name in RPC_GROUPS and RPC_GROUPS[name] not in self._restrictions.rules
        }

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)
        group = RPC_GROUPS.get(name)
        if group is None or group not in self._restrictions.rules:
            return method
        return _checked(method, name, group, self._restrictions)


def restrict(servicer: S, restrictions: Restrictions) -> S:
    """`servicer` itself when nothing is restricted, else a RestrictedServicer standing in for
    it (typed as the servicer: registration only reads its RPC methods)."""
    if not restrictions:
        return servicer
    return cast(S, RestrictedServicer(servicer, restrictions))


def _checked(method: Any, rpc: str, group: str, restrictions: Restrictions) -> Any:
    async def check(context: Any) -> None:
        message = restrictions.denial(group, _header_of(context))
        if message is not None:
            log.warning("denied %s from %s: %s", rpc, context.peer(), message)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    if inspect.isasyncgenfunction(method):

        async def streaming(request: Any, context: Any) -> Any:
            await check(context)
            async for response in method(request, context):
                yield response

        return streaming

    async def unary(request: Any, context: Any) -> Any:
        await check(context)
        return await method(request, context)

    return unary
