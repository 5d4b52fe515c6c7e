"""Config honesty: every part of a config.pbtxt is honoured or the load is refused, naming it.

Triton's `ModelConfig` has far more than pipeserve implements. A section pipeserve would skip
silently (a model configured for sequence batching answering `sequence_id` requests statelessly,
a response cache that never caches) is worse than a refusal, so `check_sections` walks the
message the user wrote and refuses the first field that is set but not in `HONOURED`, with
"not supported" and the field's path (`sequence_batching`, `input 'x': reshape`, ...).

A field counts as set when it holds a non-default value; a message field when anything inside it
is set; except members of a `oneof` (`sequence_batching {}` asks for sequence batching even
empty), which count as set when chosen.

`DELEGATED` names the top-level sections another module judges itself (so this walk neither
refuses nor vouches for them): `optimization` belongs to the session builder, which maps what
onnxruntime can do and warns or refuses the rest; `parameters` is a string map whose keys the
runtime reads (unknown keys are passed on, as Triton passes them to its backend).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from pipeserve.errors import ConfigError
from pipeserve.repository.config import ModelConfig

# Top-level sections checked elsewhere (see the module docstring).
DELEGATED = frozenset({"optimization", "parameters"})

# What pipeserve honours. A name maps to None (honoured with everything inside it) or to the
# table for the message it holds (repeated messages: the table of one element).
_Table = dict[str, "_Table | None"]

HONOURED: _Table = {
    "name": None,
    "platform": None,
    "backend": None,
    "version_policy": None,
    "max_batch_size": None,
    "input": {
        "name": None,
        "data_type": None,
        # Informational in Triton too (image clients read it from the config): returned as given.
        "format": None,
        "dims": None,
        "reshape": None,  # runtime/reshape.py
        "allow_ragged_batch": None,
        "optional": None,
    },
    "output": {
        "name": None,
        "data_type": None,
        "dims": None,
        "reshape": None,
        "label_filename": None,  # the classification extension (pipeserve/classification.py)
    },
    "dynamic_batching": None,
    "instance_group": {"name": None, "kind": None, "count": None, "gpus": None},
    "default_model_filename": None,
    "model_warmup": None,  # runtime/warmup.py
    # `decoupled: false` is what pipeserve does; `decoupled: true` (nothing inside is honoured)
    # is refused.
    "model_transaction_policy": {},
}


def check_sections(config: ModelConfig, model: str) -> None:
    """Raise ConfigError naming the first configured field pipeserve does not implement."""
    for path, element in _unhonoured(config, HONOURED, top=True):
        where = f" ({element})" if element else ""
        raise ConfigError(
            f"model '{model}': config section '{path}'{where} is not supported by pipeserve; "
            f"remove it from config.pbtxt"
        )


def _unhonoured(message: Message, table: _Table, top: bool = False, prefix: str = "") -> Any:
    """Yield (dotted path, element label) for every set field not in `table`."""
    for field, value in message.ListFields():
        name = field.name
        if top and name in DELEGATED:
            continue
        path = prefix + name
        if name not in table:
            if field.containing_oneof is not None or _holds_something(field, value):
                yield path, ""
            continue
        inner = table[name]
        if inner is None or field.message_type is None:
            continue
        if field.is_repeated:
            for i, element in enumerate(value):
                label = getattr(element, "name", "") or f"#{i}"
                for sub, _ in _unhonoured(element, inner, prefix=path + "."):
                    yield sub, f"{name} '{label}'"
        else:
            yield from _unhonoured(value, inner, prefix=path + ".")


def _holds_something(field: Any, value: Any) -> bool:
    """ListFields lists repeated fields only when non-empty and scalars only when non-default;
    a message is listed when present, so look inside it."""
    if field.message_type is None or field.is_repeated:
        return True
    return bool(value.ListFields())
