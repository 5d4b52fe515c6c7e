"""Restricted protocol groups (Triton's --grpc-restricted-protocol, plus --grpc-disable-protocol)
on both front ends, with tritonclient passing `headers={...}`: management needs the configured
header, a turned-off group is refused whatever the headers, inference and health stay open."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from pipeserve.api.generated import health_pb2, health_pb2_grpc
from tests import onnx_models as om
from tests.e2e.server import ServerProcess, serve_fails
from tests.e2e.test_stream_and_aio import add_sub_inputs

FRONT_ENDS = ("asyncio", "grpcio")
ADMIN = {"triton-grpc-protocol-admin-key": "s3cret"}
RESTRICTED = "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'"


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    om.write_model(root, "add_sub", om.add_sub(), config=om.ADD_SUB_CONFIG)
    om.write_model(root, "add_sub_auto", om.add_sub())
    return root


def denied(call: Callable[[], object]) -> str:
    with pytest.raises(InferenceServerException) as refused:
        call()
    assert refused.value.status() == "StatusCode.PERMISSION_DENIED", refused.value
    return str(refused.value.message())


def infer_ok(client: grpcclient.InferenceServerClient, **kw: object) -> None:
    inputs, expected = add_sub_inputs(2, seed=5)
    result = client.infer("add_sub", inputs, **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-6)


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_management_needs_the_header_inference_and_health_stay_open(
    frontend: str, small_repo: Path, start_server: Callable[..., ServerProcess]
) -> None:
    proc = start_server(
        small_repo,
        "--grpc-frontend", frontend,
        "--model-control-mode", "explicit",
        "--load-model", "add_sub",
        "--grpc-restricted-protocol", "model-repository,model-config:admin-key=s3cret",
        "--grpc-disable-protocol", "shared-memory,trace,logging",
    )  # fmt: skip
    client = grpcclient.InferenceServerClient(proc.url)
    try:
        # Without the header, or with a wrong value: PERMISSION_DENIED, Triton's message.
        assert denied(lambda: client.load_model("add_sub_auto")) == RESTRICTED
        wrong = {"triton-grpc-protocol-admin-key": "guess"}
        assert denied(lambda: client.unload_model("add_sub", headers=wrong)) == RESTRICTED
        assert denied(lambda: client.get_model_repository_index()) == RESTRICTED
        assert denied(lambda: client.get_model_config("add_sub")) == RESTRICTED
        assert not client.is_model_ready("add_sub_auto")  # the refused load did nothing

        # With it: served.
        client.load_model("add_sub_auto", headers=ADMIN)
        assert client.is_model_ready("add_sub_auto")
        names = {m.name for m in client.get_model_repository_index(headers=ADMIN).models}
        assert names == {"add_sub", "add_sub_auto"}
        assert client.get_model_config("add_sub", headers=ADMIN).config.name == "add_sub"
        client.unload_model("add_sub_auto", headers=ADMIN)

        # Turned off: refused even with the admin header.
        off = "This protocol is disabled on this server"
        for call in (
            lambda: client.get_system_shared_memory_status(headers=ADMIN),
            lambda: client.get_cuda_shared_memory_status(headers=ADMIN),
            lambda: client.get_trace_settings(headers=ADMIN),
            lambda: client.get_log_settings(headers=ADMIN),
        ):
            assert denied(call).startswith(off)

        # Open groups: inference (unary and streaming), health, metadata, statistics.
        infer_ok(client)
        results: list[object] = []
        client.start_stream(callback=lambda result, error: results.append(error or result))
        client.async_stream_infer("add_sub", add_sub_inputs(1, 0)[0])
        client.stop_stream()
        assert len(results) == 1 and isinstance(results[0], grpcclient.InferResult)
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_server_metadata().name == "pipeserve"
        assert client.get_inference_statistics("add_sub").model_stats
    finally:
        client.close()
    # One WARNING line per refusal, naming the RPC and the peer, never the value sent.
    out = proc.output()
    assert (
        "WARNING pipeserve.api.restricted: denied RepositoryModelLoad from ipv4:127.0.0.1:" in out
    )
    assert "denied RepositoryModelUnload from ipv4:127.0.0.1:" in out
    assert "denied SystemSharedMemoryStatus from" in out
    assert "guess" not in out and "s3cret" not in out


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_restricted_inference_and_health(
    frontend: str, small_repo: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Any group can be restricted: inference (unary and streaming) and health too, the gRPC
    health service included (Triton's `health` covers it)."""
    proc = start_server(
        small_repo,
        "--grpc-frontend", frontend,
        "--grpc-restricted-protocol", "inference,health:admin-key=s3cret",
    )  # fmt: skip
    client = grpcclient.InferenceServerClient(proc.url)
    try:
        assert denied(lambda: infer_ok(client)) == RESTRICTED
        assert denied(lambda: client.is_server_live()) == RESTRICTED
        infer_ok(client, headers=ADMIN)
        assert client.is_server_live(headers=ADMIN)

        # The stream is refused when it opens: the request may find it closed already.
        errors: list[object] = []
        client.start_stream(callback=lambda result, error: errors.append(error or result))
        with contextlib.suppress(InferenceServerException):
            client.async_stream_infer("add_sub", add_sub_inputs(1, 0)[0])
        client.stop_stream()
        assert len(errors) == 1 and isinstance(errors[0], InferenceServerException)
        assert errors[0].status() == "StatusCode.PERMISSION_DENIED"

        answers: list[object] = []
        client.start_stream(
            callback=lambda result, error: answers.append(error or result), headers=ADMIN
        )
        client.async_stream_infer("add_sub", add_sub_inputs(1, 0)[0])
        client.stop_stream()
        assert len(answers) == 1 and isinstance(answers[0], grpcclient.InferResult)
        assert client.get_server_metadata().name == "pipeserve"  # metadata stays open
    finally:
        client.close()
    with grpc.insecure_channel(proc.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        metadata = tuple(ADMIN.items())
        reply = health.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as watch_refused:
            next(iter(health.Watch(health_pb2.HealthCheckRequest(), timeout=10)))
        assert watch_refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--grpc-restricted-protocol", "model-repo:k=v"],
            "--grpc-restricted-protocol: unknown protocol group 'model-repo'",
        ),
        (
            ["--grpc-restricted-protocol", "model-repository"],
            "--grpc-restricted-protocol format is '<protocols>:<key>=<value>'",
        ),
        (
            ["--grpc-restricted-protocol", "trace:k=v", "--grpc-disable-protocol", "trace"],
            "--grpc-disable-protocol: protocol group 'trace' can not be specified in multiple",
        ),
        (
            ["--grpc-restricted-protocol", "trace:bad key=v"],
            "header key 'bad key' in 'trace:bad key=v' may hold only",
        ),
    ],
)
def test_bad_restriction_flags_fail_the_start(
    args: list[str], message: str, small_repo: Path
) -> None:
    assert message in serve_fails(small_repo, *args)


def test_http_restricted_api(small_repo: Path, start_server: Callable[..., ServerProcess]) -> None:
    """The same rules on HTTP/REST (Triton's --http-restricted-api: the bare key is the header;
    403 and "This API is restricted ..."), with tritonclient.http passing headers."""
    proc = start_server(
        small_repo,
        "--model-control-mode", "explicit",
        "--load-model", "add_sub",
        "--http-restricted-api", "model-repository:admin-key=s3cret",
        "--http-disable-api", "trace,logging,shared-memory",
    )  # fmt: skip
    client = httpclient.InferenceServerClient(proc.http_url)
    admin = {"admin-key": "s3cret"}
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("add_sub_auto")
        assert refused.value.status() == "403"
        assert refused.value.message() == "This API is restricted, expecting header 'admin-key'"
        client.load_model("add_sub_auto", headers=admin)
        assert client.is_model_ready("add_sub_auto")
        client.unload_model("add_sub_auto", headers=admin)
        for call in (
            lambda: client.get_trace_settings(headers=admin),
            lambda: client.get_log_settings(headers=admin),
            lambda: client.get_system_shared_memory_status(headers=admin),
        ):
            with pytest.raises(InferenceServerException) as off:
                call()
            assert off.value.status() == "403"
            assert str(off.value.message()).startswith("This API is disabled on this server")
        rng = np.random.default_rng(1)
        a, b = (rng.standard_normal((1, 16)).astype(np.float32) for _ in range(2))
        inputs = [httpclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = client.infer("add_sub", inputs)  # inference stays open
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
        assert client.is_server_live()
        # gRPC is not restricted by the HTTP rules.
        grpc_client = grpcclient.InferenceServerClient(proc.url)
        assert {m.name for m in grpc_client.get_model_repository_index().models} >= {"add_sub"}
        grpc_client.close()
    finally:
        client.close()
    out = proc.output()
    assert "denied POST /v2/repository/models/add_sub_auto/load from 127.0.0.1:" in out
    assert "s3cret" not in out
