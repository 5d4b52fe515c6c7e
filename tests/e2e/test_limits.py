"""gRPC message limits: large tensors pass with the default limit (raised to gRPC's 2 GiB
ceiling, as clients allow), and a message over --max-message-bytes is answered with
RESOURCE_EXHAUSTED at once, never a hang, leaving the server unharmed."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper

from tests import onnx_models as om
from tests.e2e.lifecycle import client_for, rpc_error
from tests.e2e.server import ServerProcess

LIMIT = 1 << 20  # --max-message-bytes of the limited server
# A request that never comes back fails the test instead of hanging it.
CLIENT_TIMEOUT = 60.0


def doubler() -> onnx.ModelProto:
    """x[batch, n] -> y[batch, 2n] (x twice): a small request with a large response."""
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "x"], ["y"], axis=1)],
        "doubler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n2"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", om.OPSET)])
    model.ir_version = om.IR_VERSION
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def limits_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("limits_repo")
    om.write_model(repo, "echo", om.identity(TensorProto.FLOAT, ["batch", "n"], "echo"))
    om.write_model(repo, "doubler", doubler())
    return repo


@pytest.fixture(scope="module")
def limited_server(limits_repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(limits_repo, "--max-message-bytes", str(LIMIT)).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def default_server(limits_repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(limits_repo).wait_ready()
    yield proc
    proc.stop()


def tensor(name: str, data: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return inp


def floats(nbytes: int) -> np.ndarray:
    return np.arange(nbytes // 4, dtype=np.float32).reshape(1, -1)


def test_request_over_the_limit_is_resource_exhausted(limited_server: ServerProcess) -> None:
    client = client_for(limited_server)
    err = rpc_error(
        client.infer, "echo", [tensor("INPUT0", floats(2 * LIMIT))], client_timeout=CLIENT_TIMEOUT
    )
    assert err.status() == "StatusCode.RESOURCE_EXHAUSTED", err
    # The server is unharmed: the same client goes on with requests under the limit.
    small = floats(LIMIT // 2)
    result = client.infer("echo", [tensor("INPUT0", small)], client_timeout=CLIENT_TIMEOUT)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), small)


def test_response_over_the_limit_is_resource_exhausted(limited_server: ServerProcess) -> None:
    client = client_for(limited_server)
    x = floats(LIMIT * 3 // 4)  # fits; the response (twice as large) does not
    err = rpc_error(client.infer, "doubler", [tensor("x", x)], client_timeout=CLIENT_TIMEOUT)
    assert err.status() == "StatusCode.RESOURCE_EXHAUSTED", err
    x = floats(LIMIT // 4)
    result = client.infer("doubler", [tensor("x", x)], client_timeout=CLIENT_TIMEOUT)
    np.testing.assert_array_equal(result.as_numpy("y"), np.concatenate([x, x], axis=1))


def test_stream_message_over_the_limit_is_an_error_not_a_hang(
    limited_server: ServerProcess,
) -> None:
    client = client_for(limited_server)
    replies: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        client.async_stream_infer("echo", [tensor("INPUT0", floats(2 * LIMIT))])
        result, error = replies.get(timeout=CLIENT_TIMEOUT)
    finally:
        client.stop_stream()
    assert result is None
    assert error is not None and error.status() == "StatusCode.RESOURCE_EXHAUSTED", error  # type: ignore[attr-defined]
    assert client.is_server_live()


def test_64_mib_tensor_round_trips_with_the_default_limit(default_server: ServerProcess) -> None:
    client = client_for(default_server)
    x = floats(64 << 20)
    result = client.infer("echo", [tensor("INPUT0", x)], client_timeout=CLIENT_TIMEOUT)
    y = result.as_numpy("OUTPUT0")
    assert y.nbytes == 64 << 20
    np.testing.assert_array_equal(y, x)


def test_64_mib_tensor_round_trips_on_a_stream(default_server: ServerProcess) -> None:
    client = client_for(default_server)
    replies: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    x = floats(64 << 20)
    try:
        client.async_stream_infer("echo", [tensor("INPUT0", x)])
        result, error = replies.get(timeout=CLIENT_TIMEOUT)
    finally:
        client.stop_stream()
    assert error is None, error
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)  # type: ignore[attr-defined]
