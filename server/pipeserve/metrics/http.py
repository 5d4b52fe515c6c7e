"""The /metrics endpoint: Prometheus text exposition (format 0.0.4), an ASGI callable on the
same HTTP listener as the REST API (uvicorn with httptools, api/http/listener.py).

Not prometheus_client's own server: its text writer appends `_total` to every counter, and
Triton's counters (`nv_inference_request_success`) must keep their bare names for existing
dashboards. `render_metrics` writes `TritonCounterFamily` itself and hands every other family to
prometheus_client's writer unchanged.

Rendering runs on a worker thread: a scrape snapshots every model under its lock and may call NVML,
and the event loop also serves inference.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from pipeserve.api.http.listener import HttpLimits, HttpServer, Receive, Scope, Send
from pipeserve.metrics.recorder import Labels, TritonCounterFamily, escape_label_value

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Scrapers are few; Prometheus keeps one connection open between scrapes.
_LIMITS = HttpLimits(max_connections=64, max_header_bytes=16 * 1024, keep_alive_secs=300.0)


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


class MetricsApp:
    """The ASGI callable of the /metrics endpoint: GET and HEAD of /metrics, nothing else."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        if headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
            await _respond(send, 400, b"/metrics takes no request body\n", close=True)
        elif scope["path"] != "/metrics":
            await _respond(send, 404, b"not found: metrics are served at /metrics\n")
        elif scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"/metrics answers GET and HEAD only\n")
        else:
            # uvicorn leaves the body out of a HEAD answer and keeps its Content-Length.
            body = await asyncio.to_thread(render_metrics, self._registry)
            await _respond(send, 200, body)


async def _respond(send: Send, status: int, body: bytes, *, close: bool = False) -> None:
    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 405:
        headers.append((b"allow", b"GET, HEAD"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class MetricsServer:
    """A running /metrics endpoint on the same HTTP listener as the REST API (uvicorn). `port`
    is the bound port (useful when started on port 0)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        context: ssl.SSLContext | None = None,
    ) -> None:
        # With `context` every connection speaks TLS (https).
        self._listener = HttpServer(MetricsApp(registry), host, port, _LIMITS, context)

    @property
    def port(self) -> int:
        return self._listener.port

    async def start(self) -> None:
        await self._listener.start()

    async def close(self) -> None:
        """Stop listening and drop open keep-alive connections. Idempotent."""
        await self._listener.stop(grace=1.0)


async def start_metrics_server(
    registry: CollectorRegistry, host: str, port: int, context: ssl.SSLContext | None = None
) -> MetricsServer:
    """Serve GET /metrics for `registry` on host:port (port 0 picks a free port; read `.port`),
    over https when `context` is given."""
    server = MetricsServer(registry, host, port, context)
    await server.start()
    return server
