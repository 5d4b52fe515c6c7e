"""The table of `parameters` keys a model's config.pbtxt may set: key, type, default, validation
and meaning, in one place. Loading reads values through it (`Parameter.read`), errors name the
key and what was expected from it, README's "Model parameters" table is generated from it
(`markdown_table`, kept in step by a test), and a key it does not know is reported at load with
the nearest known one (`unknown_keys`), not silently ignored.

Values are strings (Triton's `ModelParameter.string_value`). The onnxruntime keys are those of
Triton's onnxruntime backend that have an onnxruntime equivalent, with the backend's meaning
(triton-inference-server/onnxruntime_backend, README "Model Config Options" and the deprecated
CUDA keys). A leaf: imports nothing of pipeserve but errors.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeserve.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Parameter:
    key: str
    type: str  # as README shows it
    default: str  # as README shows it
    meaning: str
    # raw (stripped, non-empty) -> value; raises ValueError with what is wrong (after the key).
    parse: Callable[[str], Any]

    def read(self, parameters: Mapping[str, str], default: Any = None) -> Any:
        """The parsed value, or `default` when the key is absent or empty. Raises ConfigError
        naming the key, the value and what was expected."""
        raw = parameters.get(self.key, "").strip()
        if not raw:
            return default
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"parameter '{self.key}' {exc}") from None


# ---- parsers: each raises ValueError("<what is wrong>, expected ...") --------------------------


def _count(raw: str) -> int:
    """An integer >= 0 (0: the default)."""
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"must be an integer, got '{raw}'") from None
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"is '{raw}': expected a positive integer") from None
    if value < 1:
        raise ValueError(f"is {value}: expected a positive integer")
    return value


_TRUE = ("true", "1", "on", "yes")
_FALSE = ("false", "0", "off", "no")


def _bool(raw: str) -> bool:
    # Triton's ParseBoolValue: true/false, 1/0, on/off, yes/no, any case.
    value = raw.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"must be 'true' or 'false' (or 1 / 0), got '{raw}'")


def _choice(*choices: str, style: str = "comma") -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.lower()
        if value in choices:
            return value
        if style == "comma":
            listed = ", ".join(f"'{c}'" for c in choices)
            raise ValueError(f"is '{raw}', expected one of {listed}")
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
        raise ValueError(f"is '{raw}': expected {listed}")

    return parse


def _code(codes: Mapping[str, str]) -> Callable[[str], str]:
    """One of Triton's numeric codes, mapped to onnxruntime's value for it."""

    def parse(raw: str) -> str:
        if raw in codes:
            return codes[raw]
        listed = ", ".join(f"{k} ({v})" for k, v in codes.items())
        raise ValueError(f"is '{raw}', expected one of {listed}")

    return parse


_ARENA_DEVICES = re.compile(r"^(cpu:0|gpu:\d+)(;(cpu:0|gpu:\d+))*$")


def _arena_devices(raw: str) -> str:
    if not _ARENA_DEVICES.match(raw):
        raise ValueError(f"is '{raw}', expected devices like 'cpu:0' or 'cpu:0;gpu:0'")
    return raw


def _text(raw: str) -> str:
    return raw


# Triton's codes -> onnxruntime's CUDA provider option values.
CUDNN_CONV_ALGO_SEARCH = {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"}
ARENA_EXTEND_STRATEGY = {"0": "kNextPowerOfTwo", "1": "kSameAsRequested"}
EXECUTION_MODE = {"0": "sequential", "1": "parallel"}

PARAMETERS: tuple[Parameter, ...] = (
    # -- onnxruntime session (Triton's onnxruntime backend keys) --
    Parameter(
        "intra_op_thread_count",
        "integer >= 0",
        "the cores less one, split between the CPU sessions; all cores for a model whose "
        "batch-1 run takes >= 1.5 ms at load (1 on CUDA)",
        "onnxruntime threads within a node, per session (0: the default)",
        _count,
    ),
    Parameter(
        "inter_op_thread_count",
        "integer >= 0",
        "1",
        "onnxruntime threads across nodes, per session; used with execution_mode 1",
        _count,
    ),
    Parameter(
        "execution_mode",
        "0 or 1",
        "0",
        "0: run nodes sequentially; 1: in parallel (graphs with many branches)",
        _code(EXECUTION_MODE),
    ),
    Parameter(
        "enable_mem_arena",
        "bool",
        "onnxruntime's (on)",
        "the CPU memory arena",
        _bool,
    ),
    Parameter(
        "enable_mem_pattern",
        "bool",
        "onnxruntime's (on)",
        "memory pattern planning (pre-allocation from the first run's shapes)",
        _bool,
    ),
    Parameter(
        "memory.enable_memory_arena_shrinkage",
        "devices",
        "none",
        "arenas shrunk after every run, e.g. `cpu:0;gpu:0` (an onnxruntime run option)",
        _arena_devices,
    ),
    Parameter(
        "session.use_device_allocator_for_initializers",
        "bool",
        "false",
        "allocate initializers with the device allocator, outside the arena",
        _bool,
    ),
    # -- CUDA execution provider (Triton's deprecated top-level keys; also accepted as
    #    `gpu_execution_accelerator { name: "cuda" }` parameters) --
    Parameter(
        "cudnn_conv_algo_search",
        "0, 1 or 2",
        "0",
        "cuDNN convolution algorithm search: 0 EXHAUSTIVE, 1 HEURISTIC, 2 DEFAULT",
        _code(CUDNN_CONV_ALGO_SEARCH),
    ),
    Parameter(
        "gpu_mem_limit",
        "integer >= 0 (bytes)",
        "no limit",
        "the CUDA provider's memory arena limit",
        _count,
    ),
    Parameter(
        "arena_extend_strategy",
        "0 or 1",
        "0",
        "how the CUDA arena grows: 0 next power of two, 1 same as requested",
        _code(ARENA_EXTEND_STRATEGY),
    ),
    Parameter(
        "do_copy_in_default_stream",
        "bool",
        "true",
        "CUDA copies on the compute stream (false: a separate stream)",
        _bool,
    ),
    # -- pipeserve --
    Parameter(
        "fast_start",
        "bool",
        "true",
        "CPU instances of a model with weight files start without weight pre-packing and are "
        "upgraded in the background (docs/weights.md)",
        _bool,
    ),
    Parameter(
        "batching_mode",
        "`fixed` or `adaptive`",
        "fixed",
        "how the dynamic batcher picks its wait (docs/batching.md)",
        _choice("fixed", "adaptive"),
    ),
    Parameter(
        "pipeline_devices",
        "devices",
        "cpu",
        "one device per pipeline stage, `cpu` or `cuda:N`; one entry is repeated for all",
        _text,
    ),
    Parameter("pipeline_stages", "integer >= 1", "number of devices", "pipeline stages", _positive),
    Parameter(
        "micro_batch_size",
        "integer >= 1",
        "batch / stages, rounded up",
        "rows per micro-batch",
        _positive,
    ),
    Parameter(
        "pipeline_cuts",
        "tensor names",
        "chosen by the partitioner",
        "`t1,t2`: cut after the nodes producing these tensors (stages - 1 names)",
        _text,
    ),
    Parameter(
        "pipeline_threads_per_stage",
        "integer >= 1",
        "the cores less one, split between the CPU stages",
        "intra-op threads of each CPU stage",
        _positive,
    ),
    Parameter(
        "pipeline_in_flight",
        "integer >= 1",
        "stages",
        "batches in the pipeline at once (the model's execution slots)",
        _positive,
    ),
    Parameter(
        "pipeline_cost",
        "`auto`, `profile` or `estimate`",
        "auto",
        "how per-node cost is obtained for the partitioner",
        _choice("auto", "profile", "estimate", style="or"),
    ),
)

BY_KEY: dict[str, Parameter] = {p.key: p for p in PARAMETERS}


def parameter(key: str) -> Parameter:
    return BY_KEY[key]


def read(parameters: Mapping[str, str], key: str, default: Any = None) -> Any:
    """BY_KEY[key].read(parameters, default)."""
    return BY_KEY[key].read(parameters, default)


def unknown_keys(keys: Iterable[str]) -> list[tuple[str, str | None]]:
    """(unknown key, nearest known key or None) for each key the table does not know."""
    known = list(BY_KEY)
    return [
        (key, next(iter(difflib.get_close_matches(key, known, n=1, cutoff=0.6)), None))
        for key in keys
        if key not in BY_KEY
    ]


def validate(parameters: Mapping[str, str]) -> None:
    """Parse every known key once (ConfigError for the first bad one)."""
    for key in parameters:
        if key in BY_KEY:
            BY_KEY[key].read(parameters)


def markdown_table() -> str:
    """README's "Model parameters" table."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{p.key}` | {p.type} | {p.default} | {p.meaning} |" for p in PARAMETERS]
    return "\n".join(rows)
