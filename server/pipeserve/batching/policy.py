"""The dynamic batcher's settings, read once from a model's completed config and validated.

`BatchingPolicy.from_config` turns `ModelConfig.dynamic_batching` (plus `max_batch_size`, the
inputs' variable dims and the `batching_mode` parameter) into frozen values, refusing bad ones
with ConfigError before the model serves. The config is any object shaped like the
`inference.ModelConfig` protobuf message (ours or tritonclient's); this module never imports
generated code.

Semantics follow Triton's `ModelDynamicBatching` and `ModelQueuePolicy`:

- priority levels are numbered 1..priority_levels, 1 is served first; a request's `priority` of 0
  or above priority_levels means default_priority_level. priority_levels 0 means one level.
- max_queue_size 0 means "no limit" in Triton; every queue here is bounded, so 0 becomes
  DEFAULT_MAX_QUEUE_SIZE (per level) instead.
- a request's own timeout applies only when allow_timeout_override is set, and only to lower the
  level's default_timeout_microseconds (0 = no timeout).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeserve import parameters as table
from pipeserve.errors import ConfigError
from pipeserve.inference import ModelSpec

# The bound used for a level whose max_queue_size is 0 (Triton: unlimited).
DEFAULT_MAX_QUEUE_SIZE = 4096

# The `parameters` key that selects how the batching delay is chosen.
BATCHING_MODE_PARAMETER = "batching_mode"


class TimeoutAction(enum.Enum):
    """What happens to a request still queued when its timeout expires (Triton's enum values)."""

    REJECT = 0  # answered at once with "Request timeout expired"
    DELAY = 1  # moved behind every non-expired request of its level, still executed


class BatchingMode(enum.Enum):
    FIXED = "fixed"  # Triton's: wait up to max_queue_delay_microseconds for a batch to fill
    ADAPTIVE = "adaptive"  # pick the wait from arrival rate and per-batch cost (adaptive.py)


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """One priority level's queue policy."""

    max_queue_size: int
    default_timeout_us: int = 0
    allow_timeout_override: bool = False
    timeout_action: TimeoutAction = TimeoutAction.REJECT

    def timeout_us(self, requested_us: int) -> int:
        """The queue timeout for a request that asked for `requested_us` (0 = none asked).

        A request may lower the default, never raise it; without a default it may set one.
        """
        if not self.allow_timeout_override or requested_us <= 0:
            return self.default_timeout_us
        if self.default_timeout_us and requested_us > self.default_timeout_us:
            return self.default_timeout_us
        return requested_us


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    """Everything DynamicBatcher needs to know about how to form batches for one model version."""

    # Largest total batch a single execution may hold; 1 for models without a batch dimension.
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]  # ascending, unique
    max_queue_delay_ns: int
    preserve_ordering: bool
    priority_levels: int  # >= 1 (a config's 0 becomes one level)
    default_priority_level: int  # 1-based
    queue_policies: tuple[QueuePolicy, ...]  # index = level - 1
    mode: BatchingMode = BatchingMode.FIXED
    # Inputs whose shapes must be equal for requests to share a batch: those with variable (-1)
    # dims. allow_ragged_batch does not lift this: Triton feeds ragged inputs to the model as one
    # flattened tensor described by `batch_input` offsets, which pipeserve does not build, and
    # concatenating unequal shapes along the batch dimension is impossible.
    equal_shape_inputs: frozenset[str] = frozenset()

    @property
    def max_preferred_batch_size(self) -> int:
        """The size beyond which waiting for more requests no longer helps."""
        return self.preferred_batch_sizes[-1] if self.preferred_batch_sizes else self.max_batch_size

    def level_of(self, priority: int) -> int:
        """0-based queue index for a request's `priority` parameter (Triton: 0 or out of range
        means the default level)."""
        if priority <= 0 or priority > self.priority_levels:
            return self.default_priority_level - 1
        return priority - 1

    @classmethod
    def from_config(cls, config: Any, spec: ModelSpec) -> BatchingPolicy:
        """Read `config.dynamic_batching` (which must be set). Raises ConfigError."""
        name = spec.name
        db = config.dynamic_batching
        max_batch = int(config.max_batch_size)
        if max_batch < 0:
            raise ConfigError(f"model '{name}': max_batch_size must be >= 0, got {max_batch}")

        preferred = sorted(set(int(s) for s in db.preferred_batch_size))
        for size in preferred:
            if max_batch == 0:
                raise ConfigError(
                    f"model '{name}': dynamic_batching preferred_batch_size {size} needs "
                    f"max_batch_size > 0 (the model has no batch dimension)"
                )
            if size < 1 or size > max_batch:
                raise ConfigError(
                    f"model '{name}': dynamic_batching preferred_batch_size {size} must be in "
                    f"[1, max_batch_size={max_batch}]"
                )

        levels = int(db.priority_levels)
        default_level = int(db.default_priority_level)
        if levels == 0:
            if default_level not in (0, 1):
                raise ConfigError(
                    f"model '{name}': dynamic_batching default_priority_level {default_level} "
                    f"needs priority_levels >= {default_level}"
                )
            levels, default_level = 1, 1
        elif not 1 <= default_level <= levels:
            raise ConfigError(
                f"model '{name}': dynamic_batching default_priority_level must be in "
                f"[1, priority_levels={levels}], got {default_level}"
            )
        if levels > 1024:
            # Each level owns a queue; a huge count is a typo, not a plan.
            raise ConfigError(
                f"model '{name}': dynamic_batching priority_levels must be <= 1024, got {levels}"
            )

        default_policy = _queue_policy(
            name,
            "default_queue_policy",
            db.default_queue_policy if db.HasField("default_queue_policy") else None,
        )
        overrides: dict[int, QueuePolicy] = {}
        for level, message in db.priority_queue_policy.items():
            if not 1 <= int(level) <= levels:
                raise ConfigError(
                    f"model '{name}': dynamic_batching priority_queue_policy key {level} must be "
                    f"a priority level in [1, {levels}]"
                )
            overrides[int(level)] = _queue_policy(name, f"priority_queue_policy[{level}]", message)

        return cls(
            max_batch_size=max(1, max_batch),
            preferred_batch_sizes=tuple(preferred),
            max_queue_delay_ns=int(db.max_queue_delay_microseconds) * 1000,
            preserve_ordering=bool(db.preserve_ordering),
            priority_levels=levels,
            default_priority_level=default_level,
            queue_policies=tuple(overrides.get(lv, default_policy) for lv in range(1, levels + 1)),
            mode=_mode(name, config.parameters),
            equal_shape_inputs=frozenset(s.name for s in spec.inputs if -1 in s.dims)
            if spec.batching
            else frozenset(),
        )


def _queue_policy(model: str, where: str, message: Any | None) -> QueuePolicy:
    if message is None:
        return QueuePolicy(max_queue_size=DEFAULT_MAX_QUEUE_SIZE)
    size = int(message.max_queue_size)  # uint32: never negative
    action_value = int(message.timeout_action)
    try:
        action = TimeoutAction(action_value)
    except ValueError:
        raise ConfigError(
            f"model '{model}': dynamic_batching {where}.timeout_action {action_value} is not "
            f"REJECT (0) or DELAY (1)"
        ) from None
    return QueuePolicy(
        max_queue_size=size or DEFAULT_MAX_QUEUE_SIZE,
        default_timeout_us=int(message.default_timeout_microseconds),
        allow_timeout_override=bool(message.allow_timeout_override),
        timeout_action=action,
    )


def _mode(model: str, parameters: Mapping[str, Any]) -> BatchingMode:
    raw = {k: v.string_value for k, v in parameters.items()}
    try:
        return BatchingMode(table.read(raw, BATCHING_MODE_PARAMETER, BatchingMode.FIXED.value))
    except ConfigError as exc:
        raise ConfigError(f"model '{model}': {exc}") from None
