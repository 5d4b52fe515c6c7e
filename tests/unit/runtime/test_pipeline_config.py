"""Pipeline parameters: parsed from the config's string parameters, refused with a reason."""

from __future__ import annotations

import re

import pytest

from pipeserve.errors import ConfigError
from pipeserve.runtime.pipeline.config import Device, parse_pipeline_config


def test_no_pipeline_keys_means_none() -> None:
    assert parse_pipeline_config({}) is None
    assert parse_pipeline_config({"intra_op_thread_count": "2"}) is None


def test_devices_decide_the_stage_count_and_threads_split_the_cores() -> None:
    config = parse_pipeline_config({"pipeline_devices": "cpu, cpu"}, cpu_count=8)
    assert config is not None
    assert config.devices == (Device("cpu"), Device("cpu"))
    assert config.stages == 2 and config.threads_per_stage == 4 and config.in_flight == 2
    assert config.micro_batch_size is None and config.cuts is None and config.cost == "auto"


def test_cuda_devices_and_explicit_settings() -> None:
    config = parse_pipeline_config(
        {
            "pipeline_devices": "cuda:0,cuda:1,cuda:2,cuda",
            "micro_batch_size": "4",
            "pipeline_cuts": "a, b ,c",
            "pipeline_in_flight": "6",
            "pipeline_cost": "estimate",
        }
    )
    assert config is not None
    assert [str(d) for d in config.devices] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert config.micro_batch_size == 4 and config.in_flight == 6
    assert config.cuts == ("a", "b", "c") and config.cost == "estimate"


def test_one_device_is_repeated_for_every_stage() -> None:
    config = parse_pipeline_config({"pipeline_stages": "3"})
    assert config is not None and config.devices == (Device("cpu"),) * 3
    config = parse_pipeline_config({"pipeline_cuts": "t1"})
    assert config is not None and config.stages == 2


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"pipeline_devices": "cpu,tpu:0"}, "unknown device 'tpu:0' in pipeline_devices"),
        ({"pipeline_devices": "gpu"}, "expected 'cpu' or 'cuda:N'"),
        ({"pipeline_devices": "cpu:1"}, "CPU stages are written 'cpu'"),
        ({"pipeline_devices": "cpu,cpu", "pipeline_stages": "3"}, "lists 2 devices"),
        ({"pipeline_stages": "two"}, "'pipeline_stages' is 'two': expected a positive integer"),
        ({"pipeline_stages": "0"}, "'pipeline_stages' is 0"),
        ({"pipeline_stages": "2", "micro_batch_size": "-1"}, "'micro_batch_size' is -1"),
        ({"pipeline_stages": "3", "pipeline_cuts": "a"}, "names 1 tensor(s) but 3 stages"),
        ({"pipeline_stages": "2", "pipeline_cost": "guess"}, "'pipeline_cost' is 'guess'"),
        ({"micro_batch_size": "4"}, "'micro_batch_size' needs a pipeline"),
    ],
)
def test_bad_parameters_name_what_was_expected(parameters: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_pipeline_config(parameters)
