"""SIGTERM / SIGINT: the server stops accepting, finishes the requests in flight, exits 0.

Each test starts its own server (a stopped server cannot be shared) over one small repository
holding a model slow enough that requests queue up behind its single instance.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from queue import Queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from pipeserve.api.generated import health_pb2, health_pb2_grpc
from tests import onnx_models as om
from tests.e2e.lifecycle import (
    SLOW_CONFIG,
    client_for,
    factor_of,
    fire_slow_requests,
    place_model,
    rpc_error,
    slow_input,
    slow_model,
    wait_for_queue,
)
from tests.e2e.server import ServerProcess, wait_until

# The slow model takes a few ms per request (it computes on every core): 64 of them keep the
# queue deep for a few hundred ms, so waiting for half of them queued cannot miss the moment.
IN_FLIGHT = 64
# Generous, so that a loaded CI machine still drains everything in flight before the deadline.
DRAIN_SECS = "60"


@pytest.fixture(scope="module")
def shutdown_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("shutdown_repo")
    place_model(repo, "slow", {1: slow_model()}, SLOW_CONFIG)
    place_model(repo, "quick", {1: om.scale(2.0)})
    return repo


def exit_code(server: ServerProcess, timeout: float = 60) -> int:
    """Wait for the signalled server to exit by itself (a second signal would not be a test of
    the first one)."""
    code = server.proc.wait(timeout)
    server.stop()  # already exited: only collects the log reader
    return code


def assert_refuses_new_connections(server: ServerProcess) -> None:
    """Soon after the signal, a new TCP connection is refused while the server still drains."""

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", server.grpc_port), timeout=2).close()
        except (ConnectionRefusedError, ConnectionResetError):
            return True
        return False

    assert wait_until(refused, timeout=10, interval=0.01), "still accepting connections"
    assert server.proc.poll() is None, "the server had already exited: nothing was in flight"
    # A gRPC client with a connection of its own (no shared subchannel) is refused too.
    fresh = grpcclient.InferenceServerClient(
        server.url, channel_args=[("grpc.use_local_subchannel_pool", 1)]
    )
    assert rpc_error(fresh.is_server_live).status() == "StatusCode.UNAVAILABLE"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_requests_in_flight_then_exits_zero(
    start_server: Callable[..., ServerProcess], shutdown_repo: Path, sig: signal.Signals
) -> None:
    server = start_server(shutdown_repo, "--exit-timeout-secs", DRAIN_SECS)
    client = client_for(server)
    assert factor_of(client, "quick") == 2.0
    futures = fire_slow_requests(client, "slow", IN_FLIGHT)
    wait_for_queue(server, "slow", IN_FLIGHT // 2)  # still queued when the signal comes

    server.terminate(sig)
    assert_refuses_new_connections(server)

    outputs = [f.result(timeout=60) for f in futures]  # raises if any request failed
    assert len(outputs) == IN_FLIGHT
    assert all(o.shape == (1, 4) for o in outputs)
    assert all(np.array_equal(o, outputs[0]) for o in outputs)
    assert exit_code(server) == 0, server.output()
    assert "pipeserve stopped" in server.output()


def test_sigterm_completes_stream_requests_in_flight(
    start_server: Callable[..., ServerProcess], shutdown_repo: Path
) -> None:
    server = start_server(shutdown_repo, "--exit-timeout-secs", DRAIN_SECS)
    client = client_for(server)
    results: Queue[tuple[object, object]] = Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for i in range(IN_FLIGHT):
        client.async_stream_infer("slow", [slow_input()], request_id=str(i))
    wait_for_queue(server, "slow", IN_FLIGHT // 2)

    server.terminate(signal.SIGTERM)
    replies = [results.get(timeout=60) for _ in range(IN_FLIGHT)]
    client.stop_stream()
    errors = [error for _, error in replies if error is not None]
    assert not errors, errors[:3]
    ids = sorted(int(result.get_response().id) for result, _ in replies)  # type: ignore[attr-defined]
    assert ids == list(range(IN_FLIGHT))
    assert exit_code(server) == 0, server.output()


def test_idle_server_stops_promptly_with_exit_zero(
    start_server: Callable[..., ServerProcess], shutdown_repo: Path
) -> None:
    server = start_server(shutdown_repo)
    assert factor_of(client_for(server), "quick") == 2.0
    started = time.monotonic()
    assert server.stop() == 0, server.output()
    # Nothing in flight: the drain must not wait out --exit-timeout-secs (10 s in the harness).
    assert time.monotonic() - started < 8, server.output()
    assert "pipeserve stopped" in server.output()


def test_exit_timeout_bounds_the_drain(
    start_server: Callable[..., ServerProcess], shutdown_repo: Path
) -> None:
    """With far more queued work than --exit-timeout-secs allows, the server exits 0 soon after
    the timeout; the requests it gives up on fail (UNAVAILABLE or CANCELLED) instead of hanging."""
    server = start_server(shutdown_repo, "--exit-timeout-secs", "0.5")
    client = client_for(server)
    # A few ms each on two cores (the slow model is compute-bound: it gets both): 200 still
    # queued at the signal are a second or more of work, twice the timeout at least.
    queued = 400
    futures = fire_slow_requests(client, "slow", queued)
    wait_for_queue(server, "slow", queued // 2)
    started = time.monotonic()
    server.terminate(signal.SIGTERM)
    code = exit_code(server)
    elapsed = time.monotonic() - started
    assert code == 0, server.output()
    errors = [e for e in (f.exception(timeout=30) for f in futures) if e is not None]
    assert errors, f"all {queued} requests finished: the queue was too short to test the timeout"
    statuses = {e.status() for e in errors}  # type: ignore[attr-defined]
    assert statuses <= {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}, statuses
    assert elapsed < 8, f"exit took {elapsed:.1f}s\n" + server.output()


def test_health_watch_sees_not_serving_then_ends_without_holding_the_drain(
    start_server: Callable[..., ServerProcess], shutdown_repo: Path
) -> None:
    server = start_server(shutdown_repo, "--exit-timeout-secs", DRAIN_SECS)
    channel = grpc.insecure_channel(server.url)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    seen: Queue[object] = Queue()

    def read() -> None:
        try:
            for response in watch:
                seen.put(response.status)
            seen.put("ended")
        except grpc.RpcError as exc:
            seen.put(exc.code())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen.get(timeout=10) == health_pb2.HealthCheckResponse.SERVING
    started = time.monotonic()
    server.terminate(signal.SIGTERM)
    assert seen.get(timeout=10) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert seen.get(timeout=10) == "ended"
    assert exit_code(server) == 0, server.output()
    # The open watch did not make the drain wait out --exit-timeout-secs (60 s).
    assert time.monotonic() - started < 10, server.output()
    channel.close()
