"""A gRPC server on asyncio streams, with grpc.aio.Server's surface where pipeserve uses it.

Servicers are registered through the generated `add_*Servicer_to_server(servicer, server)`
functions exactly as with grpc.aio; `add_insecure_port` (or `add_secure_port` with an
`ssl.SSLContext` offering ALPN h2) binds at once (so the port is known before start), `start`
accepts, `stop(grace)` drains: listeners close, every connection gets GOAWAY, calls in flight
have `grace` seconds, then are cancelled with UNAVAILABLE. What peers can make it hold is bounded
by the `H2Limits` it is given (limits.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Iterable

import grpc

from pipeserve.api.context import DirectStream, DirectUnary
from pipeserve.api.h2 import frames as f
from pipeserve.api.h2 import rules
from pipeserve.api.h2.calls import _SHUTDOWN, Call, Limits
from pipeserve.api.h2.connection import CallSink, Connection, Stream
from pipeserve.api.h2.limits import H2Limits
from pipeserve.api.tls import HANDSHAKE_TIMEOUT_S

log = logging.getLogger(__name__)

_BACKLOG = 1024
# Seconds a refused connection may take to read its GOAWAY.
_LINGER = 2.0


class _Answered:
    """The sink of a stream that was answered at once (bad request, unknown method)."""

    def data(self, payload: memoryview, end: bool) -> None:
        pass

    def reset(self) -> None:
        pass


_ANSWERED = _Answered()


class _Refused(asyncio.Protocol):
    """A connection past the server's connection cap: told why (GOAWAY), then closed. Its input
    is read and dropped until then: closing with unread input would reset the connection and
    could destroy the GOAWAY before the client reads it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        log.warning("connection refused: the server holds its limit of %d", self.limit)
        message = f"server at its limit of {self.limit} connections".encode()
        out: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's: no subclass
        out.write(f.settings({}) + f.goaway(0, f.REFUSED_STREAM, message))
        if out.can_write_eof():
            out.write_eof()
            asyncio.get_running_loop().call_later(_LINGER, out.abort)
        else:
            out.close()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client read it and closed: close too


def _is_grpc(content_type: bytes) -> bool:
    """application/grpc, or with a `+format` or `;parameters` suffix (gRPC over HTTP/2)."""
    return content_type.startswith(b"application/grpc") and content_type[16:17] in (
        b"",
        b"+",
        b";",
    )


class H2Server:
    def __init__(self, max_receive: int, max_send: int, limits: H2Limits | None = None) -> None:
        self.limits = limits or H2Limits()
        self._limits = Limits(
            max_receive,
            max_send,
            self.limits.max_inflight_request_bytes,
            self.limits.max_decompressed_bytes,
        )
        self._methods: dict[bytes, grpc.RpcMethodHandler] = {}
        self._direct: dict[bytes, DirectUnary | DirectStream] = {}
        self._sockets: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        self._servers: list[asyncio.Server] = []
        self._connections: set[Connection] = set()
        self._calls: set[Call] = set()
        self._idle: asyncio.Event | None = None

    # ---- grpc.aio.Server surface ----------------------------------------------------------------

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """Ignored: generated code registers the same methods through
        add_registered_method_handlers too (grpcio >= 1.63; gen_proto.py pins grpcio-tools)."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}".encode()] = handler

    def add_direct(self, service: str, name: str, handler: DirectUnary | DirectStream) -> None:
        """Runs method `name` (registered as above first) through `handler`, with no task per
        call: a unary method's handler is an api.context.DirectUnary (it parses the request's
        bytes and gives the response's), a bidirectional streaming method's a DirectStream (the
        same for each message; a call with compressed messages runs the registered handler)."""
        path = f"/{service}/{name}".encode()
        method = self._methods[path]
        if method.request_streaming != method.response_streaming:
            raise ValueError(f"{name}: direct handlers serve unary or bidirectional methods")
        self._direct[path] = handler

    def add_insecure_port(self, address: str) -> int:
        """Binds `host:port` (`[v6]:port` too; port 0 picks one) on every address the host
        resolves to; returns the port. Raises OSError when nothing could be bound."""
        return self._bind(address, None)

    def add_secure_port(self, address: str, context: ssl.SSLContext) -> int:
        """As add_insecure_port, every connection speaking TLS with `context`."""
        return self._bind(address, context)

    def _bind(self, address: str, context: ssl.SSLContext | None) -> int:
        host, _, port_text = address.rpartition(":")
        host = host.strip("[]") or None  # type: ignore[assignment]
        port = int(port_text)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # Dual-stack "::" alone serves IPv4 too; next to an IPv4 entry each keeps its family.
        v6only = any(info[0] == socket.AF_INET for info in infos)
        bound: list[socket.socket] = []
        error: OSError | None = None
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
                if port == 0 and bound:  # the other families follow the first pick
                    addr = (addr[0], bound[0].getsockname()[1], *addr[2:])
                sock.bind(addr)
                sock.listen(_BACKLOG)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            bound.append(sock)
        if not bound:
            raise error or OSError(f"cannot bind {address}")
        self._sockets.extend((sock, context) for sock in bound)
        return int(bound[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock, context in self._sockets:
            if context is None:
                server = await loop.create_server(self._connection, sock=sock)
            else:
                server = await loop.create_server(
                    self._connection,
                    sock=sock,
                    ssl=context,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                )
            self._servers.append(server)

    async def stop(self, grace: float | None) -> None:
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.goaway()
        if self._calls and grace:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                log.warning("%d calls still running after %gs: cancelled", len(self._calls), grace)
        for call in list(self._calls):
            call.cancel(_SHUTDOWN)
        await asyncio.sleep(0)  # the cancelled handlers write their status
        for connection in list(self._connections):
            connection.abort(f.NO_ERROR, "server stopped", linger=False)

    # ---- Endpoint (used by connections) ---------------------------------------------------------

    def _connection(self) -> asyncio.Protocol:
        if len(self._connections) >= self.limits.max_connections:
            return _Refused(self.limits.max_connections)
        connection = Connection(self, self.limits)
        self._connections.add(connection)
        return connection

    def inflight_request_bytes(self) -> int:
        """Request bytes held by calls in progress (all connections)."""
        return self._limits.inflight

    def connection_count(self) -> int:
        return len(self._connections)

    def call_count(self) -> int:
        """Calls registered and not finished (all connections)."""
        return len(self._calls)

    def connection_closed(self, connection: Connection) -> None:
        self._connections.discard(connection)

    def open_call(self, stream: Stream, headers: dict[bytes, bytes]) -> CallSink:
        path = headers[b":path"]
        method_name = headers[b":method"]
        if method_name != b"POST":
            # As grpc-core answers it: the stream is reset with INTERNAL_ERROR.
            raise rules.StreamError(
                stream.id, f.INTERNAL_ERROR, f"gRPC needs POST, not {method_name!r}"
            )
        content_type = headers.get(b"content-type", b"")
        if not _is_grpc(content_type):
            stream.respond_only(
                f.trailers(
                    grpc.StatusCode.INTERNAL.value[0],
                    f"gRPC needs content-type application/grpc, not {content_type!r}",
                ),
                f.UNSUPPORTED_MEDIA_TYPE,
            )
            return _ANSWERED
        method = self._methods.get(path)
        if method is None:
            stream.respond_only(
                f.trailers(
                    grpc.StatusCode.UNIMPLEMENTED.value[0],
                    f"Method not found: {path.decode('latin-1')}",
                )
            )
            return _ANSWERED
        call = Call(stream, method, headers, self._limits, self._call_done, self._direct.get(path))
        self._calls.add(call)
        call.start()
        return call

    def _call_done(self, call: Call) -> None:
        self._calls.discard(call)
        if not self._calls and self._idle is not None:
            self._idle.set()
