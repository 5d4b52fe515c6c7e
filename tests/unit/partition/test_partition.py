"""Partitioner: stages are valid ONNX models whose composition computes the original graph, on
torch-exported models (shape arithmetic, a shared attention bias) and hand-built graphs (If with
outer-scope inputs, an early graph output, weights past 2 GiB in an external file)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeserve.errors import ConfigError
from pipeserve.partition.cuts import choose_cuts, min_bottleneck
from pipeserve.partition.graph_index import GraphIndex
from pipeserve.partition.partitioner import Plan, load_graph, partition, partition_model
from tests.fixtures import graphs


def _session(model: onnx.ModelProto | Path, base_dir: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if base_dir is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(base_dir)
        )
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _reference(model: onnx.ModelProto | Path, feeds: Mapping[str, np.ndarray]) -> dict:
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def _run_stages(plan: Plan, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the stages one after another, as the executor does for one micro-batch."""
    env = dict(feeds)
    for stage in plan.stages:
        session = _session(stage.model, plan.base_dir)
        outputs = session.run(list(stage.outputs), {n: env[n] for n in stage.inputs})
        env.update(zip(stage.outputs, outputs, strict=True))
    return {name: env[name] for name in plan.graph_outputs}


def _assert_same(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", graphs.TORCH_MODELS)
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_torch_exported_stages_compute_the_original(name: str, stages: int) -> None:
    path = graphs.torch_model(name)
    plan = partition_model(path, stages, cost="estimate")
    assert len(plan.stages) == stages
    assert all(stage.nodes for stage in plan.stages)
    for stage in plan.stages:
        onnx.checker.check_model(stage.model, full_check=True)
    feeds = graphs.torch_inputs(name, batch=3)
    _assert_same(_run_stages(plan, feeds), _reference(path, feeds))


def test_mlp_chain_is_bitwise_equal() -> None:
    # Gemm + Relu run the same kernels whether split or not.
    path = graphs.torch_model("mlp")
    feeds = graphs.torch_inputs("mlp", batch=5)
    want = _reference(path, feeds)
    for stages in (2, 3, 4):
        got = _run_stages(partition_model(path, stages, cost="estimate"), feeds)
        assert np.array_equal(got["y"], want["y"])


def test_encoder_cuts_at_block_boundaries_and_recomputes_shape_arithmetic() -> None:
    plan = partition_model(graphs.torch_model("encoder"), 4, cost="estimate")
    # Between blocks only the hidden state crosses: the attention bias (derived from the mask
    # input once per block input) and every Shape/Gather/Concat chain are recomputed per stage.
    assert [len(cut.tensors) for cut in plan.cuts] == [1, 1, 1]
    for stage in plan.stages:
        assert "mask" in stage.inputs
        assert any(name.endswith("Shape") or "Shape" in name for name in stage.recomputed)
    crossing = {t for cut in plan.cuts for t in cut.tensors}
    assert not crossing & set(plan.graph_inputs)


def test_profiled_costs_balance_the_encoder() -> None:
    plan = partition_model(graphs.torch_model("encoder"), 2, cost="profile")
    assert plan.cost_unit == "us (profiled)"
    costs = [stage.est_cost for stage in plan.stages]
    assert min(costs) > 0
    assert max(costs) / sum(costs) < 0.75
    feeds = graphs.torch_inputs("encoder", batch=2)
    _assert_same(_run_stages(plan, feeds), _reference(graphs.torch_model("encoder"), feeds))


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("flag", [True, False])
def test_if_node_keeps_outer_scope_inputs_and_early_output_passes_through(
    stages: int, flag: bool
) -> None:
    model = graphs.branchy()
    plan = partition(model, stages, cost="estimate")
    feeds = graphs.branchy_inputs(batch=3, flag=flag)
    _assert_same(_run_stages(plan, feeds), _reference(model, feeds))
    owner = next(s for s in plan.stages if "branch" in s.nodes)
    # The If reads h1 and W2 only from its branches: both must reach its stage.
    assert "W2" in owner.initializers
    assert "h1" in owner.inputs or "copy" in owner.nodes
    early = next(s for s in plan.stages if "relu1" in s.nodes)
    assert "early" in early.outputs


def test_shared_initializer_is_included_in_every_stage_that_reads_it() -> None:
    # W1 is read by mm1 (first compute node) and mm3; cut between them.
    plan = partition(graphs.branchy(), 2, cuts=["h2b"])
    first, second = plan.stages
    assert "mm1" in first.nodes and "mm3" in second.nodes
    assert "W1" in first.initializers and "W1" in second.initializers
    assert "W3" not in first.initializers
    assert first.weight_bytes > 0 and second.weight_bytes > 0


def test_named_cut_decides_the_boundary() -> None:
    path = graphs.torch_model("encoder")
    plan = partition_model(path, 2, cuts=["/blocks.1/Add_3_output_0"], cost="estimate")
    assert plan.cuts[0].tensors == ("/blocks.1/Add_3_output_0",)
    assert plan.stages[0].nodes[-1].startswith("/blocks.1/")
    assert plan.stages[1].nodes[0].startswith("/blocks.2/")


def test_external_weights_past_2gib_are_referenced_not_loaded(tmp_path: Path) -> None:
    path = graphs.far_external_weights(tmp_path)
    plan = partition_model(path, 2, cost="estimate")
    last = plan.stages[-1]
    tensor = next(t for t in last.model.graph.initializer if t.name == "W3")
    entries = {e.key: e.value for e in tensor.external_data}
    assert tensor.data_location == onnx.TensorProto.EXTERNAL
    assert entries == {
        "location": "weights.bin",
        "offset": str(graphs.FAR_OFFSET),
        "length": str(16 * 16 * 4),
    }
    assert not tensor.raw_data
    # Each stage holds only its own weights, and every stage model stays tiny.
    assert [s.initializers for s in plan.stages] == [("W0", "W1"), ("W2", "W3")]
    assert all(s.weight_bytes == 2 * 16 * 16 * 4 for s in plan.stages)
    assert all(s.model.ByteSize() < 4096 for s in plan.stages)
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)}
    _assert_same(_run_stages(plan, feeds), _reference(path, feeds))


def test_profiling_reads_external_weights_from_the_model_folder(tmp_path: Path) -> None:
    path = graphs.far_external_weights(tmp_path)
    plan = partition_model(path, 4, cost="profile")
    # Profiling ran the whole model, W3 read from 3 GiB into the file (else: "estimated").
    assert plan.cost_unit == "us (profiled)"
    assert sum(len(s.nodes) for s in plan.stages) == 8
    feeds = {"x": np.ones((2, 16), np.float32)}
    _assert_same(_run_stages(plan, feeds), _reference(path, feeds))


def test_load_graph_never_reads_weights(tmp_path: Path) -> None:
    model = load_graph(graphs.far_external_weights(tmp_path))
    assert all(not t.raw_data for t in model.graph.initializer)


@pytest.mark.parametrize(
    ("stages", "cuts", "message"),
    [
        (9, None, "the graph has only 8 compute node(s)"),
        (2, ["nope"], "cut tensor 'nope' is not in the graph"),
        (2, ["x"], "cut tensor 'x' is a graph input or initializer"),
        (2, ["y"], "produced by the last compute node"),
        (3, ["h2b", "a1"], "must be listed in graph order"),
        (3, ["h2b"], "names 1 tensor(s) but 3 stages need 2 cut(s)"),
        (0, None, "at least 1 stage"),
    ],
)
def test_bad_splits_are_refused_with_a_reason(
    stages: int, cuts: list[str] | None, message: str, tmp_path: Path
) -> None:
    path = graphs.far_external_weights(tmp_path) if cuts is None else None
    with pytest.raises(ConfigError, match=re.escape(message)):
        if path is not None:
            partition_model(path, stages, cost="estimate")
        else:
            partition(graphs.branchy(), stages, cuts=cuts, cost="estimate")


def test_cut_on_shape_arithmetic_is_refused() -> None:
    model = onnx.load(str(graphs.torch_model("encoder")))
    index = GraphIndex(model)
    shape_node = next(n for n in index.nodes.values() if n.op_type == "Shape")
    with pytest.raises(ConfigError, match="shape arithmetic"):
        partition(model, 2, cuts=[shape_node.outputs[0]], cost="estimate")


def test_graph_index_classifies_exporter_shape_chains() -> None:
    index = GraphIndex(onnx.load(str(graphs.torch_model("encoder")), load_external_data=False))
    kinds = {n.op_type for n in index.nodes.values() if n.recomputable}
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Constant"} <= kinds
    compute = {index.nodes[i].op_type for i in index.compute_nodes}
    assert {"MatMul", "Softmax", "LayerNormalization"} <= compute
    assert "Shape" not in compute


def test_choose_cuts_balances_then_minimises_crossing() -> None:
    costs = [1.0] * 8
    assert min_bottleneck(costs, 2) == pytest.approx(4.0)
    flat = [0.0] + [10.0] * 7 + [0.0]
    assert choose_cuts(costs, flat, 2) == [4]
    # A cheap boundary one node off balance wins only within the slack.
    cheap_at_5 = list(flat)
    cheap_at_5[5] = 1.0
    assert choose_cuts(costs, cheap_at_5, 2, slack=0.3) == [5]
    assert choose_cuts(costs, cheap_at_5, 2, slack=0.0) == [4]
    assert choose_cuts([5.0, 1.0, 1.0, 1.0, 5.0], [0.0] * 6, 3) == [1, 4]
    with pytest.raises(ConfigError):
        choose_cuts(costs, flat, 9)
