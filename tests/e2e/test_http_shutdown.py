"""SIGTERM with HTTP keep-alive clients: idle keep-alive connections are closed, each busy one
is closed after its in-flight request is answered, new connections are refused, and every
accepted request gets its answer before the server exits 0."""

from __future__ import annotations

import http.client
import json
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests import onnx_models as om
from tests.e2e.lifecycle import SLOW_CONFIG, SLOW_FEATURES, place_model, slow_model, wait_for_queue
from tests.e2e.server import ServerProcess, wait_until

IN_FLIGHT = 6


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("http_shutdown_repo")
    place_model(repo, "slow", {1: slow_model()}, SLOW_CONFIG)
    place_model(repo, "quick", {1: om.scale(2.0)})
    return repo


BODY = json.dumps(
    {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1, SLOW_FEATURES],
                "data": np.linspace(-1, 1, SLOW_FEATURES).tolist(),
            }
        ]
    }
).encode()


def _slow_request(port: int) -> tuple[int, bool, list[float]]:
    """One keep-alive connection, one slow request: (status, whether the server then closed the
    connection, output). A request answered after the signal closes its connection at once,
    one answered just before leaves it idle until the drain closes it: both end closed."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        c.request("POST", "/v2/models/slow/infer", body=BODY)
        r = c.getresponse()
        doc = json.loads(r.read())
        # http.client drops the socket itself when the answer said `Connection: close`.
        closed = c.sock is None or c.sock.recv(1) == b""
        return r.status, closed, doc["outputs"][0]["data"]
    finally:
        c.close()


def _keep_alive_request(s: socket.socket) -> None:
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200 "), reply


def test_sigterm_drains_keep_alive_clients(
    start_server: Callable[..., ServerProcess], slow_repo: Path
) -> None:
    server = start_server(slow_repo, "--exit-timeout-secs", "60")
    idle = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
    _keep_alive_request(idle)  # answered, and the connection stays open (HTTP/1.1 keep-alive)

    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        futures = [pool.submit(_slow_request, server.http_port) for _ in range(IN_FLIGHT)]
        wait_for_queue(server, "slow", IN_FLIGHT - 2)  # accepted, queued behind one instance

        server.terminate(signal.SIGTERM)

        # The idle keep-alive connection is closed by the server...
        assert idle.recv(100) == b"", "idle keep-alive connection not closed"
        idle.close()

        # ...and new connections are refused while the requests in flight still run.
        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", server.http_port), timeout=2).close()
            except (ConnectionRefusedError, ConnectionResetError):
                return True
            return False

        assert wait_until(refused, timeout=10, interval=0.01), "still accepting connections"
        assert server.proc.poll() is None, "exited before answering what was in flight"

        results = [f.result(timeout=90) for f in futures]
    for status, closed, data in results:
        assert status == 200
        assert closed, "a keep-alive connection was left open"
        assert len(data) == 4 and data == results[0][2]
    assert server.proc.wait(60) == 0, server.output()
    assert "pipeserve stopped" in server.output()
