"""Triton Inference Server as a reference row for bench/batching.py: Triton's own server binary
with a Python-backend model that calls onnxruntime (the issue's reference set-up), same model
file, same batching config, same onnxruntime thread count as pipeserve.

Triton is not a pipeserve dependency. Its server binary and Python backend come with PyTriton:

    python3 -m venv /tmp/pytriton && /tmp/pytriton/bin/pip install nvidia-pytriton==0.7.0
    .venv/bin/python bench/batching.py --triton \
        /tmp/pytriton/lib/python3.11/site-packages/pytriton/tritonserver

The backend's stub embeds the system's libpython; it finds numpy and onnxruntime through the
benchmark's own virtualenv, put first on PATH (an embedded interpreter locates its prefix from
the `python3` on PATH).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MODEL_PY = """\
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        options = ort.SessionOptions()
        # 0: onnxruntime's own default (one thread per core).
        options.intra_op_num_threads = int(os.environ.get("REFERENCE_INTRA_OP_THREADS", "1"))
        options.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
        y = self.session.run(["y"], {"x": np.concatenate(xs)})[0]
        responses, offset = [], 0
        for x in xs:
            part = y[offset : offset + len(x)]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", part)]))
            offset += len(x)
        return responses
"""


def write_repository(root: Path, model: Path, max_batch: int, io: str, name: str = "mlp") -> Path:
    """A Triton repository with one Python-backend model `name` (input x, output y; dynamic
    batching, delay 0, one CPU instance). Call again with another name to add a model."""
    folder = root / name
    (folder / "1").mkdir(parents=True)
    os.link(model, folder / "1" / "model.onnx")
    (folder / "1" / "model.py").write_text(MODEL_PY)
    (folder / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n{io}'
        "dynamic_batching { }\ninstance_group [{ kind: KIND_CPU count: 1 }]\n"
    )
    return root


def backends(home: Path, root: Path) -> Path:
    """A backend directory whose python backend has the stub for this Python version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"no Python {version} backend stub under {home}")
    python = root / "backends" / "python"
    python.mkdir(parents=True)
    for item in (home / "backends" / "python").iterdir():
        if item.is_file():
            (python / item.name).symlink_to(item)
    (python / "triton_python_backend_stub").symlink_to(stub)
    return root / "backends"


def command(
    home: Path, repository: Path, backend_dir: Path, port: int, http_port: int | None = None
) -> list[str]:
    """tritonserver serving gRPC on `port`; HTTP/REST on `http_port` when given, else off."""
    http = ["--http-port", str(http_port)] if http_port is not None else ["--allow-http", "false"]
    return [
        str(home / "bin" / "tritonserver"),
        "--model-repository",
        str(repository),
        "--backend-directory",
        str(backend_dir),
        "--grpc-port",
        str(port),
        *http,
        "--allow-metrics",
        "false",
    ]


def environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["REFERENCE_INTRA_OP_THREADS"] = str(threads)
    return env
