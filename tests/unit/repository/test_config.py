"""config.pbtxt parsing, auto-complete from the graph, validation, version policy."""

from __future__ import annotations

import re

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


# ---- reshape and scalars (Triton's rules; served by runtime/reshape.py) -----------------------


def _graph(tmp_path, dims):
    folder = om.write_model(tmp_path, "r", om.identity(TensorProto.FLOAT, dims))
    return read_graph_io(folder / "1" / "model.onnx")


def _io(dims: str, reshape: str | None, batch: int) -> str:
    shape = f" reshape {{ shape: [ {reshape} ] }}" if reshape is not None else ""
    return (
        f"max_batch_size: {batch}\n"
        f'input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {dims} ]{shape} }} ]'
    )


@pytest.mark.parametrize(
    ("graph_dims", "dims", "reshape", "batch"),
    [
        (["b", 2, 4], "8", "2, 4", 8),
        (["b", 8, -1, 1, 6], "2, 4, -1, 6", "8, -1, 1, 6", 8),  # [8, 6] both sides of the -1
        (["b"], "1", "", 8),  # one element per batch item
        (["n", 2, 2], "-1, 4", "-1, 2, 2", 0),
    ],
)
def test_a_reshape_that_holds_the_same_elements_is_accepted(
    tmp_path, graph_dims, dims, reshape, batch
):
    graph_dims = [d if d != -1 else "v" for d in graph_dims]
    graph = _graph(tmp_path, graph_dims)
    config = complete_config(parse_config_text(_io(dims, reshape, batch), "x"), "r", graph)
    validate_config(config, graph)
    spec = model_spec(config, 1, graph=graph)
    want = tuple(int(d) for d in reshape.split(",")) if reshape else ()
    assert spec.inputs[0].model_dims == want


@pytest.mark.parametrize(
    ("graph_dims", "dims", "reshape", "batch", "message"),
    [
        (["b", 2, 4], "6", "2, 4", 8, "dims [6] and reshape [2, 4] hold different numbers"),
        (["b", 2, 4], "-1", "2, 4", 8, "different numbers of variable-size (-1) dimensions"),
        (["b", 2, 2], "2, -1", "-1, 2", 8, "hold different numbers of elements"),
        (["b", 2, 4], "8", "2, 0", 8, "reshape [2, 0]: every dimension must be an integer >= 1"),
        (["b", 2, 4], "0", None, 8, "dims [0]: every dimension must be an integer >= 1"),
        (["b", 2, 4], "8", "4, 2", 8, "has reshape [4, 2] in config but the ONNX model declares"),
        (["b"], "2", "", 8, "an empty reshape (the model takes one element per batch item)"),
        ([], "1", "", 0, "an empty reshape needs max_batch_size > 0"),
        ([], "1, 3", None, 0, "is a scalar in the ONNX model: its dims in config must all be 1"),
    ],
)
def test_a_reshape_that_cannot_hold_is_refused_with_the_reason(
    tmp_path, graph_dims, dims, reshape, batch, message
):
    graph = _graph(tmp_path, graph_dims)
    config = complete_config(parse_config_text(_io(dims, reshape, batch), "x"), "r", graph)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config, graph)


def test_a_scalar_or_batch_only_tensor_is_completed_with_dims_one(tmp_path):
    scalar = _graph(tmp_path / "s", [])
    config = complete_config(parse_config_text("", "x"), "r", scalar)
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [1] and not config.input[0].HasField("reshape")
    validate_config(config, scalar)
    assert model_spec(config, 1, graph=scalar).inputs[0].model_dims == ()
    # Without the graph the spec cannot know the model's tensor is a scalar.
    assert model_spec(config, 1).inputs[0].model_dims is None

    batch_only = _graph(tmp_path / "b", ["batch"])
    config = complete_config(parse_config_text("", "x"), "r", batch_only)
    assert config.max_batch_size == 4
    for tensor in (config.input[0], config.output[0]):
        assert list(tensor.dims) == [1]
        assert tensor.HasField("reshape") and not tensor.reshape.shape
    validate_config(config, batch_only)
    assert model_spec(config, 1, graph=batch_only).inputs[0].model_dims == ()
