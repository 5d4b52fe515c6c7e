"""Fixtures that start the real server over a temporary repository."""

from __future__ import annotations

import http.client
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from onnx import TensorProto

from tests import onnx_models as om
from tests.e2e.server import ServerProcess


def standard_repository(root: Path) -> Path:
    """add_sub (config given, batching), add_sub_auto (no config), strings (BYTES, no batching),
    int_identity (INT32 [2,3], no batching), broken (corrupt ONNX)."""
    om.write_model(root, "add_sub", om.add_sub(), config=om.ADD_SUB_CONFIG)
    om.write_model(root, "add_sub_auto", om.add_sub())
    om.write_model(root, "strings", om.identity(TensorProto.STRING, [3], "strings"))
    om.write_model(root, "int_identity", om.identity(TensorProto.INT32, [2, 3], "ints"))
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return standard_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    # The standard repository holds a broken model on purpose; with Triton's default strict
    # readiness the server would say not ready for good. These tests check the server's own
    # readiness (strict readiness: tests/e2e/test_triton_parity.py).
    proc = ServerProcess(repo, "--strict-readiness", "false").wait_ready()
    yield proc
    proc.stop()


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with custom arguments; all are stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(repo: Path, *args: str, metrics: bool = True) -> ServerProcess:
        proc = ServerProcess(repo, *args, metrics=metrics)
        started.append(proc)
        return proc.wait_ready()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def conn(server: ServerProcess) -> Iterator[http.client.HTTPConnection]:
    """A plain HTTP/1.1 connection to the module's `server` (REST tests written by hand)."""
    c = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    yield c
    c.close()
