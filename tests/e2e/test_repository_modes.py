"""Model lifecycle through the real tritonclient: control modes none / explicit / poll, version
policies, config checks against the graph, and requests in flight while models reload or unload.

Each mode gets one module-scoped server; tests that change a model use a model of their own so
their order does not matter.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient

from tests import onnx_models as om
from tests.e2e.lifecycle import (
    POLL_SECS,
    SLOW_CONFIG,
    Sender,
    client_for,
    factor_of,
    fire_slow_requests,
    index_of,
    place_broken,
    place_model,
    remove_model,
    rpc_error,
    scale_infer,
    slow_model,
    start,
    wait_for_queue,
    write_atomically,
)
from tests.e2e.server import ServerProcess, wait_until

# ---- mode none: everything loads at start; configs checked against their graphs ---------------

WRONG_NAME_CONFIG = 'name: "another_name"'
WRONG_DIMS_CONFIG = """
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 5 ] } ]
"""
WRONG_DTYPE_CONFIG = """
max_batch_size: 4
input [ { name: "x" data_type: TYPE_INT32 dims: [ 4 ] } ]
"""
UNKNOWN_INPUT_CONFIG = """
max_batch_size: 4
input [ { name: "not_an_input" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
BATCH_ON_FIXED_DIMS_CONFIG = "max_batch_size: 8"
# What a Triton user's ONNX model folder typically holds: every field spelled out, a GPU instance
# group (served on the CPU where no GPU exists), dynamic batching settings, a version policy.
TRITON_CONFIG = """
name: "from_triton"
platform: "onnxruntime_onnx"
max_batch_size: 16
version_policy: { latest: { num_versions: 1 } }
input [
  {
    name: "x"
    data_type: TYPE_FP32
    format: FORMAT_NONE
    dims: [ 4 ]
  }
]
output [
  {
    name: "y"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }
]
instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
}
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


@pytest.fixture(scope="module")
def none_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("none_repo")
    scale = om.scale
    place_model(repo, "plain", {1: scale(2.0)})
    place_model(repo, "default_latest", {1: scale(1.0), 2: scale(2.0)})
    place_model(
        repo,
        "latest_two",
        {1: scale(1.0), 2: scale(2.0), 3: scale(3.0)},
        "version_policy: { latest: { num_versions: 2 } }",
    )
    place_model(repo, "all_versions", {1: scale(1.0), 2: scale(2.0)}, "version_policy: { all: {} }")
    place_model(
        repo,
        "specific",
        {1: scale(1.0), 2: scale(2.0), 3: scale(3.0)},
        "version_policy: { specific: { versions: [ 1, 3 ] } }",
    )
    place_model(
        repo, "specific_missing", {1: scale(1.0)}, "version_policy: { specific: { versions: [5] } }"
    )
    place_model(
        repo, "custom_file", {1: scale(4.0)}, 'default_model_filename: "net.onnx"', "net.onnx"
    )
    place_model(repo, "wrong_name", {1: scale(1.0)}, WRONG_NAME_CONFIG)
    place_model(repo, "wrong_dims", {1: scale(1.0)}, WRONG_DIMS_CONFIG)
    place_model(repo, "wrong_dtype", {1: scale(1.0)}, WRONG_DTYPE_CONFIG)
    place_model(repo, "unknown_input", {1: scale(1.0)}, UNKNOWN_INPUT_CONFIG)
    place_model(
        repo,
        "batch_on_fixed",
        {1: om.identity(onnx.TensorProto.FLOAT, [2, 3])},
        BATCH_ON_FIXED_DIMS_CONFIG,
    )
    place_model(repo, "bad_pbtxt", {1: scale(1.0)}, "max_batch_size: {{ this is not pbtxt")
    place_model(repo, "from_triton", {1: om.scale(1.5), 2: om.scale(2.5)}, TRITON_CONFIG)
    place_model(
        repo,
        "two_instances",
        {1: scale(5.0)},
        "instance_group [ { count: 2 kind: KIND_CPU } ]",
    )
    (repo / "no_versions").mkdir()
    (repo / "no_versions" / "config.pbtxt").write_text("max_batch_size: 4")
    return repo


@pytest.fixture(scope="module")
def none_server(none_repo: Path) -> Iterator[ServerProcess]:
    yield from start(none_repo)


READY_AT_START = (
    "plain",
    "from_triton",
    "default_latest",
    "latest_two",
    "all_versions",
    "specific",
    "custom_file",
    "two_instances",
)


def test_none_mode_loads_every_good_model_at_start(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    index = index_of(client)
    for name in READY_AT_START:
        assert index[name] and all(state == "READY" for _, state, _ in index[name]), index[name]
        assert client.is_model_ready(name)
    assert factor_of(client, "plain") == 2.0
    # Triton's default strict readiness: the broken folders make the server not ready, while
    # every good model serves (tests/e2e/test_triton_parity.py covers both settings).
    assert not client.is_server_ready()


def test_none_mode_refuses_load_and_unload(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    for call in (client.load_model, client.unload_model):
        err = rpc_error(call, "plain")
        assert err.status() == "StatusCode.UNAVAILABLE"
        assert err.message().startswith(
            "explicit model load / unload is not allowed if polling is enabled"
        )
        assert "model control mode 'none'" in err.message()
        assert "--model-control-mode explicit" in err.message()
    # The refused unload changed nothing.
    assert client.is_model_ready("plain")
    assert factor_of(client, "plain") == 2.0


def test_default_version_policy_serves_the_latest_version_only(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    assert [v for v, _, _ in index_of(client)["default_latest"]] == ["2"]
    assert factor_of(client, "default_latest") == 2.0
    assert not client.is_model_ready("default_latest", "1")
    err = rpc_error(scale_infer, client, "default_latest", version="1")
    assert err.status() == "StatusCode.NOT_FOUND"
    assert "'default_latest' version 1 is not found" in err.message()


def test_version_policy_latest_n(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    assert [v for v, _, _ in index_of(client)["latest_two"]] == ["2", "3"]
    assert factor_of(client, "latest_two", "2") == 2.0
    assert factor_of(client, "latest_two", "3") == 3.0
    assert factor_of(client, "latest_two") == 3.0  # no version: the newest
    assert not client.is_model_ready("latest_two", "1")
    assert client.get_model_metadata("latest_two").versions == ["2", "3"]


def test_version_policy_all(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    assert [v for v, _, _ in index_of(client)["all_versions"]] == ["1", "2"]
    assert factor_of(client, "all_versions", "1") == 1.0
    assert factor_of(client, "all_versions", "2") == 2.0


def test_version_policy_specific(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    assert [v for v, _, _ in index_of(client)["specific"]] == ["1", "3"]
    assert factor_of(client, "specific", "1") == 1.0
    assert factor_of(client, "specific", "3") == 3.0
    assert not client.is_model_ready("specific", "2")
    assert rpc_error(scale_infer, client, "specific", version="2").status() == (
        "StatusCode.NOT_FOUND"
    )


def test_default_model_filename(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    assert factor_of(client, "custom_file") == 4.0
    config = client.get_model_config("custom_file").config
    assert config.default_model_filename == "net.onnx"


def test_a_folder_copied_from_a_triton_repository_is_served(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    assert [v for v, _, _ in index_of(client)["from_triton"]] == ["2"]
    assert factor_of(client, "from_triton") == 2.5
    config = client.get_model_config("from_triton").config
    assert config.max_batch_size == 16
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert scale_infer(client, "from_triton", np.ones((16, 4), np.float32)).shape == (16, 4)


def test_instance_group_count_two(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    config = client.get_model_config("two_instances").config
    assert [g.count for g in config.instance_group] == [2]
    assert any("model 'two_instances': 2 instance(s)" in line for line in none_server.lines)
    # Both instances serve: more concurrent requests than instances all complete correctly.
    x = np.ones((1, 4), np.float32)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(scale_infer(client_for(none_server), "two_instances", x))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(results) == 6 and all(np.array_equal(r, x * 5.0) for r in results)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("wrong_name", "model name in config 'another_name' does not match the folder name"),
        ("wrong_dims", "input 'x' has dims [5] in config but the ONNX model declares [4]"),
        (
            "wrong_dtype",
            "input 'x' has data_type TYPE_INT32 in config but the ONNX model declares TYPE_FP32",
        ),
        ("unknown_input", "unexpected input 'not_an_input' in config"),
        ("batch_on_fixed", "batching needs a variable first dimension"),
        ("bad_pbtxt", "invalid model configuration"),
        ("specific_missing", "version_policy asks for versions [5]"),
        ("no_versions", "no version folder"),
    ],
)
def test_bad_model_folder_is_unavailable_with_its_reason(
    none_server: ServerProcess, name: str, reason: str
) -> None:
    client = client_for(none_server)
    entries = index_of(client)[name]
    assert len(entries) == 1
    _, state, got = entries[0]
    assert state == "UNAVAILABLE"
    assert reason in got, got
    assert not client.is_model_ready(name)
    err = rpc_error(scale_infer, client, name)
    # A model whose only load failed has no version to serve: unknown, as Triton answers.
    assert err.status() == "StatusCode.NOT_FOUND", err
    # ... and the rest of the server is unharmed.
    assert factor_of(client, "plain") == 2.0


# ---- mode explicit: load / unload RPCs --------------------------------------------------------


@pytest.fixture(scope="module")
def explicit_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("explicit_repo")
    place_model(repo, "first", {1: om.scale(2.0)})
    place_model(repo, "untouched", {1: om.scale(3.0)})
    place_model(repo, "cycled", {1: om.scale(5.0)})
    place_model(repo, "overridden", {1: om.scale(6.0)})
    place_model(repo, "changing", {1: om.scale(2.0)})
    place_model(repo, "slow", {1: slow_model()}, SLOW_CONFIG)
    place_broken(repo, "broken")
    return repo


@pytest.fixture(scope="module")
def explicit_server(explicit_repo: Path) -> Iterator[ServerProcess]:
    yield from start(explicit_repo, "--model-control-mode", "explicit", "--load-model", "first")


def test_explicit_mode_loads_only_the_named_models(explicit_server: ServerProcess) -> None:
    client = client_for(explicit_server)
    assert client.is_model_ready("first")
    assert factor_of(client, "first") == 2.0
    assert not client.is_model_ready("untouched")
    index = index_of(client)
    assert index["first"] == [("1", "READY", "")]
    assert [state for _, state, _ in index["untouched"]] == ["UNAVAILABLE"]
    err = rpc_error(scale_infer, client, "untouched")
    assert err.status() == "StatusCode.NOT_FOUND"
    assert err.message() == "Request for unknown model: 'untouched' is not found"


def test_explicit_load_then_unload(explicit_server: ServerProcess) -> None:
    client = client_for(explicit_server)
    client.load_model("cycled")
    assert client.is_model_ready("cycled")
    assert index_of(client)["cycled"] == [("1", "READY", "")]
    assert factor_of(client, "cycled") == 5.0

    client.unload_model("cycled")
    assert not client.is_model_ready("cycled")
    assert index_of(client)["cycled"] == [("", "UNAVAILABLE", "unloaded")]
    assert rpc_error(scale_infer, client, "cycled").status() == "StatusCode.NOT_FOUND"

    client.load_model("cycled")  # and back
    assert factor_of(client, "cycled") == 5.0


def test_explicit_load_with_config_override(explicit_server: ServerProcess) -> None:
    client = client_for(explicit_server)
    client.load_model("overridden", config=json.dumps({"max_batch_size": 2}))
    assert client.get_model_config("overridden").config.max_batch_size == 2
    assert factor_of(client, "overridden") == 6.0  # X has 2 rows
    err = rpc_error(scale_infer, client, "overridden", np.ones((3, 4), np.float32))
    assert err.status() == "StatusCode.INVALID_ARGUMENT"

    # Without an override the folder's own (auto-completed) config comes back.
    client.load_model("overridden")
    assert client.get_model_config("overridden").config.max_batch_size == 4
    assert scale_infer(client, "overridden", np.ones((3, 4), np.float32)).shape == (3, 4)


def test_explicit_override_that_fails_keeps_the_old_version(explicit_server: ServerProcess) -> None:
    client = client_for(explicit_server)
    client.load_model("first")
    err = rpc_error(client.load_model, "first", config=json.dumps({"name": "someone_else"}))
    assert "does not match the folder name 'first'" in err.message()
    err = rpc_error(
        client.load_model,
        "first",
        config=json.dumps(
            {"max_batch_size": 4, "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [7]}]}
        ),
    )
    assert "has dims [7] in config but the ONNX model declares [4]" in err.message()
    err = rpc_error(client.load_model, "first", config="{ not json")
    assert err.status() == "StatusCode.INTERNAL"  # Triton's status for a load that never started
    assert "invalid JSON model configuration override" in err.message()
    assert client.is_model_ready("first")
    assert factor_of(client, "first") == 2.0


def test_explicit_load_from_files(explicit_server: ServerProcess) -> None:
    client = client_for(explicit_server)
    config = {
        "backend": "onnxruntime",
        "max_batch_size": 4,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}],
    }
    files = {"file:1/model.onnx": om.scale(9.0).SerializeToString()}
    client.load_model("from_files", config=json.dumps(config), files=files)
    assert client.is_model_ready("from_files")
    assert factor_of(client, "from_files") == 9.0
    assert client.get_model_config("from_files").config.name == "from_files"

    # Files replace the repository folder for that load, even for a model that has one.
    files = {"file:1/model.onnx": om.scale(11.0).SerializeToString()}
    client.load_model("untouched", config=json.dumps(config), files=files)
    assert factor_of(client, "untouched") == 11.0
    client.unload_model("untouched")

    client.unload_model("from_files")
    assert not client.is_model_ready("from_files")


def test_explicit_load_with_bad_files(explicit_server: ServerProcess) -> None:
    client = client_for(explicit_server)
    model = om.scale(1.0).SerializeToString()
    err = rpc_error(client.load_model, "no_config", files={"file:1/model.onnx": model})
    assert "needs a 'config' parameter" in err.message()
    err = rpc_error(
        client.load_model, "escape", config="{}", files={"file:../../outside.onnx": model}
    )
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "leaves the model folder" in err.message()
    err = rpc_error(
        client.load_model, "garbage", config="{}", files={"file:1/model.onnx": b"not onnx"}
    )
    assert "failed to parse ONNX model" in err.message()
    assert not client.is_model_ready("garbage")
    # A file name the file system cannot hold (Triton's own model-control example sends one):
    # the load never starts, with Triton's status and words, and the server goes on.
    err = rpc_error(client.load_model, "long", config="{}", files={"file:" + "A" * 256: model})
    assert err.status() == "StatusCode.INTERNAL"
    assert err.message().startswith(
        "failed to load 'long', failed to poll from model repository: could not write 'file:AAAA"
    )
    assert "File name too long" in err.message()
    assert client.is_server_live() and not client.is_model_ready("long")


@pytest.mark.parametrize(
    "name", ["..", "../etc", "a/../b", "/etc", "model/", " ..", ".. ", "a\\b", "x\0y"]
)
def test_explicit_load_of_a_path_is_refused_before_it_touches_the_disk(
    explicit_server: ServerProcess, name: str
) -> None:
    """A load's model name is one folder of the repository (Triton's own input-validation
    test sends these): the same answer whether or not such a path exists."""
    client = client_for(explicit_server)
    err = rpc_error(client.load_model, name)
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "model name must not contain path traversal characters" in err.message()
    assert client.is_server_live()


@pytest.mark.parametrize("name", ["", " ", "\t\n"])
def test_explicit_load_of_an_empty_name_is_refused(
    explicit_server: ServerProcess, name: str
) -> None:
    err = rpc_error(client_for(explicit_server).load_model, name)
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.message() == "Model name cannot be empty. Please enter a valid name to deploy."


@pytest.mark.parametrize("name", ["...", "..my_model", ".hidden"])
def test_explicit_load_of_a_hidden_name_is_not_found(
    explicit_server: ServerProcess, name: str
) -> None:
    err = rpc_error(client_for(explicit_server).load_model, name)
    assert err.status() == "StatusCode.INTERNAL"  # as for a folder that is not there
    assert err.message().startswith(
        f"failed to load '{name}', failed to poll from model repository"
    )
    assert "path traversal" not in err.message()


def test_explicit_load_of_an_unknown_model_fails(explicit_server: ServerProcess) -> None:
    client = client_for(explicit_server)
    err = rpc_error(client.load_model, "no_such_model")
    assert "no model folder 'no_such_model' in the model repository" in err.message()
    assert not client.is_model_ready("no_such_model")
    assert "no_such_model" not in index_of(client)


def test_explicit_load_of_a_broken_model_fails_with_the_reason(
    explicit_server: ServerProcess,
) -> None:
    client = client_for(explicit_server)
    err = rpc_error(client.load_model, "broken")
    assert err.status() == "StatusCode.INVALID_ARGUMENT"  # Triton's status for a failed load
    assert err.message().startswith("load failed for model 'broken': ")
    assert "failed to parse ONNX model" in err.message()
    [(_, state, reason)] = index_of(client)["broken"]
    assert state == "UNAVAILABLE"
    assert "failed to parse ONNX model" in reason
    # Strict readiness: a model that failed is one that should be loaded and is not...
    assert not client.is_server_ready()
    # ...until it is unloaded on purpose.
    client.unload_model("broken")
    assert index_of(client)["broken"] == [("", "UNAVAILABLE", "unloaded")]


def test_explicit_reload_of_a_changed_model_never_fails_a_request(
    explicit_server: ServerProcess, explicit_repo: Path
) -> None:
    client = client_for(explicit_server)
    client.load_model("changing")
    assert factor_of(client, "changing") == 2.0
    write_atomically(
        explicit_repo / "changing" / "1" / "model.onnx", om.scale(7.0).SerializeToString()
    )
    time.sleep(POLL_SECS * 3)
    assert factor_of(client, "changing") == 2.0  # explicit mode does not watch the folder
    with Sender(explicit_server, "changing") as sender:
        sender.wait_for(2.0)
        client.load_model("changing")
        sender.wait_for(7.0)
    assert not sender.errors, sender.errors[:5]
    assert factor_of(client, "changing") == 7.0


def state_of(client: grpcclient.InferenceServerClient, name: str) -> str:
    return ",".join(state for _, state, _ in index_of(client).get(name, []))


def test_explicit_reload_and_unload_complete_requests_in_flight(
    explicit_server: ServerProcess,
) -> None:
    client = client_for(explicit_server)
    # A first load of a model with big weights takes a moment: the index says LOADING meanwhile.
    states: list[str] = []
    loader = threading.Thread(target=client_for(explicit_server).load_model, args=("slow",))
    loader.start()
    while loader.is_alive():
        states.append(state_of(client, "slow"))
    loader.join()
    assert "LOADING" in states, states
    assert state_of(client, "slow") == "READY"

    futures = fire_slow_requests(client, "slow", 8)
    wait_for_queue(explicit_server, "slow", 3)
    client.load_model("slow")  # reload: the old version drains what it accepted
    reloaded = [f.result(timeout=60) for f in futures]  # raises if any request failed
    assert all(o.shape == (1, 4) for o in reloaded)

    futures = fire_slow_requests(client, "slow", 8)
    wait_for_queue(explicit_server, "slow", 3)
    unloader = threading.Thread(target=client_for(explicit_server).unload_model, args=("slow",))
    unloader.start()
    assert wait_until(lambda: state_of(client, "slow") == "UNLOADING", timeout=20, interval=0.01)
    unloader.join(timeout=60)
    outputs = [f.result(timeout=60) for f in futures]  # raises if any request failed
    assert all(np.array_equal(o, reloaded[0]) for o in outputs + reloaded)
    assert not client.is_model_ready("slow")
    assert index_of(client)["slow"] == [("", "UNAVAILABLE", "unloaded")]


# ---- mode poll: the repository is watched -----------------------------------------------------


@pytest.fixture(scope="module")
def poll_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("poll_repo")
    place_model(repo, "steady", {1: om.scale(1.0)})
    place_model(repo, "live", {1: om.scale(1.0)})
    place_model(repo, "slow", {1: slow_model()}, SLOW_CONFIG)
    return repo


@pytest.fixture(scope="module")
def poll_server(poll_repo: Path) -> Iterator[ServerProcess]:
    yield from start(
        poll_repo, "--model-control-mode", "poll", "--repository-poll-secs", str(POLL_SECS)
    )


def saw_log(server: ServerProcess, text: str) -> Callable[[], bool]:
    return lambda: any(text in line for line in server.lines)


def test_poll_mode_refuses_explicit_load(poll_server: ServerProcess) -> None:
    err = rpc_error(client_for(poll_server).load_model, "steady")
    assert err.status() == "StatusCode.UNAVAILABLE"
    assert "model control mode 'poll'" in err.message()


def test_poll_loads_a_new_model_folder(poll_server: ServerProcess, poll_repo: Path) -> None:
    client = client_for(poll_server)
    assert not client.is_model_ready("added")
    place_model(poll_repo, "added", {1: om.scale(4.0)})
    assert wait_until(lambda: client.is_model_ready("added"), timeout=20)
    assert factor_of(client, "added") == 4.0
    assert index_of(client)["added"] == [("1", "READY", "")]


def test_poll_reload_under_load_never_fails_a_request(
    poll_server: ServerProcess, poll_repo: Path
) -> None:
    """Changed weights, a new version, a changed config, a broken change and its fix, all while
    two client threads send requests without pause: every request succeeds, and no client ever
    sees an older model after a newer one."""
    client = client_for(poll_server)
    folder = poll_repo / "live"
    with Sender(poll_server, "live") as sender:
        sender.wait_for(1.0)
        write_atomically(folder / "1" / "model.onnx", om.scale(2.0).SerializeToString())
        sender.wait_for(2.0)

        staging = folder / ".2"  # hidden until renamed: the scanner skips it
        staging.mkdir()
        onnx.save(om.scale(3.0), str(staging / "model.onnx"))
        os.replace(staging, folder / "2")
        sender.wait_for(3.0)
        assert wait_until(lambda: not client.is_model_ready("live", "1"), timeout=20)

        write_atomically(folder / "config.pbtxt", b"max_batch_size: 8")
        assert wait_until(
            lambda: client.get_model_config("live").config.max_batch_size == 8, timeout=20
        )

        write_atomically(folder / "2" / "model.onnx", b"broken weights")
        assert wait_until(saw_log(poll_server, "reload of model 'live' failed"), timeout=20)
        time.sleep(POLL_SECS * 3)
        assert sender.latest() == 3.0  # the old version keeps serving
        assert client.is_model_ready("live")

        write_atomically(folder / "2" / "model.onnx", om.scale(4.0).SerializeToString())
        sender.wait_for(4.0)
    assert not sender.errors, sender.errors[:5]
    assert sender.count() > 20
    for seen in sender.factors:
        assert set(seen) <= {1.0, 2.0, 3.0, 4.0}
        assert seen == sorted(seen), "a client saw an older model after a newer one"


def test_poll_copy_in_non_atomically_is_served_eventually(
    poll_server: ServerProcess, poll_repo: Path
) -> None:
    """A folder copied in file by file, slower than the poll interval: the server may see it
    half-written (and fail to load it), but serves it once the copy is complete."""
    client = client_for(poll_server)
    folder = poll_repo / "copied"
    folder.mkdir()
    (folder / "config.pbtxt").write_text("max_batch_size: 4")
    time.sleep(POLL_SECS * 2)
    (folder / "1").mkdir()
    data = om.scale(8.0).SerializeToString()
    with open(folder / "1" / "model.onnx", "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(POLL_SECS * 2)
        f.write(data[len(data) // 2 :])
    assert wait_until(lambda: client.is_model_ready("copied"), timeout=20), poll_server.output()
    assert factor_of(client, "copied") == 8.0


def test_poll_broken_new_folder_is_reported_then_fixed(
    poll_server: ServerProcess, poll_repo: Path
) -> None:
    client = client_for(poll_server)
    folder = poll_repo / "fixme"
    staging = poll_repo / ".fixme"
    (staging / "1").mkdir(parents=True)
    (staging / "1" / "model.onnx").write_bytes(b"garbage")
    os.replace(staging, folder)

    def unavailable_with_reason() -> bool:
        entries = index_of(client).get("fixme", [])
        return any(s == "UNAVAILABLE" and "failed to parse ONNX model" in r for _, s, r in entries)

    assert wait_until(unavailable_with_reason, timeout=20), index_of(client).get("fixme")
    write_atomically(folder / "1" / "model.onnx", om.scale(3.0).SerializeToString())
    assert wait_until(lambda: client.is_model_ready("fixme"), timeout=20)
    assert factor_of(client, "fixme") == 3.0


def test_poll_removed_folder_unloads_after_requests_in_flight_complete(
    poll_server: ServerProcess, poll_repo: Path
) -> None:
    client = client_for(poll_server)
    assert client.is_model_ready("slow")
    futures = fire_slow_requests(client, "slow", 8)
    wait_for_queue(poll_server, "slow", 3)
    remove_model(poll_repo, "slow")
    outputs = [f.result(timeout=60) for f in futures]  # raises if any request failed
    assert all(o.shape == (1, 4) for o in outputs)
    # Once drained and unloaded, the model is gone from the index and unknown.
    assert wait_until(lambda: "slow" not in index_of(client), timeout=20), index_of(client)
    assert not client.is_model_ready("slow")
    assert rpc_error(scale_infer, client, "slow").status() == "StatusCode.NOT_FOUND"
    assert factor_of(client, "steady") == 1.0


def test_poll_non_atomic_removal_unloads(poll_server: ServerProcess, poll_repo: Path) -> None:
    client = client_for(poll_server)
    place_model(poll_repo, "doomed", {1: om.scale(2.0), 2: om.scale(3.0)})
    assert wait_until(lambda: client.is_model_ready("doomed"), timeout=20)
    shutil.rmtree(poll_repo / "doomed")
    assert wait_until(lambda: "doomed" not in index_of(client), timeout=20), index_of(client)
    assert rpc_error(scale_infer, client, "doomed").status() == "StatusCode.NOT_FOUND"
    # The name can come back.
    place_model(poll_repo, "doomed", {1: om.scale(6.0)})
    assert wait_until(lambda: client.is_model_ready("doomed"), timeout=20)
    assert factor_of(client, "doomed") == 6.0


def test_poll_removed_version_folder_unloads_that_version_only(
    poll_server: ServerProcess, poll_repo: Path
) -> None:
    client = client_for(poll_server)
    place_model(
        poll_repo,
        "versions",
        {1: om.scale(1.0), 2: om.scale(2.0)},
        "version_policy: { all: {} }",
    )
    assert wait_until(lambda: client.is_model_ready("versions", "2"), timeout=20)
    assert factor_of(client, "versions", "1") == 1.0
    trash = poll_repo / "versions" / ".2-removed"
    os.replace(poll_repo / "versions" / "2", trash)
    shutil.rmtree(trash)
    assert wait_until(lambda: not client.is_model_ready("versions", "2"), timeout=20)
    assert [v for v, _, _ in index_of(client)["versions"]] == ["1"]
    assert factor_of(client, "versions") == 1.0
    err = rpc_error(scale_infer, client, "versions", version="2")
    assert err.status() == "StatusCode.NOT_FOUND"
