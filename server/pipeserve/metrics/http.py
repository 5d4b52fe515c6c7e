"""The /metrics endpoint: Prometheus text exposition (format 0.0.4) over a small asyncio HTTP/1.1
server.

Not prometheus_client's own server: its text writer appends `_total` to every counter, and
Triton's counters (`nv_inference_request_success`) must keep their bare names for existing
dashboards. `render_metrics` writes `TritonCounterFamily` itself and hands every other family to
prometheus_client's writer unchanged.

Rendering runs on a worker thread: a scrape snapshots every model under its lock and may call NVML,
and the event loop also serves inference.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from pipeserve.metrics.recorder import Labels, TritonCounterFamily, escape_label_value

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_HEAD_BYTES = 16 * 1024
_MAX_CONNECTIONS = 64
_IDLE_TIMEOUT_S = 300.0  # Prometheus keeps one connection open between scrapes
_HANDSHAKE_TIMEOUT_S = 10.0  # a TLS client that has not finished its handshake by then is dropped


class _One:
    """A collector that yields one family, to reuse prometheus_client's writer per family."""

    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> Iterable[Metric]:
        return (self._family,)


def render_metrics(registry: CollectorRegistry) -> bytes:
    """Every family of `registry` in the Prometheus text format, Triton's counters unsuffixed.

    Plain families (counters, gauges, histograms without timestamps, exemplars or `_created`
    samples: everything pipeserve's collectors make) are written here, several times faster than
    prometheus_client's per-sample writer; any other family goes through that writer unchanged.
    """
    out: list[str] = []
    for family in registry.collect():
        if _plain(family):
            _write_family(family, out)
        else:
            out.append(generate_latest(_One(family)).decode())  # type: ignore[arg-type]
    return "".join(out).encode()


def _plain(family: Metric) -> bool:
    if family.type not in ("counter", "gauge", "histogram"):
        return False
    return all(
        s.timestamp is None
        and s.exemplar is None
        and s.native_histogram is None
        and not s.name.endswith("_created")
        for s in family.samples
    )


def _write_family(family: Metric, out: list[str]) -> None:
    name = family.name
    if family.type == "counter" and not isinstance(family, TritonCounterFamily):
        name += "_total"  # the 0.0.4 text format names a counter by its sample name
    out.append(f"# HELP {name} {_escape_help(family.documentation)}\n")
    out.append(f"# TYPE {name} {family.type}\n")
    for s in family.samples:
        labels = s.labels
        if labels:
            text = labels.text if isinstance(labels, Labels) else _label_text(labels)
            out.append(f"{s.name}{{{text}}} {_format_value(s.value)}\n")
        else:
            out.append(f"{s.name} {_format_value(s.value)}\n")


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isfinite(value):
        return repr(float(value))
    return floatToGoString(value)  # +Inf, -Inf, NaN


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _label_text(labels: dict[str, str]) -> str:
    return ",".join([f'{k}="{escape_label_value(v)}"' for k, v in sorted(labels.items())])


class MetricsServer:
    """A running /metrics endpoint. `port` is the bound port (useful when started on port 0)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.host = ""
        self.port = 0

    async def start(self, host: str, port: int, context: ssl.SSLContext | None = None) -> None:
        """Listen on host:port; with `context` every connection speaks TLS (https)."""
        self._server = await asyncio.start_server(
            self.handle,
            host,
            port,
            limit=_MAX_HEAD_BYTES,
            ssl=context,
            ssl_handshake_timeout=_HANDSHAKE_TIMEOUT_S if context is not None else None,
        )
        self.host, self.port = self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        """Stop listening and drop open keep-alive connections. Idempotent."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._connections):
            writer.close()
        await self._server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= _MAX_CONNECTIONS:
            writer.close()
            return
        self._connections.add(writer)
        try:
            while await self._serve_one(reader, writer):
                pass
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            TimeoutError,
            ssl.SSLError,  # a TLS client that breaks the session mid-request
        ):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True when the connection stays open for another."""
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _IDLE_TIMEOUT_S)
        lines = head.decode("latin-1").split("\r\n")
        request = lines[0].split()
        if len(request) != 3 or not request[2].startswith("HTTP/1."):
            await _respond(writer, 400, b"malformed HTTP request line\n", close=True)
            return False
        method, target, version = request
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip().lower()
        keep_alive = (
            headers.get("connection") != "close"
            if version == "HTTP/1.1"
            else headers.get("connection") == "keep-alive"
        )
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            await _respond(writer, 400, b"/metrics takes no request body\n", close=True)
            return False
        path = target.split("?", 1)[0]
        if path != "/metrics":
            await _respond(writer, 404, b"not found: metrics are served at /metrics\n", keep_alive)
        elif method not in ("GET", "HEAD"):
            await _respond(writer, 405, b"/metrics answers GET and HEAD only\n", keep_alive)
        else:
            body = await asyncio.to_thread(render_metrics, self._registry)
            await _respond(writer, 200, body, keep_alive, head_only=method == "HEAD")
        return keep_alive


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    keep_alive: bool = False,
    *,
    close: bool = False,
    head_only: bool = False,
) -> None:
    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    headers = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        f"Connection: {'keep-alive' if keep_alive and not close else 'close'}",
    ]
    if status == 405:
        headers.append("Allow: GET, HEAD")
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(body)
    await writer.drain()


async def start_metrics_server(
    registry: CollectorRegistry, host: str, port: int, context: ssl.SSLContext | None = None
) -> MetricsServer:
    """Serve GET /metrics for `registry` on host:port (port 0 picks a free port; read `.port`),
    over https when `context` is given."""
    server = MetricsServer(registry)
    await server.start(host, port, context)
    return server
