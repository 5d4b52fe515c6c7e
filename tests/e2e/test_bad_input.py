"""Bad input gets a clear error and harms nothing: every malformed request is answered with the
right status code and a message naming what was wrong and what was expected, broken model folders
show in the index while the others serve, and good requests sent alongside bad ones all succeed.

Requests tritonclient refuses to build (wrong byte sizes, truncated BYTES, typed contents) are
sent as hand-made protobuf messages on the raw gRPC stub.
"""

from __future__ import annotations

import functools
import random
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests import onnx_models as om
from tests.e2e.conftest import standard_repository
from tests.e2e.server import ServerProcess

MISMATCHED_CONFIG = """
name: "mismatched"
max_batch_size: 4
input [ { name: "INPUT0" data_type: TYPE_INT64 dims: [ 3 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""


def build_repository(root: Path) -> Path:
    """The standard repository plus more broken folders and two identity models."""
    standard_repository(root)
    om.write_model(root, "identity_fp16", om.identity(TensorProto.FLOAT16, ["batch", 3]))
    om.write_model(root, "identity_int8", om.identity(TensorProto.INT8, ["batch", 3]))
    # config.pbtxt that is not protobuf text.
    om.write_model(root, "bad_config", om.add_sub(), config="max_batch_size: [[[ oops")
    # config.pbtxt that contradicts the graph (INT64 declared, the graph takes FP32).
    om.write_model(
        root, "mismatched", om.identity(TensorProto.FLOAT, ["batch", 3]), config=MISMATCHED_CONFIG
    )
    return root


BROKEN = ("broken", "bad_config", "mismatched")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("bad_input_repo"))


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


# ---- helpers --------------------------------------------------------------------------------


def tensor(name: str, array: np.ndarray, datatype: str = "FP32") -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def fp32(*shape: int) -> np.ndarray:
    return np.ones(shape, dtype=np.float32)


def infer_error(
    client: grpcclient.InferenceServerClient, model: str, inputs: list[Any], **kwargs: Any
) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs, **kwargs)
    return info.value


def assert_error(err: InferenceServerException, code: str, *fragments: str) -> None:
    assert err.status() == f"StatusCode.{code}", err.message()
    for fragment in fragments:
        assert fragment in err.message(), err.message()


RawTensor = tuple[str, str, list[int], bytes | None]


def raw_request(
    model: str, tensors: list[RawTensor], outputs: tuple[str, ...] = ()
) -> service_pb2.ModelInferRequest:
    """(name, datatype, shape, raw bytes or None) per input; None sends no raw entry."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw is not None:
            request.raw_input_contents.append(raw)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_rpc_error(err: grpc.RpcError, code: grpc.StatusCode, *fragments: str) -> None:
    assert err.code() == code, err.details()
    for fragment in fragments:
        assert fragment in err.details(), err.details()


def bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


# ---- unknown model / version ----------------------------------------------------------------


def test_unknown_model(client: grpcclient.InferenceServerClient) -> None:
    err = infer_error(client, "no_such_model", [tensor("INPUT0", fp32(1, 16))])
    assert err.status() == "StatusCode.NOT_FOUND"
    assert err.message() == "Request for unknown model: 'no_such_model' is not found"


@pytest.mark.parametrize("version", ["2", "0"])
def test_unknown_version(client: grpcclient.InferenceServerClient, version: str) -> None:
    inputs = [tensor("INPUT0", fp32(1, 16)), tensor("INPUT1", fp32(1, 16))]
    err = infer_error(client, "add_sub", inputs, model_version=version)
    assert err.status() == "StatusCode.NOT_FOUND"
    assert err.message() == f"Request for unknown model: 'add_sub' version {version} is not found"
    # A version that is not a number: INVALID_ARGUMENT as in Triton (test_triton_parity.py).


@pytest.mark.parametrize("model", BROKEN)
def test_infer_on_a_model_that_failed_to_load(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    err = infer_error(client, model, [tensor("INPUT0", fp32(1, 3))])
    assert_error(err, "NOT_FOUND", f"'{model}'")


# ---- datatype -------------------------------------------------------------------------------


def test_wrong_datatype(client: grpcclient.InferenceServerClient) -> None:
    inputs = [
        tensor("INPUT0", np.ones((1, 16), np.int32), "INT32"),
        tensor("INPUT1", fp32(1, 16)),
    ]
    err = infer_error(client, "add_sub", inputs)
    assert_error(err, "INVALID_ARGUMENT", "input 'INPUT0'", "INT32", "expects FP32")


def test_wrong_datatype_for_strings(client: grpcclient.InferenceServerClient) -> None:
    err = infer_error(client, "strings", [tensor("INPUT0", np.ones(3, np.float32))])
    assert_error(err, "INVALID_ARGUMENT", "input 'INPUT0'", "FP32", "expects BYTES")


@pytest.mark.parametrize("datatype", ["FLOAT", "FP8", "int32", "STRING"])
def test_unknown_datatype_name(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, datatype: str
) -> None:
    request = raw_request("identity_int8", [("INPUT0", datatype, [1, 3], b"\x00" * 12)])
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(
        err, grpc.StatusCode.INVALID_ARGUMENT, f"unsupported datatype '{datatype}'", "FP32"
    )


def test_missing_datatype(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_request("identity_int8", [("INPUT0", "", [1, 3], b"\x00" * 3)])
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(err, grpc.StatusCode.INVALID_ARGUMENT, "input 'INPUT0' has no datatype")


# ---- shape, rank and batch size ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "shown"),
    [((1, 8), "[1,8]"), ((1, 16, 1), "[1,16,1]"), ((16,), "[16]")],
    ids=["wrong-dim", "rank-too-high", "no-batch-dim"],
)
def test_wrong_shape_on_batching_model(
    client: grpcclient.InferenceServerClient, shape: tuple[int, ...], shown: str
) -> None:
    inputs = [tensor("INPUT0", fp32(*shape)), tensor("INPUT1", fp32(1, 16))]
    err = infer_error(client, "add_sub", inputs)
    assert_error(
        err,
        "INVALID_ARGUMENT",
        "input 'INPUT0'",
        "model 'add_sub'",
        "Expected [-1,16]",
        f"got {shown}",
    )


def test_scalar_on_batching_model(client: grpcclient.InferenceServerClient) -> None:
    inputs = [tensor("INPUT0", np.array(1.0, dtype=np.float32)), tensor("INPUT1", fp32(1, 16))]
    err = infer_error(client, "add_sub", inputs)
    assert_error(err, "INVALID_ARGUMENT", "input 'INPUT0'", "shape []", "[-1,16]")


@pytest.mark.parametrize(
    ("shape", "shown"), [((1, 2, 3), "[1,2,3]"), ((3, 2), "[3,2]"), ((6,), "[6]")]
)
def test_wrong_shape_on_non_batching_model(
    client: grpcclient.InferenceServerClient, shape: tuple[int, ...], shown: str
) -> None:
    data = np.zeros(shape, dtype=np.int32)
    err = infer_error(client, "int_identity", [tensor("INPUT0", data, "INT32")])
    assert_error(err, "INVALID_ARGUMENT", "input 'INPUT0'", "Expected [2,3]", f"got {shown}")


@pytest.mark.parametrize(("model", "limit"), [("add_sub", 8), ("add_sub_auto", 4)])
def test_batch_over_max_batch_size(
    client: grpcclient.InferenceServerClient, model: str, limit: int
) -> None:
    batch = limit + 1
    inputs = [tensor("INPUT0", fp32(batch, 16)), tensor("INPUT1", fp32(batch, 16))]
    err = infer_error(client, model, inputs)
    assert_error(err, "INVALID_ARGUMENT", f"batch-size must be <= {limit}", f"got {batch}")
    assert f"'{model}'" in err.message()


def test_batch_size_zero(client: grpcclient.InferenceServerClient) -> None:
    inputs = [tensor("INPUT0", fp32(0, 16)), tensor("INPUT1", fp32(0, 16))]
    err = infer_error(client, "add_sub", inputs)
    assert_error(err, "INVALID_ARGUMENT", "batch-size must be >= 1", "got 0")


def test_inputs_disagree_on_batch_size(client: grpcclient.InferenceServerClient) -> None:
    inputs = [tensor("INPUT0", fp32(2, 16)), tensor("INPUT1", fp32(3, 16))]
    err = infer_error(client, "add_sub", inputs)
    assert_error(err, "INVALID_ARGUMENT", "input 'INPUT1'", "batch size 3", "batch size 2")


def test_negative_dimension(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_request("identity_int8", [("INPUT0", "INT8", [-1, 3], b"\x00" * 3)])
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(
        err, grpc.StatusCode.INVALID_ARGUMENT, "input 'INPUT0'", "[-1, 3]", "must be >= 0"
    )


# ---- raw contents -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 60, 68, 128])
def test_raw_byte_size_mismatch(stub: service_pb2_grpc.GRPCInferenceServiceStub, size: int) -> None:
    request = raw_request(
        "add_sub",
        [("INPUT0", "FP32", [1, 16], b"\x00" * size), ("INPUT1", "FP32", [1, 16], b"\x00" * 64)],
    )
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(
        err,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"input byte size mismatch for input 'INPUT0' for model 'add_sub'. Expected 64, got {size}",
    )


def test_shape_past_int64_gets_tritons_overflow_words(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    request = raw_request(
        "add_sub",
        [
            ("INPUT0", "FP32", [2**4, 2**60 + 2], b"\x00" * 4),
            ("INPUT1", "FP32", [1, 16], b"\x00" * 64),
        ],
    )
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(
        err,
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid shape for input 'INPUT0': shape [16, 1152921504606846978] causes total element "
        "count to exceed maximum size of 9223372036854775807",
    )


def test_raw_entry_count_mismatch(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_request(
        "add_sub", [("INPUT0", "FP32", [1, 16], b"\x00" * 64), ("INPUT1", "FP32", [1, 16], None)]
    )
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(
        err, grpc.StatusCode.INVALID_ARGUMENT, "expected 2 raw_input_contents", "got 1"
    )


# ---- input and output names ---------------------------------------------------------------


def test_missing_input(client: grpcclient.InferenceServerClient) -> None:
    err = infer_error(client, "add_sub", [tensor("INPUT0", fp32(1, 16))])
    assert_error(
        err,
        "INVALID_ARGUMENT",
        "expected 2 inputs but got 1 inputs for model 'add_sub'. Got input(s) ['INPUT0'], but "
        "missing required input(s) ['INPUT1']. Please provide all required input(s).",
    )


def test_no_inputs_at_all(client: grpcclient.InferenceServerClient) -> None:
    err = infer_error(client, "add_sub", [])
    assert_error(
        err,
        "INVALID_ARGUMENT",
        "Got input(s) [], but missing required input(s) ['INPUT0','INPUT1']",
    )


def test_extra_input(client: grpcclient.InferenceServerClient) -> None:
    inputs = [tensor(n, fp32(1, 16)) for n in ("INPUT0", "INPUT1", "INPUT2")]
    err = infer_error(client, "add_sub", inputs)
    assert_error(
        err, "INVALID_ARGUMENT", "unexpected inference input 'INPUT2'", "['INPUT0', 'INPUT1']"
    )


def test_duplicate_input(client: grpcclient.InferenceServerClient) -> None:
    inputs = [tensor(n, fp32(1, 16)) for n in ("INPUT0", "INPUT0", "INPUT1")]
    err = infer_error(client, "add_sub", inputs)
    assert_error(err, "INVALID_ARGUMENT", "input 'INPUT0' already exists in request")


def test_output_requested_twice(client: grpcclient.InferenceServerClient) -> None:
    inputs = [tensor("INPUT0", fp32(1, 16)), tensor("INPUT1", fp32(1, 16))]
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT1", "OUTPUT0", "OUTPUT1")]
    err = infer_error(client, "add_sub", inputs, outputs=outputs)
    assert_error(err, "INVALID_ARGUMENT", "output 'OUTPUT1' already exists in request")


def test_unknown_requested_output(client: grpcclient.InferenceServerClient) -> None:
    inputs = [tensor("INPUT0", fp32(1, 16)), tensor("INPUT1", fp32(1, 16))]
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("NOPE")]
    err = infer_error(client, "add_sub", inputs, outputs=outputs)
    assert_error(
        err,
        "INVALID_ARGUMENT",
        "unexpected inference output 'NOPE'",
        "['OUTPUT0', 'OUTPUT1']",
    )


def test_classification_of_a_bytes_output_is_refused(
    client: grpcclient.InferenceServerClient,
) -> None:
    inputs = [tensor("INPUT0", np.array([b"a", b"b", b"c"], dtype=np.object_), "BYTES")]
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0", class_count=3)]
    err = infer_error(client, "strings", inputs, outputs=outputs)
    assert_error(
        err, "INVALID_ARGUMENT", "output 'OUTPUT0'", "class result not available", "'BYTES'"
    )


# ---- BYTES ----------------------------------------------------------------------------------

ABC = bytes_element(b"a") + bytes_element(b"b") + bytes_element(b"c")


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        (
            bytes_element(b"a") + bytes_element(b"b") + b"\x01\x00",
            (
                "incomplete string length indicator for inference input 'INPUT0' for model "
                "'strings', expecting 4 bytes but only 2 bytes available",
            ),
        ),
        (
            b"",
            ("expected 3 string elements for inference input 'INPUT0' for model 'strings', got 0",),
        ),
        (
            bytes_element(b"a") + struct.pack("<I", 100) + b"0123456789",
            ("BYTES element 1 declares 100 bytes but only 10 remain",),
        ),
        (ABC + b"\x00\x00", ("incomplete string length indicator", "only 2 bytes available")),
        (
            ABC + bytes_element(b"d"),
            (
                "unexpected number of string elements 4 for inference input 'INPUT0' for model "
                "'strings', expecting 3",
            ),
        ),
    ],
    ids=["truncated-length-prefix", "empty", "length-past-end", "trailing-bytes", "extra-element"],
)
def test_malformed_bytes(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, raw: bytes, fragments: tuple[str, ...]
) -> None:
    request = raw_request("strings", [("INPUT0", "BYTES", [3], raw)])
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(err, grpc.StatusCode.INVALID_ARGUMENT, "input 'INPUT0'", *fragments)


@pytest.mark.parametrize("shape", [[1 << 40], [1 << 24, 1 << 24]], ids=["2^40", "2^48"])
def test_bytes_shape_far_larger_than_the_buffer(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, shape: list[int]
) -> None:
    """A tiny request declaring a huge BYTES shape is refused before anything is allocated for
    it (each element needs at least its 4-byte length)."""
    request = raw_request("strings", [("INPUT0", "BYTES", shape, ABC)])
    err = rpc_error(lambda: stub.ModelInfer(request, timeout=30))
    count = 1
    for dim in shape:
        count *= dim
    assert_rpc_error(
        err,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"expected {count} string elements for inference input 'INPUT0' for model 'strings', got 3",
    )


def test_well_formed_raw_bytes_by_hand(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    """The control for the malformed cases: the same hand-made request, well formed, works."""
    response = stub.ModelInfer(raw_request("strings", [("INPUT0", "BYTES", [3], ABC)]))
    assert response.raw_output_contents[0] == ABC


def test_non_utf8_bytes_for_string_model(client: grpcclient.InferenceServerClient) -> None:
    data = np.array([b"ok", b"\xff\xfe", b"fine"], dtype=np.object_)
    err = infer_error(client, "strings", [tensor("INPUT0", data, "BYTES")])
    assert_error(err, "INVALID_ARGUMENT", "input 'INPUT0'", "BYTES element 1", "UTF-8")


def test_non_utf8_bytes_in_typed_contents(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="strings")
    t = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[3])
    t.contents.bytes_contents.extend([b"a", b"b", b"\xc3\x28"])
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(
        err, grpc.StatusCode.INVALID_ARGUMENT, "input 'INPUT0'", "BYTES element 2", "UTF-8"
    )


# ---- typed contents ---------------------------------------------------------------------------


def test_typed_contents_element_count_mismatch(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_int8")
    t = request.inputs.add(name="INPUT0", datatype="INT8", shape=[1, 3])
    t.contents.int_contents.extend([1, 2])
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(
        err,
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'INPUT0' got 2 elements in contents.int_contents",
        "expected 3",
    )


def test_typed_contents_in_the_wrong_field(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_int8")
    t = request.inputs.add(name="INPUT0", datatype="INT8", shape=[1, 3])
    t.contents.int64_contents.extend([1, 2, 3])
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(
        err, grpc.StatusCode.INVALID_ARGUMENT, "got 0 elements in contents.int_contents"
    )


@pytest.mark.parametrize("value", [128, -129, 300])
def test_typed_contents_value_out_of_range(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, value: int
) -> None:
    """int_contents is int32 on the wire: a value INT8 cannot hold is the client's mistake."""
    request = service_pb2.ModelInferRequest(model_name="identity_int8")
    t = request.inputs.add(name="INPUT0", datatype="INT8", shape=[1, 3])
    t.contents.int_contents.extend([1, value, 3])
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(err, grpc.StatusCode.INVALID_ARGUMENT, "input 'INPUT0'", "INT8")


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_floats_have_no_typed_contents(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, datatype: str
) -> None:
    request = raw_request("identity_fp16", [("INPUT0", datatype, [1, 3], None)])
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(
        err,
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'INPUT0'",
        f"{datatype} can only be sent in raw_input_contents",
    )


def test_raw_and_typed_contents_together(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_request("identity_int8", [("INPUT0", "INT8", [1, 3], b"\x01\x02\x03")])
    request.inputs[0].contents.int_contents.extend([1, 2, 3])
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(
        err,
        grpc.StatusCode.INVALID_ARGUMENT,
        "contents field must not be specified when using raw_input_contents for 'INPUT0'",
        "for model 'identity_int8'",
    )


# ---- request parameters and unsupported features --------------------------------------------


@pytest.mark.parametrize(
    ("key", "setter", "fragment"),
    [
        ("priority", lambda p: setattr(p, "string_param", "high"), "must be an int64 or uint64"),
        ("timeout", lambda p: setattr(p, "int64_param", -5), "must be >= 0"),
        ("priority", lambda p: setattr(p, "bool_param", True), "must be an int64 or uint64"),
    ],
)
def test_bad_request_parameters(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    key: str,
    setter: Callable[[Any], None],
    fragment: str,
) -> None:
    request = raw_request("identity_int8", [("INPUT0", "INT8", [1, 3], b"\x01\x02\x03")])
    setter(request.parameters[key])
    err = rpc_error(lambda: stub.ModelInfer(request))
    assert_rpc_error(err, grpc.StatusCode.INVALID_ARGUMENT, f"request parameter '{key}'", fragment)


def test_shared_memory_input_is_unimplemented(client: grpcclient.InferenceServerClient) -> None:
    shm = grpcclient.InferInput("INPUT0", [1, 3], "INT8")
    shm.set_shared_memory("region", 3)
    err = infer_error(client, "identity_int8", [shm])
    assert_error(err, "UNIMPLEMENTED", "input 'INPUT0'", "shared memory is not supported")


def test_shared_memory_output_is_unimplemented(client: grpcclient.InferenceServerClient) -> None:
    out = grpcclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("region", 3)
    inputs = [tensor("INPUT0", np.zeros((1, 3), np.int8), "INT8")]
    err = infer_error(client, "identity_int8", inputs, outputs=[out])
    assert_error(err, "UNIMPLEMENTED", "output 'OUTPUT0'", "shared memory is not supported")


# ---- message size limit -----------------------------------------------------------------------


def test_message_over_the_configured_limit(
    repo: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """With --max-message-bytes capped, a bigger request gets RESOURCE_EXHAUSTED at once."""
    capped = start_server(repo, "--max-message-bytes", "4096", metrics=False)
    with grpcclient.InferenceServerClient(capped.url) as c:
        big = np.array([b"x" * 3000] * 3, dtype=np.object_)
        with pytest.raises(InferenceServerException) as info:
            c.infer("strings", [tensor("INPUT0", big, "BYTES")], client_timeout=30)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        small = np.array([b"x", b"y", b"z"], dtype=np.object_)
        result = c.infer("strings", [tensor("INPUT0", small, "BYTES")], client_timeout=30)
        assert result.as_numpy("OUTPUT0").tolist() == [b"x", b"y", b"z"]


# ---- broken model folders -------------------------------------------------------------------


def test_broken_folders_are_unavailable_with_a_reason(
    client: grpcclient.InferenceServerClient, repo: Path
) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    folders = {p.name for p in repo.iterdir() if p.is_dir()}
    assert set(index) == folders
    good = folders - set(BROKEN)
    assert {"add_sub", "strings", "identity_fp16", "identity_int8"} <= good
    for name in sorted(good):
        assert index[name].state == "READY", index[name].reason
        assert client.is_model_ready(name)
    for name in BROKEN:
        assert index[name].state == "UNAVAILABLE"
        assert not client.is_model_ready(name)
    assert "parse" in index["broken"].reason.lower()
    assert "config.pbtxt" in index["bad_config"].reason
    assert "INPUT0" in index["mismatched"].reason
    assert "INT64" in index["mismatched"].reason


# ---- bad input harms nothing ------------------------------------------------------------------


def _good(client: grpcclient.InferenceServerClient, seed: int) -> tuple[str, Any]:
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 9))
    a = rng.standard_normal((batch, 16)).astype(np.float32)
    b = rng.standard_normal((batch, 16)).astype(np.float32)
    result = client.infer("add_sub", [tensor("INPUT0", a), tensor("INPUT1", b)])
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    return "ok", batch


BAD_REQUESTS: list[tuple[str, Callable[[grpcclient.InferenceServerClient], Any]]] = [
    ("StatusCode.INVALID_ARGUMENT", lambda c: c.infer("add_sub", [tensor("INPUT0", fp32(1, 8))])),
    (
        "StatusCode.INVALID_ARGUMENT",
        lambda c: c.infer(
            "add_sub", [tensor("INPUT0", fp32(9, 16)), tensor("INPUT1", fp32(9, 16))]
        ),
    ),
    ("StatusCode.NOT_FOUND", lambda c: c.infer("nope", [tensor("INPUT0", fp32(1, 16))])),
    (
        "StatusCode.INVALID_ARGUMENT",
        lambda c: c.infer(
            "strings", [tensor("INPUT0", np.array([b"\xff"] * 3, dtype=np.object_), "BYTES")]
        ),
    ),
    (
        "StatusCode.INVALID_ARGUMENT",
        lambda c: c.infer(
            "add_sub",
            [tensor("INPUT0", fp32(1, 16)), tensor("INPUT1", fp32(1, 16))],
            outputs=[grpcclient.InferRequestedOutput("NOPE")],
        ),
    ),
]


def test_bad_requests_do_not_affect_concurrent_good_ones(
    client: grpcclient.InferenceServerClient,
) -> None:
    before = client.get_inference_statistics("add_sub").model_stats[0]
    jobs: list[tuple[str, Callable[[grpcclient.InferenceServerClient], Any]]] = []
    for i in range(60):
        jobs.append(("ok", functools.partial(_good, seed=i)))
    for i in range(60):
        jobs.append(BAD_REQUESTS[i % len(BAD_REQUESTS)])
    random.Random(7).shuffle(jobs)

    def run(job: tuple[str, Callable[[grpcclient.InferenceServerClient], Any]]) -> str:
        try:
            outcome = job[1](client)
        except InferenceServerException as exc:
            return exc.status()
        return outcome[0] if isinstance(outcome, tuple) else "unexpected success"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(run, jobs))
    assert outcomes == [expected for expected, _ in jobs]

    after = client.get_inference_statistics("add_sub").model_stats[0]
    assert after.inference_stats.success.count - before.inference_stats.success.count == 60
    # Requests that reached add_sub and were refused are counted as its failures (36 of them:
    # wrong shape, batch too big, unknown output); unknown models and undecodable requests
    # belong to no model.
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 36


def test_server_still_healthy_after_all_bad_input(
    client: grpcclient.InferenceServerClient, server: ServerProcess
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert _good(client, 1)[0] == "ok"
    assert server.proc.poll() is None
    assert not [line for line in server.lines if "Traceback" in line]
