"""Memory-mapped weights as a user meets them: `pipeserve pack` into a repository, the real
server maps the weight file, serves outputs identical to plain onnxruntime, refuses a truncated
weight file with the tensor named while other models serve, and unmaps on unload."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from tests import onnx_models as om
from tests.e2e.server import ServerProcess, wait_until


def _pack(source: Path, out_dir: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pipeserve", "pack", str(source), str(out_dir)],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def packed_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("weights")
    source = root / "src" / "mlp.onnx"
    source.parent.mkdir()
    onnx.save(om.mlp((64, 256, 32), seed=3), str(source))
    repo = root / "repo"
    _pack(source, repo / "packed" / "1")
    _pack(source, repo / "truncated" / "1")
    weights = repo / "truncated" / "1" / "weights.bin"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    om.write_model(repo, "plain", om.scale(2.0))
    return repo, source


def _mapped(pid: int, path: Path) -> bool:
    return str(path.resolve()) in Path(f"/proc/{pid}/maps").read_text()


def test_packed_model_is_mapped_served_identically_and_unmapped_on_unload(packed_repo):
    repo, source = packed_repo
    # The truncated model fails on purpose: readiness below is the server's own.
    server = ServerProcess(
        repo, "--model-control-mode", "explicit", "--load-model", "*", "--strict-readiness", "false"
    )
    try:
        server.wait_ready()
        weights = repo / "packed" / "1" / "weights.bin"
        with grpcclient.InferenceServerClient(server.url) as client:
            index = {m.name: m for m in client.get_model_repository_index().models}
            assert index["packed"].state == "READY"
            assert index["plain"].state == "READY"
            # A truncated weight file: refused at load, the tensor and file named.
            assert index["truncated"].state == "UNAVAILABLE"
            reason = index["truncated"].reason
            assert "weights.bin" in reason and "the index says" in reason
            assert "initializer 'w" in reason and "beyond its end" in reason

            x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
            tensor = grpcclient.InferInput("x", [4, 64], "FP32")
            tensor.set_data_from_numpy(x)
            served = client.infer("packed", [tensor]).as_numpy("y")
            reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
            np.testing.assert_allclose(served, reference.run(None, {"x": x})[0], rtol=1e-5)

            assert _mapped(server.proc.pid, weights), "the weight file should be mapped"
            client.unload_model("packed")
            assert wait_until(lambda: not _mapped(server.proc.pid, weights), timeout=10)
            # Unmapped: the file can go, and nothing of it stays in the server.
            os.remove(weights)
            assert client.is_server_ready()
    finally:
        assert server.stop() == 0
