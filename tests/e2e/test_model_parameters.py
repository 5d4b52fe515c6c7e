"""config.pbtxt `parameters` and `optimization` through the real server: Triton's onnxruntime
keys and graph level load and serve, a typo'd key is reported in the server log with the key it
was probably meant to be, an accelerator that cannot run here is named with what runs instead,
and a bad value leaves only that model UNAVAILABLE with the reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from pipeserve.runtime.devices import cuda_usable
from tests import onnx_models as om
from tests.e2e.server import ServerProcess

HEAD = "max_batch_size: 4\ndynamic_batching { }\ninstance_group [ { count: 1 kind: KIND_CPU } ]\n"

TRITON_KEYS = (
    HEAD
    + """
optimization { graph { level: -1 } }
parameters { key: "execution_mode" value: { string_value: "1" } }
parameters { key: "inter_op_thread_count" value: { string_value: "1" } }
parameters { key: "enable_mem_arena" value: { string_value: "1" } }
parameters { key: "enable_mem_pattern" value: { string_value: "1" } }
parameters { key: "memory.enable_memory_arena_shrinkage" value: { string_value: "cpu:0" } }
parameters { key: "cudnn_conv_algo_search" value: { string_value: "1" } }
"""
)
TYPO = HEAD + 'parameters { key: "pipline_devices" value: { string_value: "cpu,cpu" } }\n'
ACCELERATOR = (
    HEAD
    + """
optimization { execution_accelerators {
  gpu_execution_accelerator : [ { name : "tensorrt"
    parameters { key: "precision_mode" value: "FP16" } } ]
} }
"""
)
BAD_VALUE = HEAD + 'parameters { key: "execution_mode" value: { string_value: "2" } }\n'


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("params_repo")
    for name, config in (
        ("triton_keys", TRITON_KEYS),
        ("typo", TYPO),
        ("accelerated", ACCELERATOR),
        ("bad_value", BAD_VALUE),
    ):
        om.write_model(root, name, om.mlp((8, 8, 2)), config=config)
    return root


def _infer(url: str, model: str) -> np.ndarray:
    x = np.ones((2, 8), dtype=np.float32)
    inp = grpcclient.InferInput("x", [2, 8], "FP32")
    inp.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(model, [inp])
    return result.as_numpy("y")


def test_parameters_and_optimization_at_load(
    repo: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(repo)
    for model in ("triton_keys", "typo", "accelerated"):
        assert _infer(server.url, model).shape == (2, 2), server.output()
    log = server.output()
    assert (
        "model 'typo': unknown parameter 'pipline_devices' is ignored "
        "(did you mean 'pipeline_devices'?)" in log
    )
    if not cuda_usable():
        assert (
            "model 'accelerated': gpu_execution_accelerator 'tensorrt' cannot be used: no CUDA "
            "device here: the model runs on the CPU" in log
        )
    with grpcclient.InferenceServerClient(server.url) as client:
        assert not client.is_model_ready("bad_value")
        index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["bad_value"].state == "UNAVAILABLE"
    assert "parameter 'execution_mode' is '2', expected one of 0 (sequential), 1 (parallel)" in (
        index["bad_value"].reason
    )
