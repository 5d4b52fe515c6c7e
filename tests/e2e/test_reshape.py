"""`reshape` and scalar tensors, as Triton serves them, through the real tritonclient.

Clients send and receive the config's `dims`; the model takes and produces its `reshape` (or a
scalar). Each model here is a real ONNX graph whose output depends on the shape it was given,
so a reshape left out or done the wrong way round fails the test, not just a shape check.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper

from tests import onnx_models as om
from tests.e2e.lifecycle import client_for, index_of, place_model, start
from tests.e2e.server import ServerProcess


def row_sums(model_shape: list[int | str]) -> om.onnx.ModelProto:
    """x -> y = the sums of x's last axis (keepdims): wrong if x does not reach the model in
    `model_shape`. x FP32 `model_shape`, y the same with a last axis of 1."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "row_sums",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, model_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*model_shape[:-1], 1])],
        initializer=[axes],
    )
    return om._model(graph)


def doubled_scalar() -> om.onnx.ModelProto:
    """A scalar in, a scalar out: y = 2x (rank 0 both)."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "doubled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        initializer=[two],
    )
    return om._model(graph)


def batch_only() -> om.onnx.ModelProto:
    """x[batch] -> y[batch] = x + 1: a batched tensor that is only its batch dimension."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "plus_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        initializer=[one],
    )
    return om._model(graph)


# The client's [8] is the model's [2, 4] (two rows of four); the model's [2, 1] goes back as [2].
RESHAPED = """
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 100000 }
input [ { name: "x" data_type: TYPE_FP32 dims: [ 8 ] reshape { shape: [ 2, 4 ] } } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] reshape { shape: [ 2, 1 ] } } ]
"""
# A variable dimension carried over: the client's [n, 4] is the model's [n, 2, 2].
VARIABLE = """
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] reshape { shape: [ -1, 2, 2 ] } } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, 2 ] reshape { shape: [ -1, 2, 1 ] } } ]
"""
SCALAR = """
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1, 1 ] } ]
"""
REFUSED = {
    "sizes_differ": (
        'max_batch_size: 8\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 6 ] '
        "reshape { shape: [ 2, 4 ] } } ]",
        "dims [6] and reshape [2, 4] hold different numbers of elements",
    ),
    "unbatched_empty": (
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] reshape { shape: [ ] } } ]',
        "an empty reshape needs max_batch_size > 0",
    ),
    "scalar_of_two": (
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]',
        "input 'x' is a scalar in the ONNX model: its dims in config must all be 1",
    ),
    "zero_dim": (
        'max_batch_size: 8\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 0 ] '
        "reshape { shape: [ 2, 4 ] } } ]",
        "every dimension must be an integer >= 1, or -1",
    ),
    "wrong_model_shape": (
        'max_batch_size: 8\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 8 ] '
        "reshape { shape: [ 4, 2 ] } } ]",
        "input 'x' has reshape [4, 2] in config but the ONNX model declares [2, 4]",
    ),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("reshape_repo")
    place_model(repo, "reshaped", {1: row_sums(["batch", 2, 4])}, RESHAPED)
    place_model(repo, "variable", {1: row_sums(["n", 2, 2])}, VARIABLE)
    place_model(repo, "scalar", {1: doubled_scalar()}, SCALAR)
    place_model(repo, "scalar_auto", {1: doubled_scalar()})
    place_model(repo, "batch_only", {1: batch_only()})
    for name, (config, _) in REFUSED.items():
        model = doubled_scalar() if name.startswith(("scalar", "unbatched")) else None
        place_model(repo, name, {1: model or row_sums(["batch", 2, 4])}, config)
    yield from start(repo, "--strict-readiness", "false")


def grpc_infer(server: ServerProcess, name: str, x: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client_for(server).infer(name, [inp]).as_numpy("y")


def http_infer(server: ServerProcess, name: str, x: np.ndarray, binary: bool) -> np.ndarray:
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("y", binary_data=binary)
    client = httpclient.InferenceServerClient(server.http_url)
    return client.infer(name, [inp], outputs=[out]).as_numpy("y")


def test_reshaped_input_and_output_over_grpc_and_http(server: ServerProcess) -> None:
    x = np.arange(24, dtype=np.float32).reshape(3, 8)
    want = x.reshape(3, 2, 4).sum(axis=-1)  # [3, 2]: the client's dims, the model's sums
    for got in (
        grpc_infer(server, "reshaped", x),
        http_infer(server, "reshaped", x, binary=True),
        http_infer(server, "reshaped", x, binary=False),
    ):
        assert got.shape == (3, 2)
        np.testing.assert_allclose(got, want)


def test_reshaped_requests_batched_together_each_get_their_own_answer(
    server: ServerProcess,
) -> None:
    client = client_for(server)
    xs = [(np.arange(8) + 10.0 * i).astype(np.float32).reshape(1, 8) for i in range(12)]
    answers: queue.Queue[tuple[int, object, object]] = queue.Queue()
    for i, x in enumerate(xs):  # all sent before the 100 ms window of the first one closes
        inp = grpcclient.InferInput("x", [1, 8], "FP32")
        inp.set_data_from_numpy(x)
        client.async_infer(
            "reshaped", [inp], partial(lambda i, result, error: answers.put((i, result, error)), i)
        )
    for _ in xs:
        i, result, error = answers.get(timeout=30)
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("y"), xs[i].reshape(1, 2, 4).sum(axis=-1))
    stats = client.get_inference_statistics("reshaped").model_stats[0]
    assert stats.execution_count < stats.inference_count  # some of them ran as one batch


def test_variable_dimension_carries_over_into_the_reshape(server: ServerProcess) -> None:
    for n in (1, 3, 5):
        x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
        got = grpc_infer(server, "variable", x)
        assert got.shape == (n, 2)
        np.testing.assert_allclose(got, x.reshape(n, 2, 2).sum(axis=-1))


def test_scalar_model_tensor_is_served_with_dims_of_ones(server: ServerProcess) -> None:
    got = grpc_infer(server, "scalar", np.array([3.5], dtype=np.float32))
    assert got.shape == (1, 1)  # the output's config dims, not the model's scalar
    np.testing.assert_allclose(got, [[7.0]])
    got = http_infer(server, "scalar", np.array([1.25], dtype=np.float32), binary=False)
    np.testing.assert_allclose(got, [[2.5]])


def test_scalar_model_without_config_is_completed_with_dims_one(server: ServerProcess) -> None:
    client = client_for(server)
    config = client.get_model_config("scalar_auto").config
    assert [list(t.dims) for t in (*config.input, *config.output)] == [[1], [1]]
    assert not config.input[0].HasField("reshape")
    meta = client.get_model_metadata("scalar_auto")
    assert list(meta.inputs[0].shape) == [1]
    got = grpc_infer(server, "scalar_auto", np.array([4.0], dtype=np.float32))
    assert got.shape == (1,)
    np.testing.assert_allclose(got, [8.0])


def test_batch_only_tensor_is_completed_as_triton_does(server: ServerProcess) -> None:
    """Triton's ONNX backend completes a [batch] tensor as dims [1] with an empty reshape:
    clients send [n, 1] and get [n, 1]; the model still sees [n]."""
    client = client_for(server)
    config = client.get_model_config("batch_only").config
    assert config.max_batch_size > 0
    for tensor in (config.input[0], config.output[0]):
        assert list(tensor.dims) == [1]
        assert tensor.HasField("reshape") and list(tensor.reshape.shape) == []
    x = np.array([[1.0], [2.0], [5.0]], dtype=np.float32)
    got = grpc_infer(server, "batch_only", x)
    assert got.shape == (3, 1)
    np.testing.assert_allclose(got, x + 1)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_reshape_that_cannot_hold_is_refused_at_load(server: ServerProcess, name: str) -> None:
    [(_, state, reason)] = index_of(client_for(server))[name]
    assert state == "UNAVAILABLE"
    assert REFUSED[name][1] in reason, reason


def test_requests_are_checked_against_dims_not_the_reshape(server: ServerProcess) -> None:
    inp = grpcclient.InferInput("x", [1, 2, 4], "FP32")  # the model's shape, not the client's
    inp.set_data_from_numpy(np.zeros((1, 2, 4), dtype=np.float32))
    with pytest.raises(Exception, match=r"unexpected shape for input 'x'.*Expected \[-1,8\]"):
        client_for(server).infer("reshaped", [inp])
