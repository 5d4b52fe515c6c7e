"""Health, metadata, configuration and repository index through the real tritonclient, plus the
RPCs pipeserve does not implement (they must answer UNIMPLEMENTED with a clear message)."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


def _error(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


# ---- health -------------------------------------------------------------------------------


def test_server_is_live_and_ready(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


def test_model_ready_for_loaded_models_and_versions(
    client: grpcclient.InferenceServerClient,
) -> None:
    assert client.is_model_ready("add_sub") is True
    assert client.is_model_ready("add_sub", "1") is True
    assert client.is_model_ready("strings") is True


@pytest.mark.parametrize(
    ("name", "version"),
    [("add_sub", "2"), ("no_such_model", ""), ("broken", "")],
)
def test_model_not_ready(client: grpcclient.InferenceServerClient, name: str, version: str) -> None:
    # ModelReady answers false (not an error) for unknown models, versions and failed loads;
    # a version that is not a number is an error, as in Triton (test_triton_parity.py).
    assert client.is_model_ready(name, version) is False


# ---- server / model metadata --------------------------------------------------------------


def test_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "pipeserve"
    assert meta.version
    extensions = set(meta.extensions)
    assert {"model_repository", "model_configuration", "statistics"} <= extensions
    # Only what is implemented is advertised.
    assert {"classification", "schedule_policy"} <= extensions
    assert not extensions & {"system_shared_memory", "cuda_shared_memory", "sequence"}


def test_server_metadata_as_json(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "pipeserve"
    assert "statistics" in meta["extensions"]


def test_model_metadata_of_batching_model(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("add_sub")
    assert meta.name == "add_sub"
    assert list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    inputs = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
    outputs = [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
    # The batch dimension shows as -1 in metadata (Triton's convention).
    assert inputs == [("INPUT0", "FP32", [-1, 16]), ("INPUT1", "FP32", [-1, 16])]
    assert outputs == [("OUTPUT0", "FP32", [-1, 16]), ("OUTPUT1", "FP32", [-1, 16])]


def test_model_metadata_of_non_batching_models(client: grpcclient.InferenceServerClient) -> None:
    strings = client.get_model_metadata("strings", "1")
    assert [(t.name, t.datatype, list(t.shape)) for t in strings.inputs] == [
        ("INPUT0", "BYTES", [3])
    ]
    ints = client.get_model_metadata("int_identity", as_json=True)
    assert ints["outputs"] == [{"name": "OUTPUT0", "datatype": "INT32", "shape": ["2", "3"]}]


def test_model_metadata_of_unknown_model_and_version(
    client: grpcclient.InferenceServerClient,
) -> None:
    err = _error(lambda: client.get_model_metadata("no_such_model"))
    assert err.status() == "StatusCode.NOT_FOUND"
    assert err.message() == "Request for unknown model: 'no_such_model' is not found"
    err = _error(lambda: client.get_model_metadata("add_sub", "7"))
    assert err.status() == "StatusCode.NOT_FOUND"
    assert err.message() == "Request for unknown model: 'add_sub' version 7 is not found"


def test_model_metadata_of_failed_model_is_not_found(
    client: grpcclient.InferenceServerClient,
) -> None:
    err = _error(lambda: client.get_model_metadata("broken"))
    assert err.status() == "StatusCode.NOT_FOUND"
    assert "'broken'" in err.message()


# ---- model configuration --------------------------------------------------------------------


def test_auto_completed_config(client: grpcclient.InferenceServerClient) -> None:
    """add_sub_auto has no config.pbtxt: everything comes from the ONNX graph, as in Triton."""
    config = client.get_model_config("add_sub_auto").config
    assert config.name == "add_sub_auto"
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    assert config.default_model_filename == "model.onnx"
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("INPUT0", _fp32(), [16]),
        ("INPUT1", _fp32(), [16]),
    ]
    assert [(t.name, list(t.dims)) for t in config.output] == [
        ("OUTPUT0", [16]),
        ("OUTPUT1", [16]),
    ]
    assert len(config.instance_group) == 1
    assert config.instance_group[0].count == 1


def test_given_config_is_kept(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("add_sub", "1").config
    assert config.name == "add_sub"
    assert config.max_batch_size == 8
    assert [t.name for t in config.input] == ["INPUT0", "INPUT1"]


def test_non_batching_config(client: grpcclient.InferenceServerClient) -> None:
    """int_identity's first dimension is fixed (2): no batching, no dynamic_batching."""
    config = client.get_model_config("int_identity", as_json=True)["config"]
    assert config.get("max_batch_size", 0) == 0
    assert "dynamic_batching" not in config
    assert config["input"][0]["data_type"] == "TYPE_INT32"
    assert config["input"][0]["dims"] == ["2", "3"]
    strings = client.get_model_config("strings").config
    assert strings.input[0].data_type == grpcclient.model_config_pb2.TYPE_STRING


def test_config_of_unknown_model(client: grpcclient.InferenceServerClient) -> None:
    err = _error(lambda: client.get_model_config("nope"))
    assert err.status() == "StatusCode.NOT_FOUND"
    assert err.message() == "Request for unknown model: 'nope' is not found"


def _fp32() -> int:
    return grpcclient.model_config_pb2.TYPE_FP32


# ---- repository index -----------------------------------------------------------------------


def served_folders(repo: Path) -> list[str]:
    """Every model folder of the repository except the corrupt one."""
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and p.name != "broken")


def test_repository_index_shows_the_broken_model_with_its_reason(
    client: grpcclient.InferenceServerClient, repo: Path
) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert sorted(index) == sorted([*served_folders(repo), "broken"])
    assert {"add_sub", "add_sub_auto", "strings", "int_identity"} <= set(index)
    for name in served_folders(repo):
        assert (index[name].state, index[name].version, index[name].reason) == ("READY", "1", "")
    assert index["broken"].state == "UNAVAILABLE"
    assert "model.onnx" in index["broken"].reason
    assert "parse" in index["broken"].reason.lower()


def test_repository_index_ready_only(server: ServerProcess, repo: Path) -> None:
    # tritonclient does not expose the `ready` flag: call the stub directly.
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))
    assert sorted(m.name for m in ready.models) == served_folders(repo)


def test_statistics_of_unknown_model(client: grpcclient.InferenceServerClient) -> None:
    err = _error(lambda: client.get_inference_statistics("nope"))
    assert err.status() == "StatusCode.NOT_FOUND"
    assert err.message() == "Request for unknown model: 'nope' is not found"
    err = _error(lambda: client.get_inference_statistics("add_sub", "3"))
    assert err.status() == "StatusCode.NOT_FOUND"
    assert err.message() == "Request for unknown model: 'add_sub' version 3 is not found"


def test_statistics_list_every_served_version(
    client: grpcclient.InferenceServerClient, repo: Path
) -> None:
    stats = client.get_inference_statistics()
    listed = sorted((s.name, s.version) for s in stats.model_stats)
    assert listed == [(name, "1") for name in served_folders(repo)]


# ---- not implemented: UNIMPLEMENTED with a clear message --------------------------------------


UNIMPLEMENTED_CALLS: list[tuple[str, Callable[[grpcclient.InferenceServerClient], Any], str]] = [
    (
        "register_system_shared_memory",
        lambda c: c.register_system_shared_memory("region", "/key", 64),
        "system shared memory",
    ),
    (
        "get_system_shared_memory_status",
        lambda c: c.get_system_shared_memory_status(),
        "system shared memory",
    ),
    (
        "unregister_system_shared_memory",
        lambda c: c.unregister_system_shared_memory("region"),
        "system shared memory",
    ),
    (
        "register_cuda_shared_memory",
        lambda c: c.register_cuda_shared_memory("region", base64.b64encode(b"ipc"), 0, 64),
        "CUDA shared memory",
    ),
    (
        "get_cuda_shared_memory_status",
        lambda c: c.get_cuda_shared_memory_status(),
        "CUDA shared memory",
    ),
    (
        "unregister_cuda_shared_memory",
        lambda c: c.unregister_cuda_shared_memory(),
        "CUDA shared memory",
    ),
    ("get_trace_settings", lambda c: c.get_trace_settings(), "trace settings"),
    (
        "update_trace_settings",
        lambda c: c.update_trace_settings(settings={"trace_rate": "1"}),
        "trace settings",
    ),
    ("get_log_settings", lambda c: c.get_log_settings(), "log settings"),
    (
        "update_log_settings",
        lambda c: c.update_log_settings({"log_verbose_level": 1}),
        "log settings",
    ),
]


@pytest.mark.parametrize(
    ("call", "what"),
    [(call, what) for _, call, what in UNIMPLEMENTED_CALLS],
    ids=[name for name, _, _ in UNIMPLEMENTED_CALLS],
)
def test_unimplemented_rpcs_answer_unimplemented(
    client: grpcclient.InferenceServerClient,
    call: Callable[[grpcclient.InferenceServerClient], Any],
    what: str,
) -> None:
    err = _error(lambda: call(client))
    assert err.status() == "StatusCode.UNIMPLEMENTED"
    assert err.message() == f"{what} is not supported by pipeserve"


def test_server_still_serves_after_unimplemented_calls(
    client: grpcclient.InferenceServerClient,
) -> None:
    assert client.is_server_ready()
    assert client.is_model_ready("add_sub")
