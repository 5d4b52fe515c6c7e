"""The example repository in models/ is served as the README promises."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.server import ServerProcess

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def client():
    proc = ServerProcess(MODELS).wait_ready()
    with grpcclient.InferenceServerClient(proc.url) as c:
        yield c
    assert proc.stop() == 0


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_every_example_is_ready(client):
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {"add_sub": "READY", "mlp": "READY", "text_upper": "READY"}


def test_add_sub(client):
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.full((2, 16), 3, dtype=np.float32)
    result = client.infer("add_sub", [_input("INPUT0", a, "FP32"), _input("INPUT1", b, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_text_upper(client):
    text = np.array(["hello", "grün", ""], dtype=object)
    result = client.infer("text_upper", [_input("TEXT", text, "BYTES")])
    assert result.as_numpy("UPPER").tolist() == [b"HELLO", "GRÜN".encode(), b""]


def test_mlp_config_is_auto_completed(client):
    config = client.get_model_config("mlp").config
    assert config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    probabilities = client.infer("mlp", [_input("input", x, "FP32")]).as_numpy("probabilities")
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_generator_reproduces_committed_models(tmp_path):
    copy = tmp_path / "models"
    shutil.copytree(MODELS, copy, ignore=shutil.ignore_patterns("*.onnx"))
    subprocess.run([sys.executable, str(copy / "generate.py")], check=True, capture_output=True)
    for committed in MODELS.glob("*/1/model.onnx"):
        regenerated = copy / committed.relative_to(MODELS)
        assert regenerated.read_bytes() == committed.read_bytes(), f"{committed} is stale"
