"""Inference through the real tritonclient (sync): every Triton datatype in raw and typed
`contents`, requested output subsets, async_infer, large messages, and ModelStatistics counters."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import triton_to_np_dtype

from tests import onnx_models as om
from tests.e2e.conftest import standard_repository
from tests.e2e.server import ServerProcess

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BF16": TensorProto.BFLOAT16,
    "BYTES": TensorProto.STRING,
}

# Which typed `contents` field carries each datatype in KServe v2 (FP16 and BF16 have none).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

WIDE = 1 << 21  # FP32 elements per row of the `wide` model: 8 MiB, over gRPC's 4 MiB default


def _integers(dtype: np.dtype) -> list[int]:
    info = np.iinfo(dtype)
    return [int(info.min), int(info.max), 0, 1, int(info.max) // 3, int(info.min) // 3 or 7]


def _floats(dtype: np.dtype) -> list[float]:
    info = np.finfo(dtype)
    return [1.5, -0.0, float(info.max), float(info.smallest_subnormal), -np.inf, np.nan]


# tritonclient up to r26.05 sends BF16 from float32 arrays (keeping the high 16 bits), later
# releases from ml_dtypes.bfloat16 arrays; triton_to_np_dtype names the one the installed client
# wants. Values bfloat16 holds exactly.
BF16_VALUES = [1.5, -2.0, 0.0078125, 3.3895313892515355e38, -np.inf, np.nan]

BYTES_VALUES = [b"", b"hello", "h\u00e9llo \u20ac".encode(), b"a\x00b", b"x" * 1000, b"\t\n"]


def sample(datatype: str) -> np.ndarray:
    """A [2, 3] tensor of `datatype` with edge values, as tritonclient wants it for that type."""
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype == "BYTES":
        return np.array(BYTES_VALUES, dtype=np.object_).reshape(2, 3)
    if datatype == "BF16":
        return np.array(BF16_VALUES, dtype=triton_to_np_dtype("BF16")).reshape(2, 3)
    dtype = np.dtype(datatype.lower().replace("fp", "float"))  # INT8 -> int8, FP16 -> float16
    values = _floats(dtype) if dtype.kind == "f" else _integers(dtype)
    return np.array(values, dtype=dtype).reshape(2, 3)


def build_repository(root: Path) -> Path:
    standard_repository(root)
    for datatype, elem in ONNX_TYPES.items():
        om.write_model(root, f"identity_{datatype.lower()}", om.identity(elem, ["batch", 3]))
    # Used only by the statistics test, so its counters are deterministic.
    om.write_model(root, "counted", om.add_sub())
    om.write_model(root, "wide", om.identity(TensorProto.FLOAT, ["batch", WIDE]))
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("infer_repo"))


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """The raw gRPC stub, for requests tritonclient cannot build (typed `contents`)."""
    with grpc.insecure_channel(server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def add_sub_inputs(
    batch: int, seed: int = 0
) -> tuple[list[grpcclient.InferInput], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, 16)).astype(np.float32)
    b = rng.standard_normal((batch, 16)).astype(np.float32)
    inputs = []
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs, a, b


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    if expected.dtype == np.object_:
        assert actual.tolist() == expected.tolist()
    elif expected.dtype.name == "bfloat16":
        # ml_dtypes' bfloat16 NaN does not compare equal in assert_array_equal: compare the bits.
        assert actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual.view(np.uint16), expected.view(np.uint16))
    else:
        np.testing.assert_array_equal(actual, expected)


# ---- raw contents (what tritonclient sends) ----------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_add_sub(client: grpcclient.InferenceServerClient, batch: int) -> None:
    inputs, a, b = add_sub_inputs(batch, seed=batch)
    result = client.infer("add_sub", inputs, request_id=f"req-{batch}")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (
        "add_sub",
        "1",
        f"req-{batch}",
    )
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("OUTPUT0", "FP32", [batch, 16]),
        ("OUTPUT1", "FP32", [batch, 16]),
    ]


def test_explicit_version(client: grpcclient.InferenceServerClient) -> None:
    inputs, a, b = add_sub_inputs(2)
    result = client.infer("add_sub", inputs, model_version="1")
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)


@pytest.mark.parametrize("datatype", sorted(ONNX_TYPES))
def test_every_datatype_raw(client: grpcclient.InferenceServerClient, datatype: str) -> None:
    data = sample(datatype)
    tensor = grpcclient.InferInput("INPUT0", list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    result = client.infer(f"identity_{datatype.lower()}", [tensor])
    out = result.get_output("OUTPUT0")
    assert (out.datatype, list(out.shape)) == (datatype, [2, 3])
    assert_same(result.as_numpy("OUTPUT0"), data)


def test_non_batching_model(client: grpcclient.InferenceServerClient) -> None:
    data = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    tensor = grpcclient.InferInput("INPUT0", [2, 3], "INT32")
    tensor.set_data_from_numpy(data)
    assert_same(client.infer("int_identity", [tensor]).as_numpy("OUTPUT0"), data)


def test_strings_model(client: grpcclient.InferenceServerClient) -> None:
    data = np.array(["caf\u00e9".encode(), b"", b"\xe6\x97\xa5\xe6\x9c\xac"], dtype=np.object_)
    tensor = grpcclient.InferInput("INPUT0", [3], "BYTES")
    tensor.set_data_from_numpy(data)
    assert_same(client.infer("strings", [tensor]).as_numpy("OUTPUT0"), data)


def test_message_over_grpc_default_limit(client: grpcclient.InferenceServerClient) -> None:
    """8 MiB each way: the server raises gRPC's 4 MiB default to what clients send."""
    data = np.linspace(-1, 1, WIDE, dtype=np.float32).reshape(1, WIDE)
    tensor = grpcclient.InferInput("INPUT0", [1, WIDE], "FP32")
    tensor.set_data_from_numpy(data)
    assert_same(client.infer("wide", [tensor]).as_numpy("OUTPUT0"), data)


# ---- typed contents -------------------------------------------------------------------------


def typed_request(model: str, datatype: str, data: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id="typed")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=list(data.shape))
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(data.reshape(-1).tolist())
    return request


@pytest.mark.parametrize("datatype", sorted(CONTENTS_FIELD))
def test_every_datatype_typed_contents(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, datatype: str
) -> None:
    data = sample(datatype)
    response = stub.ModelInfer(typed_request(f"identity_{datatype.lower()}", datatype, data))
    assert response.id == "typed"
    # Outputs always come back as raw contents.
    assert len(response.raw_output_contents) == 1
    result = grpcclient.InferResult(response)
    assert result.get_output("OUTPUT0").datatype == datatype
    assert_same(result.as_numpy("OUTPUT0"), data)


def test_typed_contents_on_batching_model_with_two_inputs(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.full((2, 16), 0.5, dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[2, 16])
        tensor.contents.fp32_contents.extend(array.reshape(-1).tolist())
    result = grpcclient.InferResult(stub.ModelInfer(request))
    assert_same(result.as_numpy("OUTPUT0"), a + b)
    assert_same(result.as_numpy("OUTPUT1"), a - b)


# ---- requested outputs --------------------------------------------------------------------


def test_requested_output_subset(client: grpcclient.InferenceServerClient) -> None:
    inputs, a, b = add_sub_inputs(2)
    result = client.infer("add_sub", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["OUTPUT1"]
    assert len(response.raw_output_contents) == 1
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    assert result.as_numpy("OUTPUT0") is None


def test_requested_outputs_all(client: grpcclient.InferenceServerClient) -> None:
    inputs, a, b = add_sub_inputs(1)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT1", "OUTPUT0")]
    result = client.infer("add_sub", inputs, outputs=outputs)
    assert {o.name for o in result.get_response().outputs} == {"OUTPUT0", "OUTPUT1"}
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)


def test_request_parameters_are_accepted(client: grpcclient.InferenceServerClient) -> None:
    inputs, a, b = add_sub_inputs(1)
    result = client.infer(
        "add_sub", inputs, priority=1, timeout=10_000_000, parameters={"note": "hello", "n": 3}
    )
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)


# ---- async_infer --------------------------------------------------------------------------


def test_async_infer(client: grpcclient.InferenceServerClient) -> None:
    done: queue.Queue[tuple[grpcclient.InferResult | None, Exception | None]] = queue.Queue()
    expected = {}
    for i in range(12):
        inputs, a, b = add_sub_inputs(1 + i % 4, seed=100 + i)
        expected[f"async-{i}"] = (a + b, a - b)
        client.async_infer(
            "add_sub",
            inputs,
            lambda result, error: done.put((result, error)),
            request_id=f"async-{i}",
        )
    seen = set()
    for _ in expected:
        result, error = done.get(timeout=30)
        assert error is None
        assert result is not None
        request_id = result.get_response().id
        plus, minus = expected[request_id]
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), plus, rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("OUTPUT1"), minus, rtol=1e-6)
        seen.add(request_id)
    assert seen == set(expected)


def test_async_infer_error_reaches_the_callback(client: grpcclient.InferenceServerClient) -> None:
    done: queue.Queue[tuple[grpcclient.InferResult | None, Exception | None]] = queue.Queue()
    inputs, _, _ = add_sub_inputs(1)
    client.async_infer("no_such_model", inputs, lambda result, error: done.put((result, error)))
    result, error = done.get(timeout=30)
    assert result is None
    assert error is not None
    assert error.status() == "StatusCode.NOT_FOUND"  # type: ignore[attr-defined]
    assert error.message() == "Request for unknown model: 'no_such_model' is not found"  # type: ignore[attr-defined]


# ---- statistics -----------------------------------------------------------------------------


def test_statistics_counts(client: grpcclient.InferenceServerClient) -> None:
    """`counted` is used by no other test: its counters are exactly what this test sent."""
    before_ms = time.time_ns() // 1_000_000
    initial = client.get_inference_statistics("counted").model_stats[0]
    assert initial.inference_count == 0
    assert initial.execution_count == 0
    assert initial.last_inference == 0

    batches = [1, 2, 4]
    for batch in batches:  # one at a time: each request is its own execution
        inputs, _, _ = add_sub_inputs(batch)
        client.infer("counted", inputs)
    bad = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 16), np.float32))
    for _ in range(2):  # missing INPUT1: rejected, counted as failures
        with pytest.raises(grpcclient.InferenceServerException):
            client.infer("counted", [bad])
    after_ms = time.time_ns() // 1_000_000

    stats = client.get_inference_statistics("counted", "1").model_stats
    assert len(stats) == 1
    s = stats[0]
    assert (s.name, s.version) == ("counted", "1")
    infer = s.inference_stats
    assert infer.success.count == 3
    assert infer.fail.count == 2
    # inference_count counts batch elements, execution_count counts model runs.
    assert s.inference_count == sum(batches)
    assert s.execution_count == len(batches)
    for duration in (infer.queue, infer.compute_input, infer.compute_infer, infer.compute_output):
        assert duration.count == 3
    assert infer.success.ns > 0
    assert infer.compute_infer.ns > 0
    assert infer.success.ns >= infer.compute_infer.ns
    assert before_ms <= s.last_inference <= after_ms
    assert sorted(b.batch_size for b in s.batch_stats) == batches
    for b in s.batch_stats:
        assert b.compute_infer.count == 1
        assert b.compute_infer.ns > 0


def test_statistics_of_all_models_include_every_datatype_model(
    client: grpcclient.InferenceServerClient,
) -> None:
    names = {s.name for s in client.get_inference_statistics().model_stats}
    assert {f"identity_{d.lower()}" for d in ONNX_TYPES} <= names
    assert "broken" not in names
