"""Reading dynamic_batching from a ModelConfig: defaults, Triton's rules, precise refusals."""

from __future__ import annotations

import pytest

from pipeserve.batching.base import ModelRunner
from pipeserve.batching.direct import DirectScheduler
from pipeserve.batching.dynamic import DynamicBatcher
from pipeserve.batching.factory import batching_policy, create_scheduler
from pipeserve.batching.policy import (
    DEFAULT_MAX_QUEUE_SIZE,
    BatchingMode,
    QueuePolicy,
    TimeoutAction,
)
from pipeserve.errors import ConfigError
from pipeserve.inference import TensorSpec
from pipeserve.statistics import ModelStats
from tests.unit.batching_fakes import GatedRunner, config, policy, run, spec


def test_defaults() -> None:
    p = policy("dynamic_batching { }")
    assert p.max_batch_size == 8
    assert p.preferred_batch_sizes == ()
    assert p.max_preferred_batch_size == 8
    assert p.max_queue_delay_ns == 0
    assert (p.priority_levels, p.default_priority_level) == (1, 1)
    assert p.queue_policies == (QueuePolicy(max_queue_size=DEFAULT_MAX_QUEUE_SIZE),)
    assert p.mode is BatchingMode.FIXED
    assert not p.preserve_ordering


def test_full_section() -> None:
    p = policy(
        "dynamic_batching { preferred_batch_size: [4, 2, 4] max_queue_delay_microseconds: 250 "
        "preserve_ordering: true priority_levels: 3 default_priority_level: 2 "
        "default_queue_policy { max_queue_size: 10 timeout_action: DELAY "
        "default_timeout_microseconds: 5000 allow_timeout_override: true } "
        "priority_queue_policy { key: 1 value: { max_queue_size: 3 } } }\n"
        'parameters { key: "batching_mode" value: { string_value: "Adaptive" } }'
    )
    assert p.preferred_batch_sizes == (2, 4)
    assert p.max_preferred_batch_size == 4
    assert p.max_queue_delay_ns == 250_000
    assert p.preserve_ordering
    assert (p.priority_levels, p.default_priority_level) == (3, 2)
    default = QueuePolicy(10, 5000, True, TimeoutAction.DELAY)
    assert p.queue_policies == (QueuePolicy(3), default, default)
    assert p.mode is BatchingMode.ADAPTIVE


def test_level_of_maps_zero_and_out_of_range_to_default() -> None:
    p = policy("dynamic_batching { priority_levels: 3 default_priority_level: 2 }")
    assert [p.level_of(x) for x in (0, 1, 2, 3, 4, -1)] == [1, 0, 1, 2, 1, 1]
    single = policy("dynamic_batching { }")
    assert single.level_of(5) == 0


def test_equal_shape_inputs_are_the_variable_ones_ragged_included() -> None:
    model = spec(
        dims=(-1,),
        extra_inputs=[
            TensorSpec("fixed", "FP32", (3,)),
            TensorSpec("ragged", "FP32", (-1,), allow_ragged_batch=True),
        ],
    )
    p = policy("dynamic_batching { }", model)
    # Ragged inputs need batch_input support to be concatenated; until then equal shapes only.
    assert p.equal_shape_inputs == frozenset({"x", "ragged"})


@pytest.mark.parametrize(
    ("timeout", "allow", "requested", "expected"),
    [
        (0, False, 500, 0),  # override not allowed: ignored
        (1000, False, 500, 1000),
        (1000, True, 500, 500),  # may lower
        (1000, True, 5000, 1000),  # may not raise
        (0, True, 500, 500),  # no default: the request's own applies
        (1000, True, 0, 1000),
    ],
)
def test_timeout_override(timeout: int, allow: bool, requested: int, expected: int) -> None:
    assert QueuePolicy(10, timeout, allow).timeout_us(requested) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dynamic_batching { preferred_batch_size: 9 }", r"preferred_batch_size 9 must be in \[1,"),
        ("dynamic_batching { preferred_batch_size: 0 }", "preferred_batch_size 0 must be"),
        (
            "dynamic_batching { priority_levels: 2 default_priority_level: 3 }",
            r"default_priority_level must be in \[1, priority_levels=2\], got 3",
        ),
        (
            "dynamic_batching { priority_levels: 2 }",
            r"default_priority_level must be in \[1, priority_levels=2\], got 0",
        ),
        (
            "dynamic_batching { default_priority_level: 2 }",
            "default_priority_level 2 needs priority_levels >= 2",
        ),
        (
            "dynamic_batching { priority_levels: 2 default_priority_level: 1 "
            "priority_queue_policy { key: 5 value: { } } }",
            r"priority_queue_policy key 5 must be a priority level in \[1, 2\]",
        ),
        (
            "dynamic_batching { priority_levels: 5000 default_priority_level: 1 }",
            "priority_levels must be <= 1024",
        ),
        (
            'dynamic_batching { }\nparameters { key: "batching_mode" value: '
            '{ string_value: "turbo" } }',
            "parameter 'batching_mode' is 'turbo', expected one of 'fixed', 'adaptive'",
        ),
        (
            "dynamic_batching { default_queue_policy { timeout_action: 7 } }",
            r"default_queue_policy.timeout_action 7 is not REJECT \(0\) or DELAY \(1\)",
        ),
    ],
)
def test_bad_values_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        policy(text)


def test_preferred_sizes_need_a_batch_dimension() -> None:
    model = spec(max_batch_size=0)
    with pytest.raises(ConfigError, match="needs max_batch_size > 0"):
        policy("dynamic_batching { preferred_batch_size: 1 }", model)
    # Without preferred sizes a non-batching model still gets queue policies, one per execution.
    assert policy("dynamic_batching { }", model).max_batch_size == 1


def test_factory_picks_the_scheduler_from_the_config() -> None:
    async def body() -> None:
        model = spec()
        runner: ModelRunner = GatedRunner()
        with_batching = batching_policy(config("dynamic_batching { }"), model)
        without = batching_policy(config(""), model)
        assert without is None
        batcher = create_scheduler(with_batching, model, runner, ModelStats())
        direct = create_scheduler(without, model, runner, ModelStats())
        assert isinstance(batcher, DynamicBatcher)
        assert isinstance(direct, DirectScheduler)
        await batcher.close()
        await direct.close()
        with pytest.raises(ConfigError):
            batching_policy(config("dynamic_batching { preferred_batch_size: 99 }"), model)

    run(body())
