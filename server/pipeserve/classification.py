"""Triton's classification extension: an output requested with `classification: N` comes back as
the top N classes, as BYTES strings "value:index[:label]", instead of the raw tensor.

As in Triton (server's src/classification.cc and the gRPC/HTTP response writers):
- the count is an int64 > 0 (`InferRequestedOutput(name, class_count=N)` sends it);
- labels come from the output's `label_filename` in config.pbtxt, a file in the model folder with
  one label per line; index i gets line i, and no `:label` when there is no (or an empty) line;
- a model that batches classifies each batch entry apart: shape [batch, min(N, classes)];
  otherwise the whole tensor is one entry: shape [min(N, elements)];
- the value is printed as C++'s std::to_string does (`%f` for FP32/FP64, plain integers);
- classes are sorted by value, highest first; equal values keep their index order (Triton's
  std::sort leaves ties in no defined order, so this is one of the orders Triton may give);
- only numeric outputs (not BOOL, FP16, BF16, BYTES), at most 1,000,000 elements per entry.

A leaf module: numpy and the domain errors only, so every front end shares it through the data
plane.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeserve.errors import ConfigError, InvalidInputError

# The request parameter, on a requested output.
PARAMETER = "classification"
# Triton's kMaxClassificationElements: bounds the sort one request can make the server do.
MAX_ELEMENTS = 1_000_000
# Output datatypes a class value can be read from (Triton's list).
CLASSIFIABLE = frozenset(
    ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64")
)


def class_count(value: Any) -> int:
    """The parameter's value as sent (an int; a bool or anything else is refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(
            "invalid value type for 'classification' parameter, expected int64_param"
        )
    if value <= 0:
        raise InvalidInputError("invalid value for 'classification' parameter, expected >= 0")
    return value


def check_requested(
    classification: Mapping[str, int], datatypes: Mapping[str, str], model: str
) -> None:
    """Refuse, before the model runs, a classification of an output whose datatype has no
    class value (Triton finds out after running; the answer is the same)."""
    for name in classification:
        datatype = datatypes.get(name)
        if datatype is not None and datatype not in CLASSIFIABLE:  # unknown: validate() says
            raise InvalidInputError(
                f"class result not available for output due to unsupported type '{datatype}' "
                f"(output '{name}' of model '{model}')"
            )


def read_labels(model_dir: Path, filename: str, output: str) -> tuple[str, ...]:
    """The labels of `output`, one per line of `<model_dir>/<filename>`. Raises ConfigError."""
    path = (model_dir / filename).resolve()
    if not path.is_relative_to(model_dir.resolve()):
        raise ConfigError(f"output '{output}': label_filename '{filename}' leaves the model folder")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"output '{output}': cannot read label_filename '{filename}': {exc}"
        ) from None
    # std::getline: lines split on "\n"; a final newline ends the last line, it adds none.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return tuple(lines)


def classify(array: np.ndarray, count: int, labels: tuple[str, ...], batching: bool) -> np.ndarray:
    """The top `count` classes of `array` as an object array of bytes (a BYTES tensor)."""
    if batching and array.ndim > 0:
        rows = array.reshape(array.shape[0], -1)
        per_row = rows.shape[1]
    else:
        rows = array.reshape(1, -1)
        per_row = rows.shape[1]
    if per_row > MAX_ELEMENTS:
        raise InvalidInputError("classification output tensor too large")
    k = min(count, per_row)
    integer = array.dtype.kind in "iu"
    out = np.empty((rows.shape[0], k), dtype=np.object_)
    for r, row in enumerate(rows):
        for j, index in enumerate(_top(row, k)):
            value = row[index]
            text = f"{int(value)}" if integer else f"{float(value):f}"
            label = labels[index] if index < len(labels) else ""
            entry = f"{text}:{index}:{label}" if label else f"{text}:{index}"
            out[r, j] = entry.encode()
    return out if batching and array.ndim > 0 else out.reshape(k)


def _top(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest values, highest first, equal values in index order.

    A stable ascending sort of the reversed row, read backwards: descending values, and among
    equal ones the higher reversed position (the lower original index) first. Works for unsigned
    types, where negating would wrap."""
    n = row.shape[0]
    order = np.argsort(row[::-1], kind="stable")[::-1][:k]
    return (n - 1) - order
