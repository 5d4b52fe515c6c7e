"""Composition root: builds every part from Settings, starts and stops them in a written order.
Nothing imports this module except the CLI.

Start:  metrics endpoint -> gRPC server (live, not ready) -> HTTP server -> initial model loads
        -> ready.
Stop:   not ready (health says NOT_SERVING) -> gRPC and HTTP, together, stop accepting and wait
        for in-flight requests (up to exit_timeout_secs; HTTP closes each keep-alive connection
        after its in-flight request) -> repository poller -> every model drained and unloaded ->
        metrics endpoint -> metrics (NVML released).
SIGHUP: every TLS endpoint rereads its certificate files (new handshakes use them; open
        connections keep theirs).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

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
from pipeserve.api.restricted import restrict
from pipeserve.api.tls import ALPN_GRPC, ALPN_HTTP1, ServerTLS, TLSFiles
from pipeserve.metrics.http import MetricsServer, start_metrics_server
from pipeserve.metrics.recorder import ServerMetrics
from pipeserve.registry import Registry
from pipeserve.repository.control import ModelControl
from pipeserve.runtime import devices
from pipeserve.serving.dataplane import DataPlane
from pipeserve.serving.state import ServerState
from pipeserve.settings import Settings

log = logging.getLogger("pipeserve")


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # First: a certificate that cannot serve fails the start before anything is built.
        self.grpc_tls = _tls(
            settings.grpc_tls_cert,
            settings.grpc_tls_key,
            settings.grpc_tls_client_ca,
            "grpc-tls",
            ALPN_GRPC,
        )
        self.metrics_tls = _tls(
            settings.metrics_tls_cert,
            settings.metrics_tls_key,
            settings.metrics_tls_client_ca,
            "metrics-tls",
            ALPN_HTTP1,
        )
        self.http_tls = _tls(
            settings.http_tls_cert,
            settings.http_tls_key,
            settings.http_tls_client_ca,
            "http-tls",
            ALPN_HTTP1,
        )
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
        restrictions = settings.grpc_restrictions()
        grpc_service.add_to_server(
            restrict(InferenceService(self.data_plane), restrictions),
            self.server,
        )
        health.add_to_server(
            restrict(HealthService(self.state), restrictions),
            self.server,
        )
        # HTTP/REST on the same event loop as gRPC, over the same data plane.
        self.http: HttpServer | None = None
        if settings.http:
            self.http = HttpServer(
                HttpApp(Router(self.data_plane, limit, settings.http_restrictions()), limit),
                settings.host,
                settings.http_port,
                HttpLimits(
                    max_connections=settings.http_max_connections,
                    max_header_bytes=settings.http_max_header_bytes,
                    keep_alive_secs=settings.http_keep_alive_secs,
                ),
                self.http_tls.context if self.http_tls is not None else None,
            )
        self.grpc_port = 0
        self.metrics_port = 0
        self._metrics_server: MetricsServer | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        if s.metrics:
            metrics_server = await start_metrics_server(
                self.metrics_registry,
                s.host,
                s.metrics_port,
                self.metrics_tls.context if self.metrics_tls is not None else None,
            )
            self._metrics_server = metrics_server
            self.metrics_port = metrics_server.port
        try:
            # grpcio raises RuntimeError when the bind fails (older releases returned 0).
            self.grpc_port = self._add_grpc_port(f"{s.host}:{s.grpc_port}")
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
        for name, tls in self._tls_endpoints():
            if tls is not None:
                mutual = ", client certificates required" if tls.mutual else ""
                log.info("%s speaks TLS (certificate %s%s)", name, tls.files.cert, mutual)
        # Once, before any model loads: which providers exist (each load says its device).
        log.info("%s", devices.describe())
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

    def _add_grpc_port(self, address: str) -> int:
        tls = self.grpc_tls
        if tls is None:
            return self.server.add_insecure_port(address)
        if isinstance(self.server, H2Server):
            return self.server.add_secure_port(address, tls.context)
        return self.server.add_secure_port(address, tls.grpc_credentials())

    def reload_tls(self) -> None:
        """SIGHUP: every TLS endpoint rereads its files; a broken set keeps the previous one."""
        for _, tls in self._tls_endpoints():
            if tls is not None:
                tls.reload()

    def _tls_endpoints(self) -> tuple[tuple[str, ServerTLS | None], ...]:
        return (("grpc", self.grpc_tls), ("metrics", self.metrics_tls), ("http", self.http_tls))

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
        loop.add_signal_handler(signal.SIGHUP, self.reload_tls)
        await self.start()
        await stop.wait()
        await self.stop()


def _tls(
    cert: Path | None,
    key: Path | None,
    client_ca: Path | None,
    flag: str,
    alpn: tuple[str, ...],
) -> ServerTLS | None:
    if cert is None or key is None:  # Settings checked that both or neither are given
        return None
    return ServerTLS(TLSFiles(cert, key, client_ca, flag), alpn)
