"""The two gRPC front ends (pipeserve's own HTTP/2 transport, the default, and grpc.aio) serve
the same protocol: same answers, same errors, streams, statistics, health. Plus what only the
transport sees: compressed requests and a client that does not speak HTTP/2."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pipeserve.api.generated import health_pb2, health_pb2_grpc
from tests.e2e.server import ServerProcess
from tests.e2e.test_stream_and_aio import add_sub_inputs


def _exchange(url: str) -> dict[str, object]:
    """One of everything a client does; the answers, comparable across servers."""
    client = grpcclient.InferenceServerClient(url)
    try:
        inputs, expected = add_sub_inputs(3, seed=7)
        result = client.infer("add_sub", inputs, request_id="r1")
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-6)
        with pytest.raises(InferenceServerException) as unknown:
            client.infer("nope", inputs)
        results: list[grpcclient.InferResult] = []
        client.start_stream(callback=lambda result, error: results.append(error or result))
        for seed in range(4):
            client.async_stream_infer("add_sub", add_sub_inputs(1, seed)[0])
        client.stop_stream()  # waits for the answers
        stats = client.get_inference_statistics("add_sub").model_stats[0]
        with grpc.insecure_channel(url) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        return {
            "output": result.as_numpy("OUTPUT1").tolist(),
            "id": result.get_response().id,
            "unknown": (unknown.value.status(), unknown.value.message()),
            "stream": sorted(r.as_numpy("OUTPUT0").tolist() for r in results),
            "inference_count": stats.inference_count,
            "health": health.status,
        }
    finally:
        client.close()


def test_both_front_ends_answer_alike(repo, start_server: Callable[..., ServerProcess]) -> None:  # type: ignore[no-untyped-def]
    own = start_server(repo)
    reference = start_server(repo, "--grpc-frontend", "grpcio")
    answers = _exchange(own.url)
    assert answers == _exchange(reference.url)
    assert answers["unknown"] == (
        "StatusCode.NOT_FOUND",
        "Request for unknown model: 'nope' is not found",
    )
    assert answers["inference_count"] == 7 and len(answers["stream"]) == 4  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_served(server: ServerProcess, algorithm: str) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    try:
        inputs, expected = add_sub_inputs(8, seed=1)
        result = client.infer("add_sub", inputs, compression_algorithm=algorithm)
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-6)
    finally:
        client.close()


def test_http1_client_on_the_grpc_port_is_told_what_to_use(server: ServerProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{server.url}/v2/health/ready", timeout=5)
    assert err.value.code == 505
    assert "gRPC" in err.value.read().decode()
    client = grpcclient.InferenceServerClient(server.url)  # and the server is unharmed
    assert client.is_server_ready()
    client.close()
