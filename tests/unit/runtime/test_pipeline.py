"""Pipeline executor: micro-batches through CPU stages give the single-session outputs; a failing
batch fails alone; close drains; per-stage statistics and the metrics callback."""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeserve.errors import ConfigError, ExecutionError
from pipeserve.inference import ModelSpec, TensorSpec
from pipeserve.partition.partitioner import partition, partition_model
from pipeserve.runtime.devices import cuda_usable
from pipeserve.runtime.pipeline.config import Device, parse_pipeline_config
from pipeserve.runtime.pipeline.executor import (
    PipelineRunner,
    build_pipeline_runner,
    create_pipeline_runner,
)
from pipeserve.runtime.pipeline.stage import StageRunner
from tests.fixtures import graphs


def _spec(name: str = "m", max_batch_size: int = 64) -> ModelSpec:
    # The executor reads only the name and whether the model batches.
    return ModelSpec(name, 1, max_batch_size, (TensorSpec("x", "FP32", (-1,)),), ())


@functools.cache
def _session(source: str | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _reference(model: onnx.ModelProto | Path, feeds: Mapping[str, np.ndarray]) -> dict:
    session = _session(str(model) if isinstance(model, Path) else model.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def _assert_same(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def _runner(path: Path, stages: int, micro: int | None, **params: str) -> PipelineRunner:
    parameters = {
        "pipeline_devices": ",".join(["cpu"] * stages),
        "pipeline_cost": "estimate",
        "pipeline_threads_per_stage": "1",
        **params,
    }
    if micro is not None:
        parameters["micro_batch_size"] = str(micro)
    runner = create_pipeline_runner(path, parameters, _spec())
    assert runner is not None
    return runner


@pytest.fixture
def closing() -> Iterator[list[PipelineRunner]]:
    runners: list[PipelineRunner] = []
    yield runners
    for runner in runners:
        runner.close()


@pytest.mark.parametrize("name", graphs.TORCH_MODELS)
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_torch_models_through_cpu_stages_equal_one_session(
    name: str, stages: int, closing: list[PipelineRunner]
) -> None:
    path = graphs.torch_model(name)
    for micro in (None, 1, 3):
        runner = _runner(path, stages, micro)
        closing.append(runner)
        for batch in (1, 4, 7):
            feeds = graphs.torch_inputs(name, batch, seed=batch)
            want = _reference(path, feeds)
            got = runner.run(0, feeds, list(want))
            _assert_same(got, want)


def test_mlp_through_stages_is_bitwise_equal(closing: list[PipelineRunner]) -> None:
    path = graphs.torch_model("mlp")
    feeds = graphs.torch_inputs("mlp", 6)
    want = _reference(path, feeds)
    for stages, micro in ((2, None), (4, 2)):
        runner = _runner(path, stages, micro)
        closing.append(runner)
        assert np.array_equal(runner.run(0, feeds, ["y"])["y"], want["y"])


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_if_graph_with_early_output(
    stages: int, closing: list[PipelineRunner], tmp_path: Path
) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(graphs.branchy(), str(path))
    # `flag` is a scalar input with no batch dimension: such a model does not batch.
    runner = create_pipeline_runner(
        path,
        {"pipeline_stages": str(stages), "pipeline_cost": "estimate"},
        _spec(max_batch_size=0),
    )
    assert runner is not None
    closing.append(runner)
    for flag in (True, False):
        feeds = graphs.branchy_inputs(batch=5, flag=flag)
        _assert_same(runner.run(0, feeds, ["y", "early"]), _reference(path, feeds))
    assert runner.run(0, feeds, ["early"]).keys() == {"early"}


def test_external_weights_past_2gib(closing: list[PipelineRunner], tmp_path: Path) -> None:
    path = graphs.far_external_weights(tmp_path)
    runner = _runner(path, 2, 2)
    closing.append(runner)
    feeds = {"x": np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)}
    _assert_same(runner.run(0, feeds, ["y"]), _reference(path, feeds))


def test_concurrent_batches_each_get_their_own_results(closing: list[PipelineRunner]) -> None:
    path = graphs.torch_model("encoder")
    runner = _runner(path, 2, 2)
    closing.append(runner)
    assert runner.slot_count == 2
    results: dict[int, dict[str, np.ndarray]] = {}

    def work(slot: int) -> None:
        for round_ in range(4):
            feeds = graphs.torch_inputs("encoder", 5, seed=10 * slot + round_)
            got = runner.run(slot, feeds, ["hidden"])
            want = _reference(path, feeds)
            np.testing.assert_allclose(got["hidden"], want["hidden"], rtol=1e-5, atol=1e-6)
            results[10 * slot + round_] = got

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(runner.slot_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 8


def test_a_failing_batch_fails_alone_and_the_pipeline_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(graphs.gather_fails(), str(path))
    plan = partition_model(path, 2, cost="estimate")
    assert "gather" in plan.stages[1].nodes
    config = parse_pipeline_config({"pipeline_stages": "2", "micro_batch_size": "2"})
    assert config is not None
    runner = build_pipeline_runner(plan, config, _spec())
    try:
        x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
        good: dict[str, np.ndarray] = {"x": x, "idx": np.zeros((6, 1), np.int64)}
        out_of_range = np.array([[0], [1], [2], [99], [0], [0]], np.int64)
        bad: dict[str, np.ndarray] = {"x": x, "idx": out_of_range}
        errors: list[BaseException] = []
        outputs: list[dict[str, np.ndarray]] = []

        def call(feeds: dict[str, np.ndarray]) -> None:
            try:
                outputs.append(runner.run(0, feeds, ["y"]))
            except ExecutionError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(f,)) for f in (good, bad, good)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(errors) == 1 and len(outputs) == 2
        assert re.search(r"pipeline stage 1 \(cpu\) of model 'm' failed: .*", str(errors[0]))
        want = _reference(path, good)["y"]
        for got in outputs:
            np.testing.assert_allclose(got["y"], want, rtol=1e-6)
        # Still serving after the failure.
        np.testing.assert_allclose(runner.run(0, good, ["y"])["y"], want, rtol=1e-6)
    finally:
        runner.close()


def test_close_finishes_batches_already_queued() -> None:
    in_pipeline = threading.Event()
    release = threading.Event()

    def hold_first_micro_batch(stage: int, device: str, compute_ns: int, transfer_ns: int) -> None:
        if not in_pipeline.is_set():
            in_pipeline.set()
            release.wait(timeout=30)

    path = graphs.torch_model("encoder")
    parameters = {"pipeline_stages": "2", "micro_batch_size": "1", "pipeline_cost": "estimate"}
    runner = create_pipeline_runner(path, parameters, _spec(), on_stage=hold_first_micro_batch)
    assert runner is not None
    feeds = graphs.torch_inputs("encoder", 6)
    done: list[dict[str, np.ndarray]] = []
    caller = threading.Thread(target=lambda: done.append(runner.run(0, feeds, ["hidden"])))
    caller.start()
    assert in_pipeline.wait(timeout=30)  # micro-batch 0 is in stage 0, 1..5 are queued
    closer = threading.Thread(target=runner.close)
    closer.start()
    closer.join(timeout=0.2)
    assert closer.is_alive()  # close waits for the queued batch
    release.set()
    closer.join(timeout=30)
    caller.join(timeout=30)
    assert not closer.is_alive() and len(done) == 1
    _assert_same(done[0], _reference(path, feeds))
    with pytest.raises(ExecutionError, match="closed"):
        runner.run(0, feeds, ["hidden"])
    runner.close()  # idempotent


def test_stage_statistics_and_callback(closing: list[PipelineRunner]) -> None:
    seen: list[tuple[int, str, int, int]] = []
    lock = threading.Lock()

    def on_stage(stage: int, device: str, compute_ns: int, transfer_ns: int) -> None:
        with lock:
            seen.append((stage, device, compute_ns, transfer_ns))

    path = graphs.torch_model("mlp")
    parameters = {
        "pipeline_devices": "cpu,cpu,cpu",
        "micro_batch_size": "2",
        "pipeline_cost": "estimate",
        "pipeline_threads_per_stage": "1",
    }
    runner = create_pipeline_runner(path, parameters, _spec(), on_stage=on_stage)
    assert runner is not None
    closing.append(runner)
    assert runner.devices == ("cpu", "cpu", "cpu")
    for _ in range(3):
        runner.run(0, graphs.torch_inputs("mlp", 8), ["y"])
    stats = runner.stage_stats()
    assert stats.batches == 3 and stats.micro_batches == 12
    assert [s.micro_batches for s in stats.stages] == [12, 12, 12]
    assert all(s.compute_ns > 0 and 0 < s.utilisation <= 1 for s in stats.stages)
    assert 0 <= stats.bubble_fraction < 1
    assert sorted({(s, d) for s, d, _, _ in seen}) == [(0, "cpu"), (1, "cpu"), (2, "cpu")]
    assert len(seen) == 36
    runner.reset_stats()
    assert runner.stage_stats().micro_batches == 0
    runner.run(0, graphs.torch_inputs("mlp", 2), ["y"])
    assert [s.micro_batches for s in runner.stage_stats().stages] == [1, 1, 1]


def test_iobinding_path_on_cpu(closing: list[PipelineRunner]) -> None:
    # The path CUDA stages take (OrtValues between stages), exercised with CPU devices.
    path = graphs.torch_model("encoder")
    plan = partition_model(path, 2, cost="estimate")
    stages = [StageRunner(s, Device("cpu"), plan.base_dir, 1, binding=True) for s in plan.stages]
    runner = PipelineRunner(stages, plan.graph_outputs, micro_batch_size=2)
    closing.append(runner)
    feeds = graphs.torch_inputs("encoder", 5)
    _assert_same(runner.run(0, feeds, ["hidden"]), _reference(path, feeds))


def test_no_pipeline_parameters_means_no_pipeline() -> None:
    assert create_pipeline_runner(graphs.torch_model("mlp"), {"other": "1"}, _spec()) is None


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"pipeline_stages": "40"}, "the graph has only 13 compute node(s)"),
        ({"pipeline_devices": "cpu,tpu:0"}, "unknown device 'tpu:0' in pipeline_devices"),
        ({"pipeline_stages": "2", "pipeline_cuts": "missing"}, "cut tensor 'missing' is not in"),
    ],
)
def test_bad_pipeline_configs_are_refused_at_load(parameters: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_pipeline_runner(
            graphs.torch_model("mlp"), {**parameters, "pipeline_cost": "estimate"}, _spec()
        )


@pytest.mark.skipif(cuda_usable(), reason="a GPU is present: CUDA stages load")
def test_cuda_stages_without_a_gpu_run_on_the_cpu_with_one_warning(
    closing: list[PipelineRunner], caplog: pytest.LogCaptureFixture
) -> None:
    # The one missing-GPU rule (runtime/devices.place), the same as for instance groups.
    path = graphs.torch_model("mlp")
    with caplog.at_level(logging.WARNING, logger="pipeserve.runtime"):
        runner = create_pipeline_runner(
            path, {"pipeline_devices": "cuda:0,cuda:1", "pipeline_cost": "estimate"}, _spec("big")
        )
    assert runner is not None
    closing.append(runner)
    assert runner.devices == ("cpu", "cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "model 'big' pipeline stages ask for cuda:0, cuda:1" in warnings[0]
    assert "run on the CPU" in warnings[0]
    feeds = graphs.torch_inputs("mlp", 4)
    _assert_same(runner.run(0, feeds, ["y"]), _reference(path, feeds))


def test_stage_plan_from_partition_runs_directly() -> None:
    # build_pipeline_runner accepts any plan, e.g. one made by `pipeserve split` logic.
    plan = partition(graphs.branchy(), 2, cuts=["h2b"])
    config = parse_pipeline_config({"pipeline_stages": "2"})
    assert config is not None
    runner = build_pipeline_runner(plan, config, _spec(max_batch_size=0))
    try:
        feeds = graphs.branchy_inputs(3, True)
        _assert_same(runner.run(0, feeds, []), _reference(graphs.branchy(), feeds))
    finally:
        runner.close()
