"""The one session builder (runtime/sessions.py) and the device rules it applies: placement of a
missing GPU, the thread budget, errors naming what failed to load."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from pipeserve.errors import ModelLoadError
from pipeserve.runtime.devices import CPU, Device, cuda_usable, instance_device, split_cores
from pipeserve.runtime.instances import create_instances, plan_instances
from pipeserve.runtime.sessions import ThreadBudget, open_onnx_session, thread_budget
from tests import onnx_models as om

no_gpu = pytest.mark.skipif(cuda_usable(), reason="a GPU is present: nothing falls back")


def test_thread_budget_rule() -> None:
    # The session cores split between the CPU sessions that run at once, at least one each.
    assert split_cores(2, cores=8) == 4
    assert split_cores(3, cores=8) == 2
    assert split_cores(4, cores=2) == 1
    assert split_cores(0, cores=3) == 3
    # A count the config gives wins everywhere; a CUDA session's kernels run on the GPU.
    assert thread_budget(CPU, 2, intra_op=5) == ThreadBudget(5, 1)
    assert thread_budget(Device("cuda", 1), 2) == ThreadBudget(1, 1)
    assert thread_budget(Device("cuda", 1), 2, intra_op=3, inter_op=2) == ThreadBudget(3, 2)
    assert thread_budget(CPU, 1).intra_op == split_cores(1)


def test_session_threads_are_what_the_budget_says(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(om.mlp((8, 8, 2)), str(path))
    opened = open_onnx_session(path, CPU, ThreadBudget(2, 1), what="model 'm'")
    options = opened.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opened.device == CPU and opened.weights is None
    x = np.ones((1, 8), dtype=np.float32)
    assert opened.session.run(["y"], {"x": x})[0].shape == (1, 2)


def test_instance_group_kinds_map_onto_devices() -> None:
    assert instance_device("CPU", 3) == CPU
    assert instance_device("GPU", 1) == Device("cuda", 1)
    assert instance_device("AUTO", 1) == (Device("cuda", 1) if cuda_usable() else CPU)


@no_gpu
def test_gpu_instances_without_a_gpu_run_on_the_cpu_with_one_warning(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(om.mlp((8, 8, 2)), str(path))
    with caplog.at_level(logging.WARNING, logger="pipeserve.runtime"):
        plan = plan_instances([("GPU", 2, [0, 1]), ("CPU", 1, [])], {}, "gpu_model")
        instances = create_instances(path, plan, "gpu_model")
    try:
        assert instances.devices == ("cpu", "cpu", "cpu")
        # Three CPU sessions now share the cores, not one.
        assert plan.intra_op_threads == split_cores(3)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [
            "model 'gpu_model' instances ask for cuda:0, cuda:1 but onnxruntime cannot use CUDA "
            "here (no GPU or no CUDA libraries): they run on the CPU"
        ]
        x = np.ones((2, 8), dtype=np.float32)
        assert instances.run(0, {"x": x}, ["y"])["y"].shape == (2, 2)
    finally:
        instances.close()


def test_a_graph_onnxruntime_refuses_is_a_load_error_naming_it(tmp_path) -> None:
    graph = om.mlp((4, 4, 2))
    graph.graph.node[0].op_type = "NoSuchOp"
    path = tmp_path / "broken.onnx"
    onnx.save(graph, str(path))
    with pytest.raises(ModelLoadError, match=r"onnxruntime could not load '.*broken\.onnx'"):
        open_onnx_session(path, CPU, ThreadBudget(1), what="model 'broken'")
    with pytest.raises(
        ModelLoadError, match=r"onnxruntime could not load pipeline stage 1 of model 'm' on cpu"
    ):
        open_onnx_session(graph, CPU, ThreadBudget(1), what="pipeline stage 1 of model 'm'")
