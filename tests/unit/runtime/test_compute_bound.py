"""The default thread rule's load-time measurement (runtime/compute_bound.py): real onnxruntime
sessions of a tiny model and of a convolution stack far above the limit on any machine."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeserve.runtime.compute_bound import WIDE_MIN_NS, batch_one_ns, is_compute_bound
from pipeserve.runtime.devices import CPU, available_cpus, session_cores
from pipeserve.runtime.instances import create_instances, plan_instances
from pipeserve.runtime.sessions import ThreadBudget, open_onnx_session
from tests import onnx_models as om

several_cores = pytest.mark.skipif(
    available_cpus() < 2, reason="one core: the default already is every core"
)


def conv_stack(layers: int = 4, channels: int = 16, size: int = 128) -> onnx.ModelProto:
    """x[batch, 16, 128, 128] through `layers` 3x3 convolutions: ~38M multiply-adds per layer
    and sample, tens of milliseconds per batch-1 run on one core (the limit is 1.5 ms)."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.1
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [out], pads=[1, 1, 1, 1]))
        prev = out
    dims = ["batch", channels, size, size]
    graph = helper.make_graph(
        nodes,
        "conv_stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", om.OPSET)])
    model.ir_version = om.IR_VERSION
    return model


def _session(tmp_path, model: onnx.ModelProto):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return open_onnx_session(path, CPU, ThreadBudget(1), what="model 'm'").session


def test_a_tiny_model_is_not_compute_bound(tmp_path) -> None:
    measured = batch_one_ns(_session(tmp_path, om.mlp((8, 8, 2))))
    assert measured is not None and 0 < measured < WIDE_MIN_NS
    assert not is_compute_bound(measured)


def test_a_convolution_stack_is_compute_bound(tmp_path) -> None:
    measured = batch_one_ns(_session(tmp_path, conv_stack()))
    assert is_compute_bound(measured), measured


def test_inputs_it_cannot_make_leave_the_default(tmp_path) -> None:
    strings = om.identity(TensorProto.STRING, [1])
    assert batch_one_ns(_session(tmp_path, strings)) is None
    assert not is_compute_bound(None)


def _threads(instances) -> int:
    return instances._sessions[0].get_session_options().intra_op_num_threads


@several_cores
def test_a_compute_bound_model_gets_every_core_and_says_so(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "conv.onnx"
    onnx.save(conv_stack(), str(path))
    with caplog.at_level(logging.INFO, logger="pipeserve.runtime"):
        instances = create_instances(path, plan_instances([("CPU", 1, [])], {}, "conv"), "conv")
    try:
        assert _threads(instances) == available_cpus() > session_cores()
        assert any("(compute-bound)" in r.getMessage() for r in caplog.records)
        x = np.ones((1, 16, 128, 128), np.float32)
        assert instances.run(0, {"x": x}, ["y"])["y"].shape == x.shape
    finally:
        instances.close()


@several_cores
def test_a_tiny_model_keeps_a_core_for_the_front_end(tmp_path) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(om.mlp((8, 8, 2)), str(path))
    instances = create_instances(path, plan_instances([("CPU", 1, [])], {}, "m"), "m")
    try:
        assert _threads(instances) == session_cores()
    finally:
        instances.close()


def test_a_configured_thread_count_is_never_measured_over(tmp_path) -> None:
    path = tmp_path / "conv.onnx"
    onnx.save(conv_stack(), str(path))
    plan = plan_instances([("CPU", 1, [])], {"intra_op_thread_count": "1"}, "conv")
    instances = create_instances(path, plan, "conv")
    try:
        assert _threads(instances) == 1
    finally:
        instances.close()
