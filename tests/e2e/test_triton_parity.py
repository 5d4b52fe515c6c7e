"""Triton parity through the real tritonclient: configs whose sections pipeserve does not
implement are refused by name (never silently served), and the answers Triton's clients and QA
scripts check (status codes, message prefixes) match Triton's.

One module-scoped server per control mode; tests that change a model use a model of their own.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from pipeserve.api.generated import health_pb2, health_pb2_grpc
from tests import onnx_models as om
from tests.e2e.lifecycle import (
    POLL_SECS,
    client_for,
    factor_of,
    index_of,
    place_broken,
    place_model,
    rpc_error,
    scale_infer,
    start,
    write_atomically,
)
from tests.e2e.server import ServerProcess, wait_until

# ---- config honesty: nothing silently ignored --------------------------------------------------

REFUSED = {
    "sequence": (
        "max_batch_size: 4\nsequence_batching { max_sequence_idle_microseconds: 1000 }",
        "config section 'sequence_batching' is not supported",
    ),
    "ensemble": (
        'ensemble_scheduling { step [ { model_name: "plain" model_version: -1 } ] }',
        "config section 'ensemble_scheduling' is not supported",
    ),
    "cached": (
        "response_cache { enable: true }",
        "config section 'response_cache' is not supported",
    ),
    "shape_tensor": (
        'max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] '
        "is_shape_tensor: true } ]",
        "config section 'input.is_shape_tensor' (input 'x') is not supported",
    ),
}


WARMUP = """
max_batch_size: 8
model_warmup [ {{
  name: "{name}" batch_size: 4 count: 2
  inputs {{ key: "{key}" value: {{ data_type: {dtype} dims: [ {dims} ] {data} }} }}
}} ]
"""
WARMED = WARMUP.format(name="w", key="x", dtype="TYPE_FP32", dims="4", data="random_data: true")
WARM_BAD_DIMS = WARMUP.format(
    name="v", key="x", dtype="TYPE_FP32", dims="-1", data="zero_data: true"
)
# An index outside the gather table: onnxruntime fails while running the warm-up sample.
WARM_FAILS = WARMUP.format(
    name="oob", key="idx", dtype="TYPE_INT64", dims="1", data='input_data_file: "oob.bin"'
)


CLASSES = """
max_batch_size: 8
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" } ]
"""


@pytest.fixture(scope="module")
def none_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("parity_repo")
    place_model(repo, "plain", {1: om.scale(2.0)})
    place_model(repo, "add_sub", {1: om.add_sub()}, om.ADD_SUB_CONFIG)
    for name, (config, _) in REFUSED.items():
        place_model(repo, name, {1: om.scale(1.0)}, config)
    place_model(repo, "warmed", {1: om.scale(3.0)}, WARMED)
    place_model(repo, "warm_bad_dims", {1: om.scale(1.0)}, WARM_BAD_DIMS)
    folder = place_model(repo, "classes", {1: om.scale(1.0)}, CLASSES)
    (folder / "labels.txt").write_text("zero\none\ntwo\n")  # index 3 has no label
    place_model(repo, "classes_flat", {1: om.identity(onnx.TensorProto.INT32, [2, 3])})
    place_model(repo, "no_labels_file", {1: om.scale(1.0)}, CLASSES)
    folder = place_model(repo, "warm_fails", {1: om.gather()}, WARM_FAILS)
    (folder / "warmup").mkdir()
    (folder / "warmup" / "oob.bin").write_bytes(np.array([100], np.int64).tobytes())
    return repo


@pytest.fixture(scope="module")
def none_server(none_repo: Path) -> Iterator[ServerProcess]:
    yield from start(none_repo)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unimplemented_config_section_is_refused_by_name(
    none_server: ServerProcess, name: str
) -> None:
    client = client_for(none_server)
    [(_, state, reason)] = index_of(client)[name]
    assert state == "UNAVAILABLE"
    assert REFUSED[name][1] in reason, reason
    assert not client.is_model_ready(name)
    # The other models keep serving.
    assert factor_of(client, "plain") == 2.0


# ---- model_warmup ---------------------------------------------------------------------------


def test_warmup_runs_before_the_model_is_ready(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    assert client.is_model_ready("warmed")
    assert factor_of(client, "warmed") == 3.0
    lines = none_server.lines
    ran = [i for i, line in enumerate(lines) if "model 'warmed': warm-up sample 'w' ran 2" in line]
    ready = [i for i, line in enumerate(lines) if "model 'warmed' ready" in line]
    assert ran and ready and ran[0] < ready[0], none_server.output()
    # Warm-up executions are not client requests: statistics start at zero.
    [stats] = client.get_inference_statistics("warmed").model_stats
    assert stats.inference_stats.success.count == 1  # the factor_of request only


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("warm_bad_dims", "model_warmup 'v': warmup setting expects all variable-size dimensions"),
        ("warm_fails", "failed to run warmup sample 'oob': "),
    ],
)
def test_failing_warmup_fails_the_load_with_the_reason(
    none_server: ServerProcess, name: str, reason: str
) -> None:
    client = client_for(none_server)
    [(_, state, got)] = index_of(client)[name]
    assert state == "UNAVAILABLE"
    assert reason in got, got
    assert not client.is_model_ready(name)


# ---- answers that must match Triton's ---------------------------------------------------------

TRITON_NOT_ALLOWED = "explicit model load / unload is not allowed if polling is enabled"
TRITON_NOT_POLLED = "failed to poll from model repository"


def test_load_and_unload_outside_explicit_mode_answer_unavailable(
    none_server: ServerProcess,
) -> None:
    client = client_for(none_server)
    for call in (client.load_model, client.unload_model):
        err = rpc_error(call, "plain")
        assert err.status() == "StatusCode.UNAVAILABLE"
        assert err.message().startswith(TRITON_NOT_ALLOWED), err.message()
        assert "--model-control-mode explicit" in err.message()
    assert factor_of(client, "plain") == 2.0


VERSION_CALLS: list[tuple[str, Callable[[grpcclient.InferenceServerClient, str], object]]] = [
    ("infer", lambda c, v: scale_infer(c, "plain", version=v)),
    ("ready", lambda c, v: c.is_model_ready("plain", v)),
    ("metadata", lambda c, v: c.get_model_metadata("plain", v)),
    ("config", lambda c, v: c.get_model_config("plain", v)),
    ("statistics", lambda c, v: c.get_inference_statistics("plain", v)),
]


@pytest.mark.parametrize(("what", "call"), VERSION_CALLS, ids=[w for w, _ in VERSION_CALLS])
def test_a_version_that_is_not_a_number_is_an_invalid_argument(
    none_server: ServerProcess,
    what: str,
    call: Callable[[grpcclient.InferenceServerClient, str], object],
) -> None:
    client = client_for(none_server)
    err = rpc_error(call, client, "latest")
    assert err.status() == "StatusCode.INVALID_ARGUMENT", what
    assert err.message().startswith(
        "failed to get model version from specified version string 'latest'"
    ), err.message()
    assert "version should be an integral value > 0" in err.message()
    err = rpc_error(call, client, "-1")
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.message().startswith("invalid model version specified '-1'")
    # A number that is no version stays NOT_FOUND (Triton too).
    if what != "ready":
        assert rpc_error(call, client, "7").status() == "StatusCode.NOT_FOUND"


def test_raw_contents_with_typed_contents_names_the_input(none_server: ServerProcess) -> None:
    """INPUT0 raw, INPUT1 typed: Triton names INPUT1 (we used to report a count mismatch)."""
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(a.tobytes())
    request.inputs[1].contents.fp32_contents.extend(a.ravel().tolist())
    with grpc.insecure_channel(none_server.url) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(
        "contents field must not be specified when using raw_input_contents for 'INPUT1' for "
        "model 'add_sub'"
    ), info.value.details()


def test_server_metadata_name_is_pipeserve_by_default_and_configurable(
    none_server: ServerProcess, none_repo: Path, start_server: Callable[..., ServerProcess]
) -> None:
    meta = client_for(none_server).get_server_metadata()
    assert meta.name == "pipeserve"
    assert "model_repository" in meta.extensions
    named = start_server(none_repo, "--server-name", "triton", "--strict-readiness", "false")
    assert client_for(named).get_server_metadata().name == "triton"


# ---- readiness and the ready log line --------------------------------------------------------


def health(server: ServerProcess) -> int:
    with grpc.insecure_channel(server.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest()).status


def test_strict_readiness_by_default_a_failed_model_makes_the_server_not_ready(
    none_server: ServerProcess, none_repo: Path, start_server: Callable[..., ServerProcess]
) -> None:
    client = client_for(none_server)
    assert client.is_server_live()
    assert not client.is_server_ready()
    assert health(none_server) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert factor_of(client, "plain") == 2.0  # the good models serve all the same
    relaxed = start_server(none_repo, "--strict-readiness", "false")
    assert client_for(relaxed).is_server_ready()
    assert health(relaxed) == health_pb2.HealthCheckResponse.SERVING


def test_the_ready_line_lists_ready_and_failed_models_apart(none_server: ServerProcess) -> None:
    [line] = [line for line in none_server.lines if "pipeserve ready:" in line]
    assert " WARNING " in line  # something failed
    served, failed = line.split("pipeserve ready: models ", 1)[1].split("; failed ", 1)
    assert "'plain'" in served and "'warmed'" in served and "'sequence'" not in served
    # The model is named once, as the key: its reason does not repeat "model 'sequence': ".
    assert "'sequence': \"config section 'sequence_batching'" in failed
    assert "'warm_fails': " in failed and "failed to run warmup sample 'oob'" in failed
    assert "(not ready: --strict-readiness and a model failed)" in line


# ---- explicit mode: refused loads are logged and answered as Triton does -----------------------


@pytest.fixture(scope="module")
def explicit_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("parity_explicit")
    place_model(repo, "good", {1: om.scale(2.0)})
    place_broken(repo, "broken")
    return repo


@pytest.fixture(scope="module")
def explicit_server(explicit_repo: Path) -> Iterator[ServerProcess]:
    yield from start(explicit_repo, "--model-control-mode", "explicit", "--load-model", "good")


def warning_with(server: ServerProcess, *texts: str) -> Callable[[], bool]:
    return lambda: any(
        " WARNING " in line and all(t in line for t in texts) for line in server.lines
    )


def test_a_malformed_config_override_fails_the_load_as_triton_does(
    explicit_server: ServerProcess,
) -> None:
    client = client_for(explicit_server)
    err = rpc_error(client.load_model, "good", config='{"max_batch_size": ')
    assert err.status() == "StatusCode.INTERNAL"
    assert err.message().startswith(f"failed to load 'good', {TRITON_NOT_POLLED}: "), err.message()
    assert "invalid JSON model configuration override" in err.message()
    assert wait_until(warning_with(explicit_server, "'good'", "refused load parameters"), 10)
    err = rpc_error(client.load_model, "good", config=json.dumps({"max_batch_sise": 2}))
    assert err.message().startswith(f"failed to load 'good', {TRITON_NOT_POLLED}: ")
    assert "max_batch_sise" in err.message()
    assert factor_of(client, "good") == 2.0  # nothing was touched


def test_load_of_a_name_with_no_folder_answers_as_triton(explicit_server: ServerProcess) -> None:
    client = client_for(explicit_server)
    err = rpc_error(client.load_model, "nowhere")
    assert err.status() == "StatusCode.INTERNAL"
    assert err.message().startswith(f"failed to load 'nowhere', {TRITON_NOT_POLLED}: ")
    assert "no model folder 'nowhere'" in err.message()
    assert wait_until(warning_with(explicit_server, "failed to poll model 'nowhere'"), 10)
    # ...and an override does not make a folder appear.
    err = rpc_error(client.load_model, "nowhere", config="{}")
    assert TRITON_NOT_POLLED in err.message()
    # Unloading what is not loaded succeeds, as in Triton.
    client.unload_model("nowhere")


def test_failed_load_is_a_warning_and_strict_readiness_follows_it(
    explicit_server: ServerProcess,
) -> None:
    client = client_for(explicit_server)
    assert client.is_server_ready()
    seen: queue.Queue[int] = queue.Queue()
    channel = grpc.insecure_channel(explicit_server.url)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())

    def follow() -> None:
        try:
            for response in watch:
                seen.put(response.status)
        except grpc.RpcError:
            pass

    threading.Thread(target=follow, daemon=True).start()
    try:
        assert seen.get(timeout=10) == health_pb2.HealthCheckResponse.SERVING
        err = rpc_error(client.load_model, "broken")
        assert err.status() == "StatusCode.INVALID_ARGUMENT"
        assert err.message().startswith("load failed for model 'broken': "), err.message()
        assert wait_until(warning_with(explicit_server, "failed to load model 'broken'"), 10)
        assert not client.is_server_ready()
        assert seen.get(timeout=10) == health_pb2.HealthCheckResponse.NOT_SERVING
        client.unload_model("broken")  # unloaded on purpose: no longer expected to serve
        assert client.is_server_ready()
        assert seen.get(timeout=10) == health_pb2.HealthCheckResponse.SERVING
    finally:
        watch.cancel()
        channel.close()


# ---- poll mode: a failed reload says why in the index ------------------------------------------


def test_a_failed_poll_reload_shows_its_reason_while_the_old_version_serves(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    place_model(tmp_path, "changing", {1: om.scale(2.0)})
    server = start_server(
        tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", str(POLL_SECS)
    )
    client = client_for(server)
    write_atomically(tmp_path / "changing" / "config.pbtxt", b"sequence_batching {}")

    def reason() -> str:
        return index_of(client)["changing"][0][2]

    assert wait_until(lambda: "sequence_batching" in reason(), timeout=20), index_of(client)
    [(version, state, why)] = index_of(client)["changing"]
    assert (version, state) == ("1", "READY")
    assert why.startswith("reload failed, version 1 serves: "), why
    assert factor_of(client, "changing") == 2.0
    assert client.is_server_ready()  # still serving: not a failure for readiness
    # A good change reloads and clears the reason.
    write_atomically(tmp_path / "changing" / "config.pbtxt", b"max_batch_size: 4")
    assert wait_until(lambda: reason() == "", timeout=20), index_of(client)


# ---- the classification extension -------------------------------------------------------------


def classes_of(
    client: grpcclient.InferenceServerClient, model: str, x: np.ndarray, count: int, dt: str
) -> tuple[np.ndarray, np.ndarray]:
    """(classification strings, the raw output of the same request without classification)."""
    inp = grpcclient.InferInput("x" if model == "classes" else "INPUT0", list(x.shape), dt)
    inp.set_data_from_numpy(x)
    out = "y" if model == "classes" else "OUTPUT0"
    classified = client.infer(
        model, [inp], outputs=[grpcclient.InferRequestedOutput(out, class_count=count)]
    )
    raw = client.infer(model, [inp]).as_numpy(out)
    result = classified.as_numpy(out)
    assert classified.get_output(out).datatype == "BYTES"
    return result, raw


def test_classification_answers_triton_strings_per_batch_entry(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    x = np.array([[0.5, 0.25, 2.0, 1.0], [3.0, -1.0, 0.0, 4.0]], dtype=np.float32)
    got, raw = classes_of(client, "classes", x, 3, "FP32")
    assert got.shape == (2, 3)
    np.testing.assert_array_equal(raw, x)  # scale 1.0: the classes are x's own
    assert got.tolist() == [
        [b"2.000000:2:two", b"1.000000:3", b"0.500000:0:zero"],
        [b"4.000000:3", b"3.000000:0:zero", b"0.000000:2:two"],
    ]
    # More classes asked than exist: every class.
    got, _ = classes_of(client, "classes", x[:1], 10, "FP32")
    assert got.shape == (1, 4)


def test_classification_of_a_model_without_batching_covers_the_whole_tensor(
    none_server: ServerProcess,
) -> None:
    x = np.array([[1, 9, 3], [7, 2, 8]], dtype=np.int32)
    got, _ = classes_of(client_for(none_server), "classes_flat", x, 2, "INT32")
    assert got.tolist() == [b"9:1", b"8:5"]


def test_classification_works_on_streams_and_is_listed(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    assert "classification" in client.get_server_metadata().extensions
    results: queue.Queue[object] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put(error or result))
    try:
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.array([[0.0, 5.0, 1.0, 2.0]], np.float32))
        out = grpcclient.InferRequestedOutput("y", class_count=1)
        client.async_stream_infer("classes", [inp], outputs=[out])
        result = results.get(timeout=30)
    finally:
        client.stop_stream()
    assert isinstance(result, grpcclient.InferResult), result
    assert result.as_numpy("y").tolist() == [[b"5.000000:1:one"]]


def test_a_missing_label_file_fails_the_load(none_server: ServerProcess) -> None:
    [(_, state, reason)] = index_of(client_for(none_server))["no_labels_file"]
    assert state == "UNAVAILABLE"
    assert "cannot read label_filename 'labels.txt'" in reason, reason


def test_a_bad_class_count_is_refused_as_triton_does(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    request = service_pb2.ModelInferRequest(model_name="classes")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    request.outputs.add(name="y").parameters["classification"].int64_param = 0
    with grpc.insecure_channel(none_server.url) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "invalid value for 'classification' parameter, expected >= 0"
    assert client.is_model_ready("classes")


def test_classification_over_http_takes_the_same_path(none_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{none_server.http_port}")
    try:
        x = np.array([[0.5, 0.25, 2.0, 1.0]], dtype=np.float32)
        inp = httpclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        for binary in (True, False):
            out = httpclient.InferRequestedOutput("y", binary_data=binary, class_count=2)
            result = client.infer("classes", [inp], outputs=[out])
            assert result.get_output("y")["datatype"] == "BYTES"
            got = [v if isinstance(v, bytes) else v.encode() for v in result.as_numpy("y")[0]]
            assert got == [b"2.000000:2:two", b"1.000000:3"]
    finally:
        client.close()


# ---- inputs an initializer gives a default (Triton's ONNX backend serves them as inputs) ------


def with_default() -> onnx.ModelProto:
    """y = x + bias, where `bias` is a graph input an initializer gives the default 10: a
    request may leave it out or override it."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "bias"], ["y"])],
        "with_default",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1]),
            onnx.helper.make_tensor_value_info("bias", onnx.TensorProto.FLOAT, [1]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [-1])],
        initializer=[onnx.numpy_helper.from_array(np.array([10.0], np.float32), "bias")],
    )
    return om._model(graph)


OPTIONAL_BIAS = """
input [
  { name: "x" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "bias" data_type: TYPE_FP32 dims: [ 1 ] optional: true }
]
"""


@pytest.fixture(scope="module")
def defaults_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("defaults_repo")
    place_model(repo, "optional_bias", {1: with_default()}, OPTIONAL_BIAS)
    place_model(repo, "auto_bias", {1: with_default()})
    yield from start(repo)


def _fp32(name: str, values: list[float]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [len(values)], "FP32")
    tensor.set_data_from_numpy(np.array(values, np.float32))
    return tensor


def test_an_initializer_input_listed_optional_may_be_left_out_or_overridden(
    defaults_server: ServerProcess,
) -> None:
    client = client_for(defaults_server)
    left_out = client.infer("optional_bias", [_fp32("x", [1.0, 2.0])]).as_numpy("y")
    np.testing.assert_array_equal(left_out, [11.0, 12.0])
    given = client.infer("optional_bias", [_fp32("x", [1.0, 2.0]), _fp32("bias", [0.5])])
    np.testing.assert_array_equal(given.as_numpy("y"), [1.5, 2.5])
    # Triton's words (its L0_input_validation checks them) for a required input left out.
    error = rpc_error(client.infer, "optional_bias", [_fp32("bias", [0.5])])
    assert (
        "expected number of inputs between 1 and 2 but got 1 inputs for model 'optional_bias'. "
        "Got input(s) ['bias'], but missing required input(s) ['x']. Please provide all "
        "required input(s)."
    ) in error.message()


def test_an_initializer_input_is_not_auto_completed_into_the_config(
    defaults_server: ServerProcess,
) -> None:
    client = client_for(defaults_server)
    config = client.get_model_config("auto_bias").config
    assert [t.name for t in config.input] == ["x"]
    # x and y are [batch]: completed as Triton does, batching with dims [1] and an empty reshape.
    assert config.max_batch_size > 0 and list(config.input[0].dims) == [1]
    x = grpcclient.InferInput("x", [2, 1], "FP32")
    x.set_data_from_numpy(np.array([[1.0], [2.0]], np.float32))
    np.testing.assert_array_equal(client.infer("auto_bias", [x]).as_numpy("y"), [[11.0], [12.0]])
