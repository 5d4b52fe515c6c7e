"""repository/sections.py: every configured section is honoured or refused by name."""

from __future__ import annotations

import pytest

from pipeserve.api.generated import model_config_pb2 as mc
from pipeserve.errors import ConfigError
from pipeserve.repository.config import parse_config_text
from pipeserve.repository.sections import DELEGATED, HONOURED, check_sections
from tests import onnx_models as om


def refusal(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        check_sections(parse_config_text(text, "x"), "m")
    return str(info.value)


def test_a_triton_onnx_config_with_honoured_sections_passes() -> None:
    text = (
        om.ADD_SUB_CONFIG
        + """
        version_policy { latest { num_versions: 2 } }
        instance_group [ { name: "g" kind: KIND_CPU count: 2 } ]
        dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 100
          default_queue_policy { max_queue_size: 8 } }
        default_model_filename: "model.onnx"
        parameters { key: "unknown_key" value: { string_value: "passed on" } }
        optimization { graph { level: 1 } }
        response_cache { enable: false }
        model_transaction_policy { decoupled: false }
        input [ { name: "R" dims: [ 4 ] reshape { shape: [ 2, 2 ] } } ]
        output [ { name: "S" dims: [ 1 ] reshape { shape: [ ] } } ]
    """
    )
    check_sections(parse_config_text(text, "x"), "m")


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("sequence_batching {}", "'sequence_batching'"),
        ("sequence_batching { max_sequence_idle_microseconds: 5 }", "'sequence_batching'"),
        (
            'ensemble_scheduling { step [ { model_name: "a" model_version: -1 } ] }',
            "'ensemble_scheduling'",
        ),
        ("response_cache { enable: true }", "'response_cache'"),
        ("model_transaction_policy { decoupled: true }", "'model_transaction_policy.decoupled'"),
        ('cc_model_filenames { key: "7.5" value: "a.onnx" }', "'cc_model_filenames'"),
        ('metric_tags { key: "a" value: "b" }', "'metric_tags'"),
        ('batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "n" } ]', "'batch_input'"),
        (
            'model_repository_agents { agents [ { name: "checksum" } ] }',
            "'model_repository_agents'",
        ),
        (
            'input [ { name: "I" dims: [ 2 ] is_shape_tensor: true } ]',
            "'input.is_shape_tensor' (input 'I')",
        ),
        (
            'output [ { name: "O" dims: [ 1 ] is_shape_tensor: true } ]',
            "'output.is_shape_tensor' (output 'O')",
        ),
        (
            "instance_group [ { count: 1 rate_limiter { priority: 2 } } ]",
            "'instance_group.rate_limiter' (instance_group '#0')",
        ),
        ('instance_group [ { count: 1 host_policy: "numa0" } ]', "'instance_group.host_policy'"),
    ],
)
def test_unimplemented_sections_are_refused_by_name(text: str, path: str) -> None:
    message = refusal(text)
    assert message.startswith("model 'm': config section ")
    assert path in message
    assert "not supported" in message


def test_empty_sections_that_mean_off_are_not_refused() -> None:
    check_sections(parse_config_text("response_cache {}\nmodel_operations {}", "x"), "m")


def test_every_modelconfig_field_is_honoured_delegated_or_refused() -> None:
    """A field added to the proto must be put in a list on purpose: the walk refuses anything
    it does not know, so this only checks that the lists name real fields."""
    real = {f.name for f in mc.ModelConfig.DESCRIPTOR.fields}
    assert set(HONOURED) <= real
    assert real >= DELEGATED
    assert not set(HONOURED) & DELEGATED
