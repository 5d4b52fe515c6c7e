"""Composition root: builds every part from Settings, starts and stops them in a written order.
Nothing imports this module except the CLI.

Start:  metrics endpoint -> gRPC server (live, not ready) -> HTTP server -> initial model loads
        -> ready.
Stop:   not ready (health says NOT_SERVING) -> gRPC and HTTP, together, stop accepting and wait
        for in-flight requests (up to exit_timeout_secs; HTTP closes each keep-alive connection
        after its in-flight request) -> repository poller -> every model drained and unloaded ->
        metrics endpoint -> metrics (NVML released).
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from prometheus_client import CollectorRegistry

from pipeserve.api import grpc_service, health
from pipeserve.api.grpc_service import InferenceService
from pipeserve.api.h2.limits import grpcio_limit_options, h2_limits
from pipeserve.api.h2.server import H2Server
from pipeserve.api.health import HealthService
from pipeserve.api.http.listener import HttpLimits, HttpServer
from pipeserve.api.http.routes import Router
from pipeserve.api.http.server import HttpApp
from pipeserve.metrics.http import MetricsServer, start_metrics_server
from pipeserve.metrics.recorder import ServerMetrics
from pipeserve.registry import Registry
from pipeserve.repository.control import ModelControl
from pipeserve.serving.dataplane import DataPlane
from pipeserve.serving.state import ServerState
from pipeserve.settings import Settings

log = logging.getLogger("pipeserve")


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics_registry = CollectorRegistry(auto_describe=True)
        self.metrics = ServerMetrics(self.metrics_registry) if settings.metrics else None
        # Strict readiness (Triton's default): ready only while every model is; the registry
        # says when a model's state changed, so health watches hear of it.
        self.registry = Registry(
            settings.model_repository, self.metrics, on_change=lambda: self.state.notify()
        )
        self.state = ServerState(self.registry.all_ready if settings.strict_readiness else None)
        self.control = ModelControl(
            self.registry,
            settings.model_repository,
            settings.model_control_mode,
            settings.repository_poll_secs,
            settings.load_models,
        )
        limit = settings.max_message_bytes
        # Every front end below converts its wire format to this one data plane.
        self.data_plane = DataPlane(
            self.registry, self.control, self.state, limit, server_name=settings.server_name
        )
        self.server: H2Server | grpc.aio.Server
        if settings.grpc_frontend == "asyncio":
            self.server = H2Server(max_receive=limit, max_send=limit, limits=h2_limits(settings))
        else:
            self.server = grpc.aio.server(
                options=[
                    ("grpc.max_receive_message_length", limit),
                    ("grpc.max_send_message_length", limit),
                    ("grpc.so_reuseport", 0),
                    *grpcio_limit_options(settings),
                ]
            )
        grpc_service.add_to_server(InferenceService(self.data_plane), self.server)
        health.add_to_server(HealthService(self.state), self.server)
        # HTTP/REST on the same event loop as gRPC, over the same data plane.
        self.http: HttpServer | None = None
        if settings.http:
            self.http = HttpServer(
                HttpApp(Router(self.data_plane, limit), limit),
                settings.host,
                settings.http_port,
                HttpLimits(
                    max_connections=settings.http_max_connections,
                    max_header_bytes=settings.http_max_header_bytes,
                    keep_alive_secs=settings.http_keep_alive_secs,
                ),
            )
        self.grpc_port = 0
        self.metrics_port = 0
        self._metrics_server: MetricsServer | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        if s.metrics:
            metrics_server = await start_metrics_server(
                self.metrics_registry, s.host, s.metrics_port
            )
            self._metrics_server = metrics_server
            self.metrics_port = metrics_server.port
        try:
            # grpcio raises RuntimeError when the bind fails (older releases returned 0).
            self.grpc_port = self.server.add_insecure_port(f"{s.host}:{s.grpc_port}")
        except (RuntimeError, OSError):
            self.grpc_port = 0
        if self.grpc_port == 0:
            raise OSError(
                f"cannot listen for gRPC on {s.host}:{s.grpc_port} (address in use or unavailable)"
            )
        await self.server.start()
        if self.http is not None:
            try:
                await self.http.start()
            except OSError as exc:
                raise OSError(f"cannot listen for HTTP on {s.host}:{s.http_port} ({exc})") from None
        # One parseable line: tests and scripts read the bound ports from it (port 0 = any).
        log.info(
            "pipeserve listening: grpc=%s:%d metrics=%s http=%s",
            s.host,
            self.grpc_port,
            f"{s.host}:{self.metrics_port}" if s.metrics else "off",
            f"{s.host}:{self.http.port}" if self.http is not None else "off",
        )
        await self.control.start()
        self.state.set_ready(True)
        ready = self.registry.ready_names()
        failed = self.registry.failures()
        # The line scripts wait for: what serves, and apart from it what failed and why.
        log.log(
            logging.WARNING if failed else logging.INFO,
            "pipeserve ready: models %s; failed %s%s",
            ready,
            {name: failed[name] for name in sorted(failed)} if failed else "none",
            "" if self.state.ready else " (not ready: --strict-readiness and a model failed)",
        )

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("pipeserve draining (up to %gs)", self.settings.exit_timeout_secs)
        self.state.start_draining()
        grace = self.settings.exit_timeout_secs
        if self.http is not None:
            await asyncio.gather(self.server.stop(grace=grace), self.http.stop(grace))
        else:
            await self.server.stop(grace=grace)
        await self.control.stop()
        await self.registry.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        if self.metrics is not None:
            self.metrics.close()  # NVML, opened by ServerMetrics when it found a GPU
        log.info("pipeserve stopped")

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()
