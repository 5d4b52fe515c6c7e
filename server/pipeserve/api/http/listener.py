"""The HTTP listener: uvicorn's httptools protocol driving one plain ASGI callable (no web
framework on the request path), on the event loop the gRPC front end runs on. Serves the KServe
v2 REST API (api/http/server.py) and the Prometheus /metrics endpoint (metrics/http.py).

uvicorn owns the HTTP/1.1 parsing, keep-alive, flow control and the graceful drain; what a peer
can make the listener hold is bounded by `HttpLimits` (server flags for the REST listener):

- header bytes: `max_header_bytes` for the request line and headers together (431 past it).
- connections and requests at once: `max_connections`; uvicorn answers 503 at once beyond it.
- idle keep-alive connections, and connections that do not send a whole request head: closed
  after `keep_alive_secs`.
- body bytes are the application's to bound (it reads the body): api/http/server.py.

Stop: the listener closes (new connections are refused), idle keep-alive connections close,
busy ones close once their in-flight request is answered; after `grace` seconds whatever is left
is cancelled.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pipeserve.api.http.errors import error_body

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Defaults of the HTTP limits (flags --http-max-connections, --http-max-header-bytes,
# --http-keep-alive-secs).
MAX_CONNECTIONS = 1024
MAX_HEADER_BYTES = 64 * 1024
KEEP_ALIVE_SECS = 30.0
BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_connections: int = MAX_CONNECTIONS
    max_header_bytes: int = MAX_HEADER_BYTES
    keep_alive_secs: float = KEEP_ALIVE_SECS


class _CoalescingTransport:
    """A transport whose writes made in one event-loop iteration leave in one send(): uvicorn
    writes a response's head and its body separately, and each write is a syscall and a TCP
    segment of its own (TCP_NODELAY). Flushed at the end of the iteration or before close;
    everything else is the real transport's."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes | bytearray | memoryview] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on the request line + headers: on their size
    (httptools has none) and on the time a peer may take to send them (uvicorn times out idle
    keep-alive connections only after a first response, so a connection that never sends a
    whole request head would be held for ever)."""

    max_header_bytes = MAX_HEADER_BYTES
    _header_bytes = 0
    _headers_too_large = False
    _header_timer: asyncio.TimerHandle | None = None
    _in_head = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = _CoalescingTransport(transport, asyncio.get_running_loop())
        super().connection_made(coalescing)  # type: ignore[arg-type]
        self._in_head = False
        self._arm_header_timer()  # a connection that never sends anything

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Armed only when a request head is still incomplete after the bytes at hand: the common
        # case (a whole head in one read) costs no timer.
        if self._in_head:
            self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            # Same bound as an idle keep-alive connection: --http-keep-alive-secs.
            self._header_timer = self.loop.call_later(self.timeout_keep_alive, self._header_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.max_header_bytes:
            self._headers_too_large = True
            # httptools stops parsing and uvicorn answers through send_400_response.
            raise ValueError("request headers too large")

    def send_400_response(self, msg: str) -> None:
        if not self._headers_too_large:
            super().send_400_response(msg)
            return
        body = error_body(
            f"request line and headers exceed {self.max_header_bytes} bytes "
            f"(--http-max-header-bytes)"
        )
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Made with proto IPPROTO_TCP, as asyncio's own create_server does:
    asyncio sets TCP_NODELAY on accepted sockets only then, and without it Nagle's algorithm
    holds a response's body behind its headers for the client's delayed ACK (~40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpServer:
    """Start/stop of the HTTP listener. `port` is the bound one after start (0 asks for any)."""

    def __init__(
        self,
        app: AsgiApp,
        host: str,
        port: int,
        limits: HttpLimits,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        protocol = type(
            "BoundedProtocol", (_BoundedProtocol,), {"max_header_bytes": limits.max_header_bytes}
        )
        self._config = uvicorn.Config(
            app,
            http=protocol,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,  # no X-Forwarded-* rewriting middleware on the request path
            # uvicorn refuses at `>= limit`, counting the asking connection: +1 serves exactly
            # max_connections connections (and as many requests in progress).
            limit_concurrency=limits.max_connections + 1,
            timeout_keep_alive=max(1, round(limits.keep_alive_secs)),
            backlog=BACKLOG,
            ssl_context_factory=(lambda _c, _d: ssl_context) if ssl_context else None,
        )
        self._server: uvicorn.Server | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind and listen. OSError when the address is taken or unavailable."""
        sock = _listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._config.load()
        server = uvicorn.Server(self._config)
        # What uvicorn.Server.serve() does, less its signal handlers: the app owns SIGTERM.
        server.lifespan = self._config.lifespan_class(self._config)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        self._server = server
        # uvicorn's once-a-second tick (the Date header, its exit flag).
        self._ticker = asyncio.create_task(server.main_loop())

    async def stop(self, grace: float) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        if self._ticker is not None:
            await self._ticker
        # uvicorn closes the listener, then waits for connections and tasks up to the grace.
        server.config.timeout_graceful_shutdown = grace  # type: ignore[assignment]
        await server.shutdown()
