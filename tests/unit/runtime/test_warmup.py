"""runtime/warmup.py: samples built as Triton builds them, checked like requests, run on every
instance; a failure names the sample. Sessions are real onnxruntime sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from pipeserve.errors import ConfigError, ModelLoadError
from pipeserve.repository.config import complete_config, model_spec, parse_config_text
from pipeserve.repository.graph import read_graph_io
from pipeserve.runtime.instances import create_instances, plan_instances
from pipeserve.runtime.warmup import run_warmup, warmup_samples
from tests import onnx_models as om


def setup(tmp_path: Path, model, warmup: str, extra: str = ""):  # type: ignore[no-untyped-def]
    folder = om.write_model(tmp_path, "m", model)
    graph = read_graph_io(folder / "1" / "model.onnx")
    config = complete_config(parse_config_text(extra + warmup, "x"), "m", graph)
    return folder, config, model_spec(config, 1)


ADD_SUB_WARMUP = """
model_warmup [ {
  name: "mixed" batch_size: 3 count: 2
  inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } }
  inputs { key: "INPUT1" value: { data_type: TYPE_FP32 dims: [ 16 ] random_data: true } }
} ]
"""


def test_batching_model_sample_is_one_batch_of_batch_size(tmp_path: Path) -> None:
    folder, config, spec = setup(tmp_path, om.add_sub(), ADD_SUB_WARMUP, "max_batch_size: 8\n")
    [sample] = warmup_samples(config, spec, folder, seed=1)
    assert (sample.name, sample.count, len(sample.executions)) == ("mixed", 2, 1)
    batch = sample.executions[0]
    assert batch["INPUT0"].shape == batch["INPUT1"].shape == (3, 16)
    assert not batch["INPUT0"].any()
    # Triton repeats one request's data batch_size times.
    np.testing.assert_array_equal(batch["INPUT1"][0], batch["INPUT1"][2])


def test_non_batching_model_runs_batch_size_single_requests(tmp_path: Path) -> None:
    warmup = """model_warmup [ { name: "s" batch_size: 2
      inputs { key: "INPUT0" value: { data_type: TYPE_INT32 dims: [ 2, 3 ] zero_data: true } }
    } ]"""
    folder, config, spec = setup(tmp_path, om.identity(TensorProto.INT32, [2, 3]), warmup)
    [sample] = warmup_samples(config, spec, folder)
    assert sample.count == 1  # count 0 means once
    assert [e["INPUT0"].shape for e in sample.executions] == [(2, 3), (2, 3)]


def test_batch_size_zero_skips_the_sample(tmp_path: Path) -> None:
    warmup = ADD_SUB_WARMUP.replace("batch_size: 3", "batch_size: 0")
    folder, config, spec = setup(tmp_path, om.add_sub(), warmup, "max_batch_size: 8\n")
    assert warmup_samples(config, spec, folder) == []


def test_input_data_file_and_strings(tmp_path: Path) -> None:
    warmup = """model_warmup [ { name: "f" batch_size: 1
      inputs { key: "INPUT0" value: { data_type: TYPE_STRING dims: [ 2 ] input_data_file: "s" } }
    } ]"""
    folder, config, spec = setup(tmp_path, om.identity(TensorProto.STRING, [2]), warmup)
    (folder / "warmup").mkdir()
    (folder / "warmup" / "s").write_bytes(b"\x02\x00\x00\x00hi\x03\x00\x00\x00you")
    [sample] = warmup_samples(config, spec, folder)
    assert list(sample.executions[0]["INPUT0"]) == ["hi", "you"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("dims: [ 16 ] zero", "dims: [ -1 ] zero"), "all variable-size dimensions are specified"),
        (("dims: [ 16 ] zero", "dims: [ 5 ] zero"), "unexpected shape for input 'INPUT0'"),
        (("TYPE_FP32 dims: [ 16 ] zero", "TYPE_INT32 dims: [ 16 ] zero"), "has datatype INT32"),
        (('key: "INPUT1"', 'key: "NOPE"'), "unexpected inference input 'NOPE'"),
        (("batch_size: 3", "batch_size: 9"), "batch-size must be <= 8"),
        (("random_data: true", 'input_data_file: "missing"'), "cannot read input_data_file"),
        (("random_data: true", 'input_data_file: "../../etc"'), "leaves the 'warmup/' folder"),
    ],
)
def test_bad_sample_is_refused_naming_it(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    warmup = ADD_SUB_WARMUP.replace(*change)
    folder, config, spec = setup(tmp_path, om.add_sub(), warmup, "max_batch_size: 8\n")
    with pytest.raises(ConfigError) as info:
        warmup_samples(config, spec, folder)
    assert str(info.value).startswith("model 'm': model_warmup 'mixed': ")
    assert message in str(info.value)


def test_short_data_file_is_refused(tmp_path: Path) -> None:
    warmup = ADD_SUB_WARMUP.replace("random_data: true", 'input_data_file: "short"')
    folder, config, spec = setup(tmp_path, om.add_sub(), warmup, "max_batch_size: 8\n")
    (folder / "warmup").mkdir()
    (folder / "warmup" / "short").write_bytes(bytes(10))
    with pytest.raises(ConfigError, match="expects 64 bytes for input 'INPUT1'.* only has 10"):
        warmup_samples(config, spec, folder)


def instances(folder: Path, count: int):  # type: ignore[no-untyped-def]
    plan = plan_instances([("CPU", count, [])], {"intra_op_thread_count": "1"})
    return create_instances(folder / "1" / "model.onnx", plan, "m")


def test_runs_on_every_instance_count_times(tmp_path: Path) -> None:
    folder, config, spec = setup(tmp_path, om.add_sub(), ADD_SUB_WARMUP, "max_batch_size: 8\n")
    samples = warmup_samples(config, spec, folder)
    runner = instances(folder, 2)
    calls: list[int] = []
    real_run = runner.run

    class Counting:
        slot_count = runner.slot_count

        def run(self, slot, inputs, output_names):  # type: ignore[no-untyped-def]
            calls.append(slot)
            return real_run(slot, inputs, output_names)

    try:
        run_warmup(Counting(), samples, spec.output_names(), "m")  # type: ignore[arg-type]
    finally:
        runner.close()
    assert calls == [0, 0, 1, 1]


def test_a_sample_that_fails_to_run_fails_with_its_name(tmp_path: Path) -> None:
    warmup = """model_warmup [ { name: "out_of_range" batch_size: 1
      inputs { key: "idx" value: { data_type: TYPE_INT64 dims: [ 1 ] input_data_file: "i" } }
    } ]"""
    folder, config, spec = setup(tmp_path, om.gather(), warmup, "max_batch_size: 4\n")
    (folder / "warmup").mkdir()
    (folder / "warmup" / "i").write_bytes(np.array([100], np.int64).tobytes())
    samples = warmup_samples(config, spec, folder)
    runner = instances(folder, 1)
    try:
        with pytest.raises(ModelLoadError) as info:
            run_warmup(runner, samples, spec.output_names(), "m")
    finally:
        runner.close()
    assert str(info.value).startswith("model 'm': failed to run warmup sample 'out_of_range': ")
