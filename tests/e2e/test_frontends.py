"""The two gRPC front ends (pipeserve's own HTTP/2 transport, the default, and grpc.aio) serve
the same protocol: same answers, same errors, streams, statistics, health; so do the two event
loops (uvloop, the default where installed, and asyncio's own). Plus what only the transport
sees: compressed requests and a client that does not speak HTTP/2."""

from __future__ import annotations

import json
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


def _rest_infer(server: ServerProcess) -> object:
    body = {"inputs": [
        {"name": n, "shape": [1, 16], "datatype": "FP32", "data": [float(i) for i in range(16)]}
        for n in ("INPUT0", "INPUT1")
    ]}  # fmt: skip
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/add_sub/infer", data=json.dumps(body).encode()
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())["outputs"]


def test_both_event_loops_answer_alike(repo, start_server: Callable[..., ServerProcess]) -> None:  # type: ignore[no-untyped-def]
    default = start_server(repo)
    standard = start_server(repo, "--event-loop", "asyncio")
    assert "event loop: uvloop" in default.output()
    assert "event loop: asyncio" in standard.output()
    assert _exchange(default.url) == _exchange(standard.url)
    outputs = _rest_infer(default)
    assert outputs == _rest_infer(standard)
    assert outputs[0]["data"] == [2.0 * i for i in range(16)]  # type: ignore[index]


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


# ---- every RPC, on both front ends ---------------------------------------------------------------


def _every_rpc(url: str) -> dict[str, object]:
    """Each of the 20 RPCs of inference.GRPCInferenceService (tritonclient's own descriptors),
    called with a valid and, where it means something, an invalid request; the answers as
    comparable values (timings left out)."""
    from google.protobuf import text_format
    from tritonclient.grpc import service_pb2 as spb
    from tritonclient.grpc import service_pb2_grpc as spb_grpc

    service = spb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    out: dict[str, object] = {}
    with grpc.insecure_channel(url) as channel:
        stub = spb_grpc.GRPCInferenceServiceStub(channel)

        def call(key: str, method: str, request: object) -> None:
            try:
                reply = getattr(stub, method)(request, timeout=30)
            except grpc.RpcError as exc:
                out[key] = (exc.code().name, exc.details())
            else:
                for stats in getattr(reply, "model_stats", ()):
                    stats.last_inference = 0
                    for field in stats.inference_stats.DESCRIPTOR.fields:
                        getattr(stats.inference_stats, field.name).ns = 0
                    del stats.batch_stats[:]
                out[key] = ("OK", text_format.MessageToString(reply, as_one_line=True))

        call("ServerLive", "ServerLive", spb.ServerLiveRequest())
        call("ServerReady", "ServerReady", spb.ServerReadyRequest())
        call("ModelReady", "ModelReady", spb.ModelReadyRequest(name="add_sub"))
        call("ModelReady/unknown", "ModelReady", spb.ModelReadyRequest(name="nope"))
        call("ServerMetadata", "ServerMetadata", spb.ServerMetadataRequest())
        call("ModelMetadata", "ModelMetadata", spb.ModelMetadataRequest(name="add_sub"))
        call("ModelMetadata/unknown", "ModelMetadata", spb.ModelMetadataRequest(name="nope"))
        request = spb.ModelInferRequest(model_name="add_sub", id="x")
        for name in ("INPUT0", "INPUT1"):
            request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
            request.raw_input_contents.append(np.arange(16, dtype=np.float32).tobytes())
        call("ModelInfer", "ModelInfer", request)
        bad = spb.ModelInferRequest(model_name="add_sub")
        bad.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
        call("ModelInfer/bad", "ModelInfer", bad)
        # Refused at validation and at lookup: on the own transport both leave before queueing.
        unknown_output = spb.ModelInferRequest()
        unknown_output.CopyFrom(request)
        unknown_output.outputs.add(name="NOPE")
        call("ModelInfer/unknown output", "ModelInfer", unknown_output)
        call("ModelInfer/unknown model", "ModelInfer", spb.ModelInferRequest(model_name="nope"))
        unknown_model = spb.ModelInferRequest(model_name="nope", model_version="3", id="u")
        stream = [request, bad, unknown_model, unknown_output, request]
        replies = stub.ModelStreamInfer(iter(stream), timeout=30)
        # Whole answers, compared field by field (the own transport writes their bytes itself).
        out["ModelStreamInfer"] = sorted(
            text_format.MessageToString(r, as_one_line=True) for r in replies
        )
        call("ModelConfig", "ModelConfig", spb.ModelConfigRequest(name="add_sub"))
        call("ModelStatistics", "ModelStatistics", spb.ModelStatisticsRequest(name="add_sub"))
        call("RepositoryIndex", "RepositoryIndex", spb.RepositoryIndexRequest())
        call(
            "RepositoryModelUnload",
            "RepositoryModelUnload",
            spb.RepositoryModelUnloadRequest(model_name="add_sub_auto"),
        )
        call("RepositoryIndex/after unload", "RepositoryIndex", spb.RepositoryIndexRequest())
        call(
            "RepositoryModelLoad",
            "RepositoryModelLoad",
            spb.RepositoryModelLoadRequest(model_name="add_sub_auto"),
        )
        call(
            "RepositoryModelLoad/unknown parameter",
            "RepositoryModelLoad",
            spb.RepositoryModelLoadRequest(
                model_name="add_sub_auto",
                parameters={"colour": spb.ModelRepositoryParameter(string_param="blue")},
            ),
        )
        for method in service.methods:
            if "SharedMemory" in method.name or method.name in ("TraceSetting", "LogSettings"):
                request_class = getattr(spb, method.input_type.name)
                call(method.name, method.name, request_class())
    out["methods"] = sorted(m.name for m in service.methods)
    return out


def test_every_rpc_answers_alike_on_both_front_ends(
    repo, start_server: Callable[..., ServerProcess]
) -> None:  # type: ignore[no-untyped-def]
    explicit = ("--model-control-mode", "explicit", "--load-model", "*")
    own = _every_rpc(start_server(repo, *explicit).url)
    reference = _every_rpc(start_server(repo, *explicit, "--grpc-frontend", "grpcio").url)
    assert own == reference
    assert len(own["methods"]) == 20  # type: ignore[arg-type]
    assert own["ModelInfer"][0] == "OK"  # type: ignore[index]
    assert own["ModelInfer/bad"][0] == "INVALID_ARGUMENT"  # type: ignore[index]
    assert own["ModelInfer/unknown output"][0] == "INVALID_ARGUMENT"  # type: ignore[index]
    assert own["ModelInfer/unknown model"][0] == "NOT_FOUND"  # type: ignore[index]
    assert own["RepositoryModelLoad"] == ("OK", "")
    assert own["SystemSharedMemoryStatus"][0] == "UNIMPLEMENTED"  # type: ignore[index]
