"""The `parameters` table: parsing and errors per key, unknown keys with the nearest known one,
README's table generated from it, and the onnxruntime settings it feeds (real sessions)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pipeserve import parameters as table
from pipeserve.errors import ConfigError
from pipeserve.loader import load_model_folder
from pipeserve.runtime.devices import CPU, Device, cuda_usable
from pipeserve.runtime.sessions import (
    Accelerator,
    ThreadBudget,
    open_onnx_session,
    ort_settings,
    providers_for,
)
from tests import onnx_models as om

README = Path(__file__).resolve().parents[2] / "README.md"
no_gpu = pytest.mark.skipif(cuda_usable(), reason="a GPU is present")


@pytest.mark.parametrize(
    ("key", "raw", "value"),
    [
        ("intra_op_thread_count", "3", 3),
        ("execution_mode", "1", "parallel"),
        ("enable_mem_arena", "0", False),
        ("enable_mem_pattern", "True", True),
        ("cudnn_conv_algo_search", "1", "HEURISTIC"),
        ("arena_extend_strategy", "1", "kSameAsRequested"),
        ("gpu_mem_limit", "4294967200", 4294967200),
        ("memory.enable_memory_arena_shrinkage", "cpu:0;gpu:0", "cpu:0;gpu:0"),
        ("batching_mode", "Adaptive", "adaptive"),
        ("pipeline_stages", " 2 ", 2),
    ],
)
def test_values_are_parsed_by_their_row(key: str, raw: str, value: object) -> None:
    assert table.read({key: raw}, key) == value


@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        ("execution_mode", "2", "parameter 'execution_mode' is '2', expected one of 0 (seq"),
        ("enable_mem_arena", "maybe", "parameter 'enable_mem_arena' must be 'true' or 'false'"),
        ("cudnn_conv_algo_search", "3", "'cudnn_conv_algo_search' is '3', expected one of 0 (EX"),
        ("gpu_mem_limit", "-1", "parameter 'gpu_mem_limit' must be >= 0, got -1"),
        ("memory.enable_memory_arena_shrinkage", "gpu", "expected devices like 'cpu:0'"),
        ("pipeline_in_flight", "0", "parameter 'pipeline_in_flight' is 0: expected a positive"),
    ],
)
def test_bad_values_name_the_key_and_what_was_expected(key: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        table.read({key: raw}, key)


def test_absent_or_empty_is_the_default() -> None:
    assert table.read({}, "fast_start", True) is True
    assert table.read({"fast_start": "  "}, "fast_start", True) is True


def test_unknown_keys_come_with_the_nearest_known_one() -> None:
    found = table.unknown_keys(["pipline_devices", "intra_op_threads", "fast_start", "zzz"])
    assert found == [
        ("pipline_devices", "pipeline_devices"),
        ("intra_op_threads", "intra_op_thread_count"),
        ("zzz", None),
    ]


def test_readme_shows_the_table() -> None:
    assert table.markdown_table() in README.read_text()


def test_settings_reach_the_session() -> None:
    settings = ort_settings(
        {"execution_mode": "1", "enable_mem_arena": "0", "enable_mem_pattern": "false"},
        graph_level=2,
    )
    opened = open_onnx_session(
        om.mlp((8, 8, 2)), CPU, ThreadBudget(1, 2), what="model 'm'", settings=settings
    )
    options = opened.session.get_session_options()
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.inter_op_num_threads == 2
    assert options.enable_cpu_mem_arena is False and options.enable_mem_pattern is False
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert opened.run_options is None


def test_triton_graph_levels() -> None:
    level = ort.GraphOptimizationLevel
    assert ort_settings({}, -1).graph_level == level.ORT_ENABLE_BASIC
    assert ort_settings({}, 1).graph_level == level.ORT_ENABLE_EXTENDED
    assert ort_settings({}, 2).graph_level == level.ORT_DISABLE_ALL
    assert ort_settings({}, 0).graph_level == level.ORT_ENABLE_ALL


def test_arena_shrinkage_is_a_run_option_on_every_run() -> None:
    settings = ort_settings({"memory.enable_memory_arena_shrinkage": "cpu:0"})
    opened = open_onnx_session(om.mlp((8, 8, 2)), CPU, ThreadBudget(1), what="m", settings=settings)
    assert opened.run_options is not None
    assert (
        opened.run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    )
    x = np.ones((2, 8), dtype=np.float32)
    assert opened.session.run(["y"], {"x": x}, opened.run_options)[0].shape == (2, 2)


def test_shrinking_an_arena_that_is_off_is_refused_at_load() -> None:
    # onnxruntime would accept the session and then fail every run.
    with pytest.raises(ConfigError, match="'enable_mem_arena' turns the CPU arena off"):
        ort_settings({"memory.enable_memory_arena_shrinkage": "cpu:0", "enable_mem_arena": "0"})


def test_cuda_options_and_accelerators_map_to_providers() -> None:
    settings = ort_settings(
        {"cudnn_conv_algo_search": "1", "gpu_mem_limit": "1024", "do_copy_in_default_stream": "0"},
        accelerators=[Accelerator("gpu", "cuda", (("cudnn_conv_use_max_workspace", "0"),))],
    )
    providers = providers_for(Device("cuda", 1), settings)
    assert providers == [
        (
            "CUDAExecutionProvider",
            {
                "device_id": 1,
                "cudnn_conv_algo_search": "HEURISTIC",
                "cudnn_conv_use_max_workspace": "0",
                "do_copy_in_default_stream": "0",
                "gpu_mem_limit": "1024",
            },
        ),
        "CPUExecutionProvider",
    ]
    assert providers_for(CPU, settings) == ["CPUExecutionProvider"]


def test_unknown_accelerators_are_refused_as_triton_does() -> None:
    with pytest.raises(ConfigError, match="unknown execution accelerator 'gpu_io'"):
        ort_settings({}, accelerators=[Accelerator("gpu", "gpu_io")])
    with pytest.raises(ConfigError, match="unknown execution accelerator 'tensorrt' in cpu_"):
        ort_settings({}, accelerators=[Accelerator("cpu", "tensorrt")])
    with pytest.raises(ConfigError, match="tensorrt precision_mode 'FP8'"):
        ort_settings(
            {}, accelerators=[Accelerator("gpu", "tensorrt", (("precision_mode", "FP8"),))]
        )


@no_gpu
def test_accelerators_that_cannot_run_here_warn_and_name_what_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeserve.runtime.sessions"):
        settings = ort_settings(
            {},
            accelerators=[
                Accelerator("gpu", "tensorrt", (("precision_mode", "FP16"),)),
                Accelerator("cpu", "openvino"),
            ],
            what="model 'acc'",
        )
    assert settings.tensorrt is None and settings.openvino is False
    assert [r.getMessage() for r in caplog.records] == [
        "model 'acc': gpu_execution_accelerator 'tensorrt' cannot be used: no CUDA device here: "
        "the model runs on the CPU",
        "model 'acc': cpu_execution_accelerator 'openvino' cannot be used: this onnxruntime has "
        "no OpenVINO provider: CPU runs it",
    ]


CONFIG = """
max_batch_size: 4
dynamic_batching { }
optimization { graph { level: 1 } }
parameters { key: "pipline_devices" value: { string_value: "cpu,cpu" } }
parameters { key: "execution_mode" value: { string_value: "1" } }
"""


def test_load_warns_about_an_unknown_key_and_serves_unpipelined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = om.write_model(tmp_path, "typo", om.mlp((8, 8, 2)), config=CONFIG)
    with caplog.at_level(logging.WARNING, logger="pipeserve"):
        loaded = load_model_folder("typo", folder)
    try:
        assert [r.getMessage() for r in caplog.records if r.name == "pipeserve.loader"] == [
            "model 'typo': unknown parameter 'pipline_devices' is ignored "
            "(did you mean 'pipeline_devices'?)"
        ]
        version = loaded.versions[1]
        assert version.stage_devices == ()  # the typo'd key asks for no pipeline
        out = version.runner.run(0, {"x": np.ones((2, 8), dtype=np.float32)}, ["y"])
        assert out["y"].shape == (2, 2)
    finally:
        loaded.close()


def test_load_refuses_a_bad_value_naming_the_key(tmp_path: Path) -> None:
    config = 'parameters { key: "enable_mem_pattern" value: { string_value: "sometimes" } }'
    folder = om.write_model(tmp_path, "bad", om.mlp((8, 8, 2)), config=config)
    with pytest.raises(ConfigError, match="parameter 'enable_mem_pattern' must be 'true'"):
        load_model_folder("bad", folder)
