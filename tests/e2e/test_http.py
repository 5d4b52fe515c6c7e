"""The HTTP/REST endpoint through the real `tritonclient.http` (sync and aio): everything the
README shows for gRPC, binary and JSON tensors, compression both ways, errors with Triton's
statuses and the gRPC side's messages, and one set of statistics whichever protocol served."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models as om
from tests.e2e.lifecycle import place_model
from tests.e2e.server import ServerProcess


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(server.http_url, concurrency=4)
    yield c
    c.close()


def _add_sub_inputs(
    a: np.ndarray, b: np.ndarray, binary: bool = True, module=httpclient
) -> list[httpclient.InferInput]:
    inputs = [
        module.InferInput("INPUT0", list(a.shape), "FP32"),
        module.InferInput("INPUT1", list(b.shape), "FP32"),
    ]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    return inputs


A = np.arange(32, dtype=np.float32).reshape(2, 16)
B = np.full((2, 16), 0.5, dtype=np.float32)


def error_of(call, *args, **kwargs) -> InferenceServerException:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def test_health_and_readiness(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("add_sub")
    assert client.is_model_ready("add_sub", "1")
    assert not client.is_model_ready("add_sub", "7")
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("broken")


def test_server_and_model_metadata(client: httpclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta["name"] == "pipeserve"
    assert {"binary_tensor_data", "statistics", "model_repository"} <= set(meta["extensions"])
    model = client.get_model_metadata("add_sub")
    assert model["name"] == "add_sub" and model["versions"] == ["1"]
    assert model["platform"] == "onnxruntime_onnx"
    assert model["inputs"][0] == {"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}
    assert client.get_model_metadata("add_sub", "1") == model


def test_model_config_is_triton_json_with_numbers(client: httpclient.InferenceServerClient) -> None:
    config = client.get_model_config("add_sub")
    assert config["name"] == "add_sub" and config["max_batch_size"] == 8
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == [16]  # numbers, not protobuf-JSON strings
    auto = client.get_model_config("add_sub_auto")
    assert auto["max_batch_size"] == 4 and "dynamic_batching" in auto


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_binary_and_json_tensors(
    client: httpclient.InferenceServerClient, binary: bool
) -> None:
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=not binary),
    ]
    result = client.infer("add_sub", _add_sub_inputs(A, B, binary), outputs=outputs, request_id="7")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
    response = result.get_response()
    assert response["id"] == "7" and response["model_version"] == "1"


def test_infer_without_requested_outputs_returns_all(
    client: httpclient.InferenceServerClient,
) -> None:
    result = client.infer("add_sub", _add_sub_inputs(A, B))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
    only = client.infer(
        "add_sub", _add_sub_inputs(A, B), outputs=[httpclient.InferRequestedOutput("OUTPUT1")]
    )
    assert only.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(only.as_numpy("OUTPUT1"), A - B)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_and_int_models(client: httpclient.InferenceServerClient, binary: bool) -> None:
    text = np.array(["a", "héllo", ""], dtype=object)
    meta = client.get_model_metadata("strings")
    inp = httpclient.InferInput(meta["inputs"][0]["name"], [3], "BYTES")
    inp.set_data_from_numpy(text, binary_data=binary)
    out = client.infer("strings", [inp]).as_numpy(meta["outputs"][0]["name"])
    assert [v.decode() if isinstance(v, bytes) else v for v in out] == list(text)

    ints = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    meta = client.get_model_metadata("int_identity")
    inp = httpclient.InferInput(meta["inputs"][0]["name"], [2, 3], "INT32")
    inp.set_data_from_numpy(ints, binary_data=binary)
    out = client.infer("int_identity", [inp]).as_numpy(meta["outputs"][0]["name"])
    np.testing.assert_array_equal(out, ints)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_request_and_response_compression(
    client: httpclient.InferenceServerClient, algorithm: str
) -> None:
    result = client.infer(
        "add_sub",
        _add_sub_inputs(A, B),
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)


def test_async_infer(client: httpclient.InferenceServerClient) -> None:
    pending = [
        client.async_infer("add_sub", _add_sub_inputs(A * i, B), request_id=str(i))
        for i in range(8)
    ]
    for i, request in enumerate(pending):
        result = request.get_result()
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A * i + B)


def test_aio_client(server: ServerProcess) -> None:
    async def main() -> None:
        async with aiohttpclient.InferenceServerClient(server.http_url) as c:
            assert await c.is_server_live() and await c.is_model_ready("add_sub")
            assert (await c.get_model_metadata("add_sub"))["name"] == "add_sub"
            assert (await c.get_model_config("add_sub"))["max_batch_size"] == 8
            results = await asyncio.gather(
                *(
                    c.infer("add_sub", _add_sub_inputs(A + i, B, module=aiohttpclient))
                    for i in range(16)
                )
            )
            for i, result in enumerate(results):
                np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A + i - B)
            stats = await c.get_inference_statistics("add_sub")
            assert stats["model_stats"][0]["name"] == "add_sub"
            index = await c.get_model_repository_index()
            assert {"name": "add_sub", "version": "1", "state": "READY"} in index

    asyncio.run(main())


def test_errors_have_triton_statuses_and_the_grpc_messages(
    client: httpclient.InferenceServerClient, server: ServerProcess
) -> None:
    grpc = grpcclient.InferenceServerClient(server.url)
    # Unknown model: 404, and the same text as gRPC's NOT_FOUND.
    err = error_of(client.infer, "no_such_model", _add_sub_inputs(A, B))
    assert err.status() == "404"
    g = error_of(grpc.get_model_metadata, "no_such_model")
    assert err.message() == g.message() == "Request for unknown model: 'no_such_model' is not found"
    assert error_of(client.get_model_config, "no_such_model").status() == "404"
    # Bad shape: 400 with the message gRPC's INVALID_ARGUMENT carries.
    bad = np.zeros((2, 15), dtype=np.float32)
    err = error_of(client.infer, "add_sub", _add_sub_inputs(bad, bad))
    g_inputs = [grpcclient.InferInput("INPUT0", [2, 15], "FP32")]
    g_inputs.append(grpcclient.InferInput("INPUT1", [2, 15], "FP32"))
    for i in g_inputs:
        i.set_data_from_numpy(bad)
    g = error_of(grpc.infer, "add_sub", g_inputs)
    assert err.status() == "400" and err.message() == g.message()
    assert "unexpected shape for input 'INPUT0'" in err.message()
    # Not supported: 501 with the gRPC side's words.
    err = error_of(client.get_system_shared_memory_status)
    assert (
        err.status() == "501"
        and err.message() == error_of(grpc.get_system_shared_memory_status).message()
    )
    assert error_of(client.get_cuda_shared_memory_status).status() == "501"
    assert error_of(client.get_trace_settings).status() == "501"
    assert error_of(client.get_log_settings).status() == "501"
    # none mode: load/unload refused as on gRPC.
    err = error_of(client.load_model, "add_sub")
    assert err.message() == error_of(grpc.load_model, "add_sub").message()
    assert err.status() == "503"  # UNAVAILABLE, as Triton answers


def test_statistics_count_both_protocols(
    client: httpclient.InferenceServerClient, server: ServerProcess
) -> None:
    grpc = grpcclient.InferenceServerClient(server.url)

    def successes() -> tuple[int, int]:
        http_stats = client.get_inference_statistics("add_sub_auto")["model_stats"][0]
        g = grpc.get_inference_statistics("add_sub_auto").model_stats[0]
        assert http_stats["inference_stats"]["success"]["count"] == g.inference_stats.success.count
        assert http_stats["inference_count"] == g.inference_count
        return http_stats["inference_stats"]["success"]["count"], g.inference_count

    before, _ = successes()
    x = np.ones((1, 16), np.float32)
    client.infer("add_sub_auto", _add_sub_inputs(x, x))
    g_inputs = [grpcclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
    for i in g_inputs:
        i.set_data_from_numpy(x)
    grpc.infer("add_sub_auto", g_inputs)
    after, _ = successes()
    assert after == before + 2
    every = client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in every} >= {"add_sub", "add_sub_auto", "strings"}


def test_prometheus_counts_both_protocols(
    client: httpclient.InferenceServerClient, server: ServerProcess
) -> None:
    def count() -> float:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith('nv_inference_request_success{model="int_identity"'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count()
    ints = np.zeros((2, 3), np.int32)
    name = client.get_model_metadata("int_identity")["inputs"][0]["name"]
    h = httpclient.InferInput(name, [2, 3], "INT32")
    h.set_data_from_numpy(ints)
    client.infer("int_identity", [h])
    g = grpcclient.InferInput(name, [2, 3], "INT32")
    g.set_data_from_numpy(ints)
    grpcclient.InferenceServerClient(server.url).infer("int_identity", [g])
    assert count() == before + 2


# ---- explicit mode: repository index, load with config and base64 files, unload -------------


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo: Path = tmp_path_factory.mktemp("http_explicit")
    place_model(repo, "first", {1: om.scale(2.0)})
    place_model(repo, "cycled", {1: om.scale(5.0)})
    proc = ServerProcess(
        repo, "--model-control-mode", "explicit", "--load-model", "first"
    ).wait_ready()
    yield proc
    proc.stop()


def _factor(client: httpclient.InferenceServerClient, model: str) -> float:
    x = np.ones((2, 4), np.float32)
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    return float(client.infer(model, [inp]).as_numpy("y")[0, 0])


def test_repository_load_unload_and_index(explicit_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(explicit_server.http_url)
    index = {e["name"]: e for e in client.get_model_repository_index()}
    assert index["first"]["state"] == "READY" and index["cycled"]["state"] == "UNAVAILABLE"
    client.load_model("cycled")
    assert client.is_model_ready("cycled") and _factor(client, "cycled") == 5.0
    client.unload_model("cycled")
    assert not client.is_model_ready("cycled")
    index = {e["name"]: e for e in client.get_model_repository_index()}
    assert index["cycled"] == {"name": "cycled", "version": "", "state": "UNAVAILABLE",
                               "reason": "unloaded"}  # fmt: skip
    err = error_of(client.infer, "cycled", [httpclient.InferInput("x", [1, 4], "FP32")])
    assert err.status() == "404"


def test_repository_load_with_config_and_files(explicit_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(explicit_server.http_url)
    client.load_model("cycled", config=json.dumps({"max_batch_size": 2}))
    assert client.get_model_config("cycled")["max_batch_size"] == 2
    config = {
        "backend": "onnxruntime",
        "max_batch_size": 4,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}],
    }
    # tritonclient.http sends file contents base64-encoded, as Triton's HTTP API expects.
    files = {"file:1/model.onnx": om.scale(9.0).SerializeToString()}
    client.load_model("from_files", config=json.dumps(config), files=files)
    assert _factor(client, "from_files") == 9.0
    err = error_of(client.load_model, "first", config="{ not json")
    # Triton: INTERNAL "failed to load '<m>', failed to poll from model repository" (+ why here).
    assert err.status() == "500" and "invalid JSON model configuration override" in err.message()
    err = error_of(client.load_model, "no_such_model")
    assert "no model folder 'no_such_model'" in err.message()
    client.unload_model("from_files")
