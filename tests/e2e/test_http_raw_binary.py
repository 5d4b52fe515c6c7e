"""Triton's raw binary request over REST: `Inference-Header-Content-Length: 0` and a body that is
only the data of the model's one input, its shape deduced from the byte size; every output comes
back in binary. Written by hand (http.client): tritonclient has no call that sends one."""

from __future__ import annotations

import gzip
import http.client
import json
import struct
from collections.abc import Iterator

import numpy as np
import pytest
from onnx import TensorProto

from tests import onnx_models as om
from tests.e2e.server import ServerProcess

RAW = {"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"}


def _config(name: str, max_batch: int, datatype: str, dims: str) -> str:
    return (
        f'name: "{name}"\nmax_batch_size: {max_batch}\n'
        f'input [{{ name: "INPUT0" data_type: {datatype} dims: {dims} }}]\n'
        f'output [{{ name: "OUTPUT0" data_type: {datatype} dims: {dims} }}]\n'
    )


# name -> (ONNX element type, ONNX dims, max_batch_size, config data_type, config dims)
ONE_INPUT_MODELS = {
    "vector": (TensorProto.FLOAT, ["batch", "n"], 8, "TYPE_FP32", "[ -1 ]"),
    "fixed": (TensorProto.FLOAT, [2, 3], 0, "TYPE_FP32", "[ 2, 3 ]"),
    "matrix": (TensorProto.FLOAT, ["a", "b"], 0, "TYPE_FP32", "[ -1, -1 ]"),
    "blob": (TensorProto.STRING, [1], 0, "TYPE_STRING", "[ 1 ]"),
    "strings": (TensorProto.STRING, [3], 0, "TYPE_STRING", "[ 3 ]"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("raw_repo")
    for name, (elem, dims, max_batch, datatype, config_dims) in ONE_INPUT_MODELS.items():
        config = _config(name, max_batch, datatype, config_dims)
        om.write_model(root, name, om.identity(elem, dims), config=config)
    om.write_model(root, "add_sub", om.add_sub(), config=om.ADD_SUB_CONFIG)
    proc = ServerProcess(root).wait_ready()
    yield proc
    proc.stop()


def post(
    c: http.client.HTTPConnection, model: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    c.request("POST", f"/v2/models/{model}/infer", body=body, headers={**RAW, **(headers or {})})
    r = c.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def binary_outputs(headers: dict[str, str], body: bytes) -> tuple[dict, dict[str, bytes]]:
    """The JSON header of a binary response and each output's section, by name."""
    assert headers["content-type"] == "application/octet-stream"
    size = int(headers["inference-header-content-length"])
    doc = json.loads(body[:size])
    sections, offset = {}, size
    for out in doc["outputs"]:
        length = out["parameters"]["binary_data_size"]
        sections[out["name"]] = body[offset : offset + length]
        offset += length
    assert offset == len(body)
    return doc, sections


def error(status: int, body: bytes) -> str:
    assert status == 400, body
    return json.loads(body)["error"]


def test_a_batching_model_takes_the_body_as_batch_one_sized_from_its_bytes(
    conn: http.client.HTTPConnection,
) -> None:
    x = np.arange(5, dtype=np.float32)
    status, headers, body = post(conn, "vector", x.tobytes())
    assert status == 200, body
    doc, sections = binary_outputs(headers, body)
    (out,) = doc["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("OUTPUT0", "FP32", [1, 5])
    np.testing.assert_array_equal(np.frombuffer(sections["OUTPUT0"], np.float32), x)


def test_a_fixed_shape_model_takes_exactly_its_size(conn: http.client.HTTPConnection) -> None:
    x = np.arange(6, dtype=np.float32)
    status, headers, body = post(conn, "fixed", x.tobytes())
    assert status == 200, body
    doc, sections = binary_outputs(headers, body)
    assert doc["outputs"][0]["shape"] == [2, 3]
    np.testing.assert_array_equal(np.frombuffer(sections["OUTPUT0"], np.float32), x)

    status, _, body = post(conn, "fixed", x[:5].tobytes())
    assert "input byte size mismatch for input 'INPUT0' for model 'fixed'. Expected 24, got 20" in (
        error(status, body)
    )


def test_a_bytes_model_declared_one_takes_the_body_as_its_element(
    conn: http.client.HTTPConnection,
) -> None:
    payload = "any text, even ünïcode".encode()
    status, headers, body = post(conn, "blob", payload)
    assert status == 200, body
    doc, sections = binary_outputs(headers, body)
    assert (doc["outputs"][0]["datatype"], doc["outputs"][0]["shape"]) == ("BYTES", [1])
    assert sections["OUTPUT0"] == struct.pack("<I", len(payload)) + payload


def test_a_compressed_raw_body_is_inflated_first(conn: http.client.HTTPConnection) -> None:
    x = np.arange(7, dtype=np.float32)
    status, headers, body = post(
        conn, "vector", gzip.compress(x.tobytes()), {"Content-Encoding": "gzip"}
    )
    assert status == 200, body
    doc, sections = binary_outputs(headers, body)
    assert doc["outputs"][0]["shape"] == [1, 7]
    np.testing.assert_array_equal(np.frombuffer(sections["OUTPUT0"], np.float32), x)


@pytest.mark.parametrize(
    ("model", "body", "words"),
    [
        ("add_sub", bytes(128), "Raw request must only have 1 input (found 1) to be deduced but "
                                "got 2 inputs in 'add_sub' model configuration"),
        ("matrix", bytes(16), "The shape of the raw input 'INPUT0' can not be deduced because "
                              "there are more than one variable-sized dimension"),
        ("strings", b"abc", "For BYTE datatype raw input 'INPUT0', the model must have input "
                            "shape [1]"),
        ("vector", bytes(6), "a body of 6 bytes is not a whole number of FP32 elements"),
    ],
    ids=["two inputs", "two variable dims", "bytes not [1]", "partial element"],
)  # fmt: skip
def test_a_raw_request_that_cannot_be_deduced_is_a_precise_400(
    conn: http.client.HTTPConnection, model: str, body: bytes, words: str
) -> None:
    status, _, answer = post(conn, model, body)
    assert words in error(status, answer), answer
    # The connection and the server go on serving.
    status, _, _ = post(conn, "vector", np.ones(2, np.float32).tobytes())
    assert status == 200


def test_raw_requests_are_counted_in_statistics(
    conn: http.client.HTTPConnection, server: ServerProcess
) -> None:
    def successes() -> int:
        conn.request("GET", "/v2/models/fixed/stats")
        stats = json.loads(conn.getresponse().read())
        return stats["model_stats"][0]["inference_stats"]["success"]["count"]

    before = successes()
    for _ in range(3):
        assert post(conn, "fixed", bytes(24))[0] == 200
    assert successes() == before + 3
