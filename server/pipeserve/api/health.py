"""grpc.health.v1.Health: SERVING while the server is ready (what Kubernetes and Docker probe)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from pipeserve.api.generated import health_pb2 as hpb
from pipeserve.api.generated import health_pb2_grpc as hpb_grpc
from pipeserve.serving.state import ServerState

# Liveness: SERVING while the process runs, also while it drains (restarting a draining server
# would drop its in-flight requests). Every other known service reports readiness.
LIVENESS_SERVICE = "pipeserve.live"
# The whole server ("") and the inference service answer; anything else is unknown.
KNOWN_SERVICES = ("", "inference.GRPCInferenceService", "grpc.health.v1.Health", LIVENESS_SERVICE)

if TYPE_CHECKING:
    from pipeserve.api.h2.server import H2Server


class HealthService(hpb_grpc.HealthServicer):
    def __init__(self, state: ServerState) -> None:
        self._state = state

    def _status(self, service: str) -> hpb.HealthCheckResponse.ServingStatus:
        if service not in KNOWN_SERVICES:
            return hpb.HealthCheckResponse.SERVICE_UNKNOWN
        if service == LIVENESS_SERVICE:
            live = self._state.live
            return hpb.HealthCheckResponse.SERVING if live else hpb.HealthCheckResponse.NOT_SERVING
        if self._state.ready:
            return hpb.HealthCheckResponse.SERVING
        return hpb.HealthCheckResponse.NOT_SERVING

    async def Check(self, request, context):  # type: ignore[no-untyped-def]
        status = self._status(request.service)
        if status == hpb.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        return hpb.HealthCheckResponse(status=status)

    async def Watch(self, request, context) -> AsyncIterator[hpb.HealthCheckResponse]:  # type: ignore[no-untyped-def, override]
        last = None
        while True:
            status = self._status(request.service)
            if status != last:
                yield hpb.HealthCheckResponse(status=status)
                last = status
            if self._state.draining:
                # The last word: otherwise an open watch holds the drain for the whole
                # --exit-timeout-secs. A client that watches again is refused (GOAWAY).
                return
            await self._state.changed.wait()


def add_to_server(service: HealthService, server: grpc.aio.Server | H2Server) -> None:
    hpb_grpc.add_HealthServicer_to_server(service, server)
