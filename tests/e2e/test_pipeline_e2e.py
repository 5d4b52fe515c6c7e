"""A pipelined model served end to end: the real server, the real tritonclient, CPU stages."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.server import ServerProcess
from tests.fixtures import graphs

ENCODER_CONFIG = """
name: "encoder_pipe"
max_batch_size: 8
input [
  { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "mask" data_type: TYPE_INT64 dims: [ -1 ] }
]
output [ { name: "hidden" data_type: TYPE_FP32 dims: [ -1, 32 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
parameters { key: "pipeline_devices" value: { string_value: "cpu,cpu" } }
parameters { key: "micro_batch_size" value: { string_value: "2" } }
parameters { key: "pipeline_cost" value: { string_value: "estimate" } }
"""

BAD_DEVICE_CONFIG = """
name: "bad_pipe"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 10 ] } ]
parameters { key: "pipeline_devices" value: { string_value: "cpu,tpu:0" } }
"""


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[grpcclient.InferenceServerClient]:
    repo = tmp_path_factory.mktemp("pipeline_repo")
    for name, model, config in (
        ("encoder_pipe", "encoder", ENCODER_CONFIG),
        ("bad_pipe", "mlp", BAD_DEVICE_CONFIG),
    ):
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(graphs.torch_model(model), repo / name / "1" / "model.onnx")
        (repo / name / "config.pbtxt").write_text(config)
    proc = ServerProcess(repo).wait_ready()
    with grpcclient.InferenceServerClient(proc.url) as c:
        yield c
    assert proc.stop() == 0


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_pipelined_encoder_answers_like_one_session(
    client: grpcclient.InferenceServerClient,
) -> None:
    session = ort.InferenceSession(
        str(graphs.torch_model("encoder")), providers=["CPUExecutionProvider"]
    )
    for batch in (1, 3, 8):
        feeds = graphs.torch_inputs("encoder", batch, seed=batch)
        result = client.infer(
            "encoder_pipe",
            [_input("tokens", feeds["tokens"], "INT64"), _input("mask", feeds["mask"], "INT64")],
            client_timeout=30,
        )
        want = session.run(["hidden"], feeds)[0]
        np.testing.assert_allclose(result.as_numpy("hidden"), want, rtol=1e-5, atol=1e-6)


def test_bad_pipeline_config_makes_only_that_model_unavailable(
    client: grpcclient.InferenceServerClient,
) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["encoder_pipe"].state == "READY", index["encoder_pipe"].reason
    assert index["bad_pipe"].state == "UNAVAILABLE"
    assert "unknown device 'tpu:0'" in index["bad_pipe"].reason
    assert client.is_server_live()
