"""Helpers for lifecycle e2e tests (control modes, shutdown): small `scale` and slow models,
atomic repository edits, the repository index as a dict, and client threads that send requests
while a model reloads."""

from __future__ import annotations

import os
import shutil
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from tests import onnx_models as om
from tests.e2e.server import ServerProcess, wait_until

POLL_SECS = 0.2
X = np.arange(8, dtype=np.float32).reshape(2, 4)

# A model slow enough (tens of ms per request on a 2-core machine) that requests queue up behind
# its one instance, so an unload or a stop really happens with requests in flight. Its input is
# tiny (256 bytes) so that every request sent reaches the server at once; the work comes from
# tiling it into a [SLOW_ROWS, 512] matrix inside the graph.
SLOW_ROWS = 128
SLOW_FEATURES = 64
SLOW_CONFIG = """
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


def slow_model() -> onnx.ModelProto:
    """x[batch, 64] -> tile to [batch * 256, 512] -> MatMul 512x2048 -> Relu -> 2048x2048 ->
    2048x4 -> mean over the 256 copies -> y[batch, 4]."""
    rng = np.random.default_rng(0)

    def weight(name: str, rows: int, cols: int) -> onnx.TensorProto:
        w = (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)
        return numpy_helper.from_array(w, name)

    inits = [
        numpy_helper.from_array(np.array([SLOW_ROWS, 512 // SLOW_FEATURES], np.int64), "repeats"),
        numpy_helper.from_array(np.array([-1, SLOW_ROWS, 4], np.int64), "per_request"),
        weight("w0", 512, 2048),
        weight("w1", 2048, 2048),
        weight("w2", 2048, 4),
    ]
    nodes = [
        helper.make_node("Tile", ["x", "repeats"], ["tiled"]),
        helper.make_node("MatMul", ["tiled", "w0"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "w1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"]),
        helper.make_node("Reshape", ["h2", "per_request"], ["grouped"]),
        helper.make_node("ReduceMean", ["grouped"], ["y"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SLOW_FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", om.OPSET)])
    model.ir_version = om.IR_VERSION
    onnx.checker.check_model(model)
    return model


def slow_input() -> grpcclient.InferInput:
    x = np.linspace(-1, 1, SLOW_FEATURES, dtype=np.float32).reshape(1, SLOW_FEATURES)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


# ---- helpers ----------------------------------------------------------------------------------


def client_for(server: ServerProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.url)


def scale_infer(
    client: grpcclient.InferenceServerClient, name: str, x: np.ndarray = X, version: str = ""
) -> np.ndarray:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(name, [inp], model_version=version).as_numpy("y")


def factor_of(client: grpcclient.InferenceServerClient, name: str, version: str = "") -> float:
    """The factor a `scale` model multiplies by (what tells its versions apart)."""
    y = scale_infer(client, name, version=version)
    factor = float(y[0, 1] / X[0, 1])
    np.testing.assert_allclose(y, X * factor, rtol=1e-6)
    return factor


def index_of(client: grpcclient.InferenceServerClient) -> dict[str, list[tuple[str, str, str]]]:
    """name -> [(version, state, reason)] from RepositoryIndex."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for m in client.get_model_repository_index().models:
        out.setdefault(m.name, []).append((m.version, m.state, m.reason))
    return out


def rpc_error(
    call: Callable[..., object], *args: object, **kwargs: object
) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def write_atomically(path: Path, data: bytes) -> None:
    """Write beside the target under a hidden name (the scanner skips those), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp"
    staging.write_bytes(data)
    os.replace(staging, path)


def place_model(
    repo: Path,
    name: str,
    versions: dict[int, onnx.ModelProto],
    config: str | None = None,
    filename: str = "model.onnx",
) -> Path:
    """Build the whole model folder under a hidden name, then rename it into place."""
    staging = repo / f".staging-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    for version, model in versions.items():
        (staging / str(version)).mkdir(parents=True)
        onnx.save(model, str(staging / str(version) / filename))
    if config is not None:
        (staging / "config.pbtxt").write_text(config)
    os.replace(staging, repo / name)
    return repo / name


def place_broken(repo: Path, name: str) -> None:
    """A model folder whose version 1 is not an ONNX model (its load fails at parsing)."""
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.onnx").write_bytes(b"\x08\x07 not a protobuf \xff\xff")


def remove_model(repo: Path, name: str) -> None:
    """Atomic removal: rename away to a hidden name first, then delete."""
    trash = repo / f".trash-{name}"
    os.replace(repo / name, trash)
    shutil.rmtree(trash)


def pending_requests(server: ServerProcess, model: str) -> float:
    """nv_inference_pending_request_count of `model` (requests accepted, not yet executing)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("nv_inference_pending_request_count{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def fire_slow_requests(
    client: grpcclient.InferenceServerClient, name: str, count: int
) -> list[Future[np.ndarray]]:
    """`count` async requests to a slow model; futures resolve to the output or the error."""
    futures: list[Future[np.ndarray]] = []
    for _ in range(count):
        future: Future[np.ndarray] = Future()

        def done(result, error, future=future):  # type: ignore[no-untyped-def]
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result.as_numpy("y"))

        client.async_infer(name, [slow_input()], done)
        futures.append(future)
    return futures


def wait_for_queue(server: ServerProcess, model: str, depth: int) -> None:
    assert wait_until(
        lambda: pending_requests(server, model) >= depth, timeout=20, interval=0.01
    ), f"requests to '{model}' never queued up {depth} deep"


class Sender:
    """Client threads that send requests to a `scale` model until stopped, recording every
    factor seen (in order, per thread) and every error."""

    def __init__(self, server: ServerProcess, name: str, threads: int = 2) -> None:
        self._server = server
        self._name = name
        self._stop = threading.Event()
        self.factors: list[list[float]] = [[] for _ in range(threads)]
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def __enter__(self) -> Sender:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self, i: int) -> None:
        client = client_for(self._server)
        while not self._stop.is_set():
            try:
                self.factors[i].append(factor_of(client, self._name))
            except Exception as exc:  # every failure is a test failure, recorded with its text
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def latest(self) -> float | None:
        seen = [f[-1] for f in self.factors if f]
        return seen[0] if len(set(seen)) == 1 else None

    def wait_for(self, factor: float, timeout: float = 30.0) -> None:
        assert wait_until(lambda: self.latest() == factor, timeout=timeout), (
            f"clients never saw factor {factor}; last seen {[f[-3:] for f in self.factors]}, "
            f"errors {self.errors[:3]}\n" + self._server.output()[-3000:]
        )

    def count(self) -> int:
        return sum(len(f) for f in self.factors)


def start(repo: Path, *args: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(repo, *args).wait_ready()
    yield proc
    proc.stop()
