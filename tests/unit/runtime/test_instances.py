"""Model instances: one session per slot, fast start then pre-packed upgrade, thread budget."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from pipeserve.errors import ConfigError
from pipeserve.progress import LoadProgress
from pipeserve.runtime.instances import create_instances, plan_instances
from tests import onnx_models as om

PREPACK_OFF = "session.disable_prepacking"


def _prepacking_disabled(instances, slot: int) -> bool:
    session = instances._sessions[slot]  # noqa: SLF001 - the one thing only the session knows
    options = session.get_session_options()
    try:
        return options.get_session_config_entry(PREPACK_OFF) == "1"
    except RuntimeError:  # onnxruntime raises for a key that was never set
        return False


@pytest.fixture
def model_path(tmp_path):
    """A model with its weights in an external data file: fast start applies to it."""
    path = tmp_path / "mlp.onnx"
    onnx.save(
        om.mlp((32, 64, 8), seed=1),
        str(path),
        save_as_external_data=True,
        location="mlp.weights",
        size_threshold=0,
    )
    return path


def test_inline_model_starts_with_prepacked_sessions(tmp_path):
    path = tmp_path / "inline.onnx"
    onnx.save(om.mlp((32, 64, 8), seed=1), str(path))
    instances = create_instances(path, plan_instances([("CPU", 1, [])], {}), "inline")
    try:
        assert instances.wait_upgraded(timeout=0)  # nothing to upgrade
        assert not _prepacking_disabled(instances, 0)
    finally:
        instances.close()


def test_fast_start_serves_at_once_then_upgrades_to_prepacked_sessions(model_path):
    plan = plan_instances([("CPU", 2, [])], {})
    instances = create_instances(model_path, plan, "mlp")
    try:
        x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
        before = [instances.run(slot, {"x": x}, ["y"])["y"] for slot in range(2)]
        assert instances.wait_upgraded(timeout=30)
        assert not _prepacking_disabled(instances, 0)
        assert not _prepacking_disabled(instances, 1)
        after = [instances.run(slot, {"x": x}, ["y"])["y"] for slot in range(2)]
        for a, b in zip(before, after, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5)
    finally:
        instances.close()


def test_fast_start_can_be_turned_off(model_path):
    instances = create_instances(
        model_path, plan_instances([("CPU", 1, [])], {"fast_start": "false"}), "m"
    )
    try:
        assert instances.wait_upgraded(timeout=0)  # nothing to upgrade
        assert not _prepacking_disabled(instances, 0)
    finally:
        instances.close()


def test_close_during_upgrade_neither_hangs_nor_leaks(model_path):
    instances = create_instances(model_path, plan_instances([("CPU", 4, [])], {}), "m")
    instances.close()
    assert instances.wait_upgraded(timeout=0)
    assert instances.slot_count == 0


def test_thread_budget_and_bad_parameters():
    plan = plan_instances([("CPU", 2, []), ("GPU", 1, [1])], {"intra_op_thread_count": "3"})
    assert plan.kinds == ("CPU", "CPU", "GPU") and plan.gpu_ids == (0, 0, 1)
    assert plan.intra_op_threads == 3
    with pytest.raises(ConfigError, match="'intra_op_thread_count' must be an integer"):
        plan_instances([("CPU", 1, [])], {"intra_op_thread_count": "many"})
    with pytest.raises(ConfigError, match="'fast_start' must be 'true' or 'false'"):
        plan_instances([("CPU", 1, [])], {"fast_start": "soon"})
    with pytest.raises(ConfigError, match="KIND_MODEL is not supported"):
        plan_instances([("MODEL", 1, [])], {})


def test_each_instance_built_is_logged_once_a_load_is_slow(model_path, caplog):
    # after_secs=0: every load counts as slow, so each real session opened logs its line.
    progress = LoadProgress("mlp", 3, logging.getLogger("pipeserve.loader"), after_secs=0.0)
    with caplog.at_level(logging.INFO, logger="pipeserve.loader"):
        instances = create_instances(
            model_path, plan_instances([("CPU", 2, [])], {}), "mlp", progress
        )
    instances.close()
    built = [m for m in caplog.messages if "built" in m]
    assert len(built) == 2
    assert built[0].startswith("model 'mlp' v3: instance 1 of 2 built on cpu, ")
    assert built[1].startswith("model 'mlp' v3: instance 2 of 2 built on cpu, ")
    assert built[1].endswith(" s into the load")
