"""/metrics end to end: known traffic through tritonclient, a scrape over HTTP parsed with
prometheus_client's parser, exact counts against what the client saw; unload removes series."""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests import onnx_models as om
from tests.e2e.server import ServerProcess
from tests.fixtures import graphs

# One execution slot and a queue of one: while a request runs (~50-100 ms) and one waits, every
# further request is rejected at once with "Exceeds maximum queue size".
SLOW_CONFIG = """
name: "slow"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching { default_queue_policy { max_queue_size: 1 } }
"""


# A model split into two CPU stages; no dynamic batching, so each request executes alone and is
# cut into ceil(batch / 2) micro-batches that pass through both stages.
MLP_PIPE_CONFIG = """
name: "mlp_pipe"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 10 ] } ]
parameters { key: "pipeline_devices" value: { string_value: "cpu,cpu" } }
parameters { key: "micro_batch_size" value: { string_value: "2" } }
"""


def slow_model(n: int = 384, steps: int = 8) -> onnx.ModelProto:
    """x[batch, 4] -> y = x, after a chain of n x n MatMuls that depends on x (so onnxruntime
    cannot fold it away at load): tens of milliseconds of real compute per execution."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    inits = [
        numpy_helper.from_array(a, "A"),
        numpy_helper.from_array(np.array(0, np.float32), "zero"),
        numpy_helper.from_array(np.array(1, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["s0"]),
        helper.make_node("Add", ["s0", "one"], ["s1"]),
        helper.make_node("Mul", ["A", "s1"], ["m0"]),
    ]
    for i in range(steps):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "A"], [f"m{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"m{steps}"], ["r"], keepdims=0),
        helper.make_node("Mul", ["r", "zero"], ["r0"]),
        helper.make_node("Add", ["x", "r0"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", om.OPSET)])
    model.ir_version = om.IR_VERSION
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("metrics_repo")
    om.write_model(repo, "add_sub", om.add_sub(), config=om.ADD_SUB_CONFIG)
    om.write_model(repo, "slow", slow_model(), config=SLOW_CONFIG)
    (repo / "mlp_pipe" / "1").mkdir(parents=True)
    shutil.copy(graphs.torch_model("mlp"), repo / "mlp_pipe" / "1" / "model.onnx")
    (repo / "mlp_pipe" / "config.pbtxt").write_text(MLP_PIPE_CONFIG)
    models = ("add_sub", "slow", "mlp_pipe")
    load = [arg for name in models for arg in ("--load-model", name)]
    proc = ServerProcess(repo, "--model-control-mode", "explicit", *load).wait_ready()
    yield proc
    proc.stop()


def scrape(server: ServerProcess) -> tuple[str, dict[str, list]]:
    """The raw text and {family name: samples}."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return text, {f.name: f.samples for f in text_string_to_metric_families(text)}


def sample(families: dict[str, list], family: str, suffix: str = "", **labels: str) -> float:
    """One sample's value. Counters parse as `<family>_total` (the parser's naming, even though
    the exposed line has no suffix; the raw-text assertions check the exposed names)."""
    name = family + suffix
    matches = [s.value for s in families[family] if s.name == name and s.labels == labels]
    assert len(matches) == 1, f"{name}{labels}: {matches}"
    return float(matches[0])


def counter(families: dict[str, list], family: str, **labels: str) -> float:
    return sample(families, family, "_total", **labels)


def add_sub_inputs(batch: int, features: int = 16) -> list[grpcclient.InferInput]:
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        i = grpcclient.InferInput(name, [batch, features], "FP32")
        i.set_data_from_numpy(np.ones((batch, features), np.float32))
        inputs.append(i)
    return inputs


def send_concurrently(
    client: grpcclient.InferenceServerClient, model: str, count: int
) -> tuple[int, int, list[str]]:
    """Fire `count` requests without waiting; returns (succeeded, rejected, other errors)."""
    done = threading.Semaphore(0)
    outcomes: list[str] = []
    lock = threading.Lock()

    def callback(result: object, error: InferenceServerException | None) -> None:
        with lock:
            if error is None:
                outcomes.append("ok")
            elif "Exceeds maximum queue size" in error.message():
                outcomes.append("rejected")
            else:
                outcomes.append(f"{error.status()}: {error.message()}")
        done.release()

    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    for _ in range(count):
        client.async_infer(model, [x], callback)
    for _ in range(count):
        assert done.acquire(timeout=60)
    others = [o for o in outcomes if o not in ("ok", "rejected")]
    return outcomes.count("ok"), outcomes.count("rejected"), others


def test_known_traffic_gives_exact_triton_counts_and_matching_histograms(
    server: ServerProcess,
) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    text, families = scrape(server)
    assert 'nv_inference_request_success{model="add_sub",version="1"} 0\n' in text
    assert sample(families, "nv_model_load_duration_secs", model="add_sub", version="1") > 0

    batches = (1, 2, 3, 1, 1)
    for batch in batches:
        result = client.infer("add_sub", add_sub_inputs(batch))
        assert result.as_numpy("OUTPUT0").shape == (batch, 16)
    with pytest.raises(InferenceServerException, match="INPUT0"):
        client.infer("add_sub", add_sub_inputs(1, features=15))  # invalid shape
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("no_such_model", add_sub_inputs(1))

    ok, rejected, others = send_concurrently(client, "slow", 8)
    assert others == []
    assert ok >= 1 and rejected >= 1, (ok, rejected)  # one runs, one may queue, the rest bounce

    text, families = scrape(server)
    add_sub = {"model": "add_sub", "version": "1"}
    slow = {"model": "slow", "version": "1"}

    # Triton's names as exposed: bare counters, exact values.
    assert f'nv_inference_request_success{{model="add_sub",version="1"}} {len(batches)}\n' in text
    assert f'nv_inference_count{{model="add_sub",version="1"}} {sum(batches)}\n' in text
    assert 'nv_inference_request_failure{model="add_sub",reason="OTHER",version="1"} 1\n' in text
    assert f'nv_inference_request_success{{model="slow",version="1"}} {ok}\n' in text
    assert (
        f'nv_inference_request_failure{{model="slow",reason="REJECTED",version="1"}} {rejected}\n'
        in text
    )
    assert "no_such_model" not in text  # unknown models add no series

    assert counter(families, "nv_inference_request_success", **add_sub) == len(batches)
    assert counter(families, "nv_inference_count", **add_sub) == sum(batches)
    assert counter(families, "nv_inference_exec_count", **add_sub) == len(batches)
    for reason, expected in (("REJECTED", 0), ("CANCELED", 0), ("BACKEND", 0), ("OTHER", 1)):
        assert (
            counter(families, "nv_inference_request_failure", reason=reason, **add_sub) == expected
        )
    assert counter(families, "nv_inference_request_success", **slow) == ok
    assert counter(families, "nv_inference_request_failure", reason="REJECTED", **slow) == rejected
    assert counter(families, "nv_inference_count", **slow) == ok
    for labels in (add_sub, slow):
        assert sample(families, "nv_inference_pending_request_count", **labels) == 0

    # Histogram counts equal request and execution counts; sums agree with Triton's counters.
    for labels, successes in ((add_sub, len(batches)), (slow, ok)):
        for family in ("pipeserve_request_duration_seconds", "pipeserve_queue_duration_seconds"):
            assert sample(families, family, "_count", **labels) == successes
            assert sample(families, family, "_bucket", le="+Inf", **labels) == successes
        executions = counter(families, "nv_inference_exec_count", **labels)
        assert sample(families, "pipeserve_compute_duration_seconds", "_count", **labels) == (
            executions
        )
        assert sample(families, "pipeserve_batch_size", "_count", **labels) == executions
        assert sample(families, "pipeserve_batch_size", "_sum", **labels) == counter(
            families, "nv_inference_count", **labels
        )
        request_us = counter(families, "nv_inference_request_duration_us", **labels)
        seconds = sample(families, "pipeserve_request_duration_seconds", "_sum", **labels)
        assert abs(request_us - seconds * 1e6) <= 1
    # The slow model's executions really took tens of milliseconds, so its compute histogram
    # has nothing at or below 1 ms.
    assert (
        sample(families, "pipeserve_compute_duration_seconds", "_bucket", le="0.001", **slow) == 0
    )
    assert sample(families, "pipeserve_batch_size", "_bucket", le="1.0", **slow) >= 1
    client.close()


def test_unloading_a_model_removes_its_series_and_reloading_starts_at_zero(
    server: ServerProcess,
) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    client.infer("add_sub", add_sub_inputs(1))
    text, _ = scrape(server)
    assert 'model="add_sub"' in text

    client.unload_model("add_sub")
    text, families = scrape(server)
    assert 'model="add_sub"' not in text
    assert 'model="slow"' in text  # other models keep theirs
    assert "process_resident_memory_bytes" in families

    client.load_model("add_sub")
    text, families = scrape(server)
    assert 'nv_inference_request_success{model="add_sub",version="1"} 0\n' in text
    client.close()


def test_pipeline_stage_series_count_every_micro_batch_in_every_stage(
    server: ServerProcess,
) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    batches = (4, 3, 1)  # micro-batches of 2: 2 + 2 + 1
    for batch in batches:
        x = grpcclient.InferInput("x", [batch, 64], "FP32")
        x.set_data_from_numpy(graphs.torch_inputs("mlp", batch)["x"])
        assert client.infer("mlp_pipe", [x]).as_numpy("y").shape == (batch, 10)
    client.close()
    _, families = scrape(server)
    micro_batches = sum(-(-b // 2) for b in batches)
    for stage in ("0", "1"):
        labels = {"model": "mlp_pipe", "version": "1", "stage": stage, "device": "cpu"}
        for family in (
            "pipeserve_stage_compute_duration_seconds",
            "pipeserve_stage_transfer_duration_seconds",
        ):
            assert sample(families, family, "_count", **labels) == micro_batches
        busy = counter(families, "pipeserve_stage_busy_seconds", **labels)
        assert busy == pytest.approx(
            sample(families, "pipeserve_stage_compute_duration_seconds", "_sum", **labels)
        )
        assert busy > 0
    whole = {"model": "mlp_pipe", "version": "1"}
    assert counter(families, "nv_inference_exec_count", **whole) == len(batches)
    assert counter(families, "nv_inference_count", **whole) == sum(batches)


def test_host_cpu_and_memory_under_tritons_names(server: ServerProcess) -> None:
    """What Triton's dashboards plot: the machine's CPU utilisation (0-1, since the previous
    sample) and RAM, from /proc (the process's own are the process_* series)."""
    meminfo = dict(
        (line.split(":")[0], int(line.split()[1]) * 1024)
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith(("MemTotal:", "MemAvailable:"))
    )
    text, families = scrape(server)
    for name, help_text in (
        ("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]"),
        ("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes"),
        ("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes"),
    ):
        assert f"# HELP {name} {help_text}\n# TYPE {name} gauge\n" in text
    assert sample(families, "nv_cpu_memory_total_bytes") == meminfo["MemTotal"]
    used = sample(families, "nv_cpu_memory_used_bytes")
    assert 0 < used < meminfo["MemTotal"]
    # Busy work in this process shows in the next sample, taken a second or more later.
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        sum(range(10_000))
    _, families = scrape(server)
    assert 0.0 < sample(families, "nv_cpu_utilization") <= 1.0


def test_no_gpu_series_on_a_machine_without_gpu(server: ServerProcess) -> None:
    if Path("/dev/nvidiactl").exists():
        pytest.skip("this machine has an NVIDIA driver")
    text, _ = scrape(server)
    assert "nv_gpu_" not in text


def test_metrics_off_serves_inference_without_an_endpoint(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    om.write_model(tmp_path, "add_sub", om.add_sub(), config=om.ADD_SUB_CONFIG)
    proc = start_server(tmp_path, metrics=False)
    assert proc.metrics_port == 0
    client = grpcclient.InferenceServerClient(proc.url)
    assert client.infer("add_sub", add_sub_inputs(2)).as_numpy("OUTPUT1").shape == (2, 16)
    client.close()
