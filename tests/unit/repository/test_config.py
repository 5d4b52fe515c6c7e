"""config.pbtxt parsing, auto-complete from the graph, validation, version policy."""

from __future__ import annotations

import pytest
from onnx import TensorProto

from pipeserve.errors import ConfigError, ModelLoadError
from pipeserve.repository.config import (
    complete_config,
    model_spec,
    parse_config_json,
    parse_config_text,
    read_config,
    select_versions,
    validate_config,
)
from pipeserve.repository.graph import read_graph_io
from tests import onnx_models as om


@pytest.fixture
def batch_graph(tmp_path):
    folder = om.write_model(tmp_path, "m", om.add_sub())
    return read_graph_io(folder / "1" / "model.onnx")


@pytest.fixture
def fixed_graph(tmp_path):
    folder = om.write_model(tmp_path, "f", om.identity(TensorProto.INT32, [2, 3]))
    return read_graph_io(folder / "1" / "model.onnx")


def test_missing_config_is_completed_like_triton(batch_graph):
    config = complete_config(parse_config_text("", "x"), "m", batch_graph)
    assert config.name == "m"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in config.input] == [("INPUT0", [16]), ("INPUT1", [16])]
    assert [t.name for t in config.output] == ["OUTPUT0", "OUTPUT1"]
    assert config.instance_group[0].count == 1
    validate_config(config, batch_graph)


def test_fixed_first_dimension_means_no_batching(fixed_graph):
    config = complete_config(parse_config_text("", "x"), "f", fixed_graph)
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [2, 3]


def test_partial_config_keeps_given_settings_and_fills_the_rest(batch_graph):
    text = 'max_batch_size: 8\ninput [ { name: "INPUT0" } ]'
    config = complete_config(parse_config_text(text, "x"), "m", batch_graph)
    assert config.max_batch_size == 8
    assert not config.HasField("dynamic_batching")  # only full auto-complete adds it
    names = [t.name for t in config.input]
    assert names == ["INPUT0", "INPUT1"]
    assert config.input[0].data_type == config.input[1].data_type != 0
    validate_config(config, batch_graph)


def test_spec_from_config(batch_graph):
    spec = model_spec(complete_config(parse_config_text("", "x"), "m", batch_graph), 3)
    assert spec.version == 3 and spec.batching
    assert spec.inputs[0].datatype == "FP32" and spec.inputs[0].dims == (16,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name: "other"', "does not match the folder name"),
        ('platform: "tensorflow_savedmodel"', "is not served"),
        ('input [ { name: "NOPE" data_type: TYPE_FP32 dims: [16] } ]', "unexpected input 'NOPE'"),
        (
            'max_batch_size: 4 input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [16] } ]',
            "TYPE_INT32 in config but the ONNX model declares TYPE_FP32",
        ),
        (
            'max_batch_size: 4 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [15] } ]',
            "dims [15] in config",
        ),
        (
            'max_batch_size: 0 input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [16] } ]',
            "dims [16] in config but the ONNX model declares [-1, 16]",
        ),
    ],
)
def test_mismatched_config_is_refused_with_reason(batch_graph, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_config(
            complete_config(parse_config_text(text, "x"), "m", batch_graph), batch_graph
        )


def test_batching_needs_variable_first_dimension(fixed_graph):
    config = complete_config(parse_config_text("max_batch_size: 4", "x"), "f", fixed_graph)
    with pytest.raises(ConfigError, match="needs a variable first dimension"):
        validate_config(config, fixed_graph)


def test_syntax_error_names_the_file(tmp_path):
    (tmp_path / "config.pbtxt").write_text("max_batch_size: [oops")
    with pytest.raises(ConfigError, match="config.pbtxt"):
        read_config(tmp_path)


def test_json_override():
    config = parse_config_json('{"max_batch_size": 2, "dynamic_batching": {}}')
    assert config.max_batch_size == 2 and config.HasField("dynamic_batching")
    with pytest.raises(ConfigError, match="invalid JSON"):
        parse_config_json('{"max_batch_size": "two"')


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("", [3]),
        ("version_policy: { latest: { num_versions: 2 } }", [2, 3]),
        ("version_policy: { all: {} }", [1, 2, 3]),
        ("version_policy: { specific: { versions: [1, 3] } }", [1, 3]),
    ],
)
def test_version_policy(policy, expected):
    assert select_versions(parse_config_text(policy, "x"), [3, 1, 2], "m") == expected


def test_specific_version_that_does_not_exist_names_the_folder():
    # The config leaves `name` out (as most do): the message names the model by its folder.
    config = parse_config_text("version_policy: { specific: { versions: [7] } }", "x")
    with pytest.raises(ConfigError, match=r"^model 'm': version_policy asks for versions \[7\]"):
        select_versions(config, [1], "m")


def test_corrupt_onnx_is_a_load_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="failed to parse ONNX model"):
        read_graph_io(bad)
