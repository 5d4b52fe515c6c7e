"""render_metrics and the /metrics server, over real sockets on port 0."""

from __future__ import annotations

import asyncio
import http.client
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeserve.metrics.http import CONTENT_TYPE, render_metrics, start_metrics_server
from pipeserve.metrics.recorder import ServerMetrics
from pipeserve.observers import ExecutionTimings


def registry_with_model(name: str = "m") -> tuple[CollectorRegistry, ServerMetrics]:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, detect_gpus=False)
    m = metrics.bind_model(name, 1)
    execution = ExecutionTimings(1, 1_000, 1_000_000, 1_000)
    m.execution_done(execution)
    m.requests_succeeded(execution, [(1, 2_000_000, 100_000)])
    return registry, metrics


def test_label_values_are_escaped_and_parse_back() -> None:
    odd = 'we"ird\\name\nx'
    registry, _ = registry_with_model(odd)
    text = render_metrics(registry).decode()
    assert 'nv_inference_request_success{model="we\\"ird\\\\name\\nx",version="1"} 1\n' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    sample = families["nv_inference_request_success"].samples[0]
    assert sample.labels == {"model": odd, "version": "1"} and sample.value == 1


def test_other_collectors_keep_prometheus_client_naming() -> None:
    registry, _ = registry_with_model()
    Gauge("extra_things", "an unrelated gauge", registry=registry).set(7)
    Counter("extra_events", "an unrelated counter", registry=registry).inc(3)
    text = render_metrics(registry).decode()
    assert "# TYPE extra_things gauge\nextra_things 7.0\n" in text
    assert "# TYPE process_cpu_seconds_total counter\n" in text
    assert "# TYPE extra_events_total counter\nextra_events_total 3.0\n" in text
    assert "extra_events_created " in text  # written by prometheus_client's own writer


def test_everything_but_triton_counters_reads_back_as_prometheus_clients_writer_has_it() -> None:
    """The fast writer and generate_latest agree on every sample of every other family."""
    registry, metrics = registry_with_model()
    metrics.bind_model("m", 1).stage_done(0, "cpu", 1_000_000, 5_000)
    metrics.observe_load("m", 1, 0.75)
    Histogram("extra_seconds", "an unrelated histogram", registry=registry).observe(0.3)

    def samples(text: str) -> set[tuple[str, tuple, float]]:
        return {
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for f in text_string_to_metric_families(text)
            if not f.name.startswith(("nv_inference_", "process_"))  # process values move
            for s in f.samples
        }

    ours = samples(render_metrics(registry).decode())
    theirs = samples(generate_latest(registry).decode())
    assert ours == theirs
    assert any(name == "pipeserve_stage_busy_seconds_total" for name, _, _ in ours)


def _get(port: int, method: str = "GET", path: str = "/metrics") -> tuple[int, Any, bytes]:
    """(status, headers looked up case-insensitively as HTTP defines them, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_server_answers_metrics_404_405_and_head() -> None:
    registry, _ = registry_with_model()

    async def scenario() -> None:
        server = await start_metrics_server(registry, "127.0.0.1", 0)
        assert server.port > 0
        try:
            status, headers, body = await asyncio.to_thread(_get, server.port)
            assert status == 200
            assert headers["Content-Type"] == CONTENT_TYPE
            assert int(headers["Content-Length"]) == len(body)
            assert b'nv_inference_request_success{model="m",version="1"} 1\n' in body

            status, _, body = await asyncio.to_thread(_get, server.port, "GET", "/")
            assert status == 404 and b"/metrics" in body
            status, headers, _ = await asyncio.to_thread(_get, server.port, "POST")
            assert status == 405 and headers["Allow"] == "GET, HEAD"
            status, headers, body = await asyncio.to_thread(_get, server.port, "HEAD")
            assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
            status, _, body = await asyncio.to_thread(_get, server.port, "GET", "/metrics?x=1")
            assert status == 200 and b"nv_inference_count" in body
        finally:
            await server.close()

    asyncio.run(scenario())


def test_keep_alive_serves_several_scrapes_on_one_connection_and_close_drops_it() -> None:
    registry, metrics = registry_with_model()

    def two_scrapes(port: int) -> tuple[bytes, bytes, http.client.HTTPConnection]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        first = conn.getresponse().read()
        metrics.bind_model("m", 1).request_failed("REJECTED", 1)
        conn.request("GET", "/metrics")
        second = conn.getresponse().read()
        return first, second, conn

    async def scenario() -> None:
        server = await start_metrics_server(registry, "127.0.0.1", 0)
        first, second, conn = await asyncio.to_thread(two_scrapes, server.port)
        assert b'reason="REJECTED",version="1"} 0\n' in first
        assert b'reason="REJECTED",version="1"} 1\n' in second
        await server.close()
        # The idle keep-alive connection was closed by the server, and nothing listens any more.
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            await asyncio.to_thread(_reuse, conn)
        conn.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.to_thread(_get, server.port)

    asyncio.run(scenario())


def _reuse(conn: http.client.HTTPConnection) -> None:
    conn.auto_open = 0  # fail instead of silently reconnecting
    conn.request("GET", "/metrics")
    conn.getresponse().read()


def test_malformed_request_gets_400() -> None:
    registry, _ = registry_with_model()

    async def scenario() -> None:
        server = await start_metrics_server(registry, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"NONSENSE\r\n\r\n")
            await writer.drain()
            answer = await reader.read()
            assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            writer.close()
        finally:
            await server.close()

    asyncio.run(scenario())
