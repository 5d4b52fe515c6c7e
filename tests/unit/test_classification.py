"""classification.py: Triton's "value:index:label" strings, its sort, batching and limits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeserve.classification import (
    MAX_ELEMENTS,
    check_requested,
    class_count,
    classify,
    read_labels,
)
from pipeserve.errors import ConfigError, InvalidInputError

LABELS = ("cat", "dog", "", "fish")


def test_top_classes_with_labels_and_cpp_float_text() -> None:
    scores = np.array([0.1, 0.7, 0.15, 0.05], dtype=np.float32)
    got = classify(scores, 3, LABELS, batching=False)
    # std::to_string(float) prints %f; index 2 has an empty label: no ":label".
    assert got.tolist() == [b"0.700000:1:dog", b"0.150000:2", b"0.100000:0:cat"]


def test_batching_model_classifies_each_batch_entry() -> None:
    scores = np.array([[1, 5, 3], [9, 2, 4]], dtype=np.int32)
    got = classify(scores, 2, (), batching=True)
    assert got.shape == (2, 2)
    assert got.tolist() == [[b"5:1", b"3:2"], [b"9:0", b"4:2"]]


def test_count_above_the_classes_gives_every_class_and_extra_dims_flatten() -> None:
    scores = np.arange(6, dtype=np.float64).reshape(1, 2, 3)
    got = classify(scores, 10, (), batching=True)
    assert got.shape == (1, 6)
    assert got[0, 0] == b"5.000000:5"
    # Not batching: the whole tensor is one entry.
    assert classify(scores, 2, (), batching=False).shape == (2,)


def test_ties_keep_index_order_and_unsigned_values_sort_right() -> None:
    scores = np.array([3, 250, 250, 0], dtype=np.uint8)
    assert classify(scores, 4, (), batching=False).tolist() == [b"250:1", b"250:2", b"3:0", b"0:3"]


def test_labels_beyond_the_file_are_left_out() -> None:
    got = classify(np.array([0.0, 0.0, 0.0, 0.0, 1.0], np.float32), 1, LABELS, batching=False)
    assert got.tolist() == [b"1.000000:4"]


def test_class_count_is_an_int64_above_zero() -> None:
    assert class_count(5) == 5
    for bad, message in ((0, "expected >= 0"), (-2, "expected >= 0"), ("3", "int64_param")):
        with pytest.raises(InvalidInputError, match=message):
            class_count(bad)
    with pytest.raises(InvalidInputError, match="int64_param"):
        class_count(True)


def test_only_numeric_outputs_can_be_classified() -> None:
    check_requested({"y": 3}, {"y": "FP32"}, "m")
    check_requested({"unknown": 3}, {"y": "FP32"}, "m")  # the request check names it
    for datatype in ("BYTES", "BOOL", "FP16", "BF16"):
        with pytest.raises(InvalidInputError, match=f"unsupported type '{datatype}'"):
            check_requested({"y": 3}, {"y": datatype}, "m")


def test_an_entry_is_bounded() -> None:
    with pytest.raises(InvalidInputError, match="classification output tensor too large"):
        classify(np.zeros(MAX_ELEMENTS + 1, np.float32), 1, (), batching=False)


def test_read_labels_one_per_line(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("cat\ndog\n\nfish\n")
    assert read_labels(tmp_path, "labels.txt", "y") == LABELS
    with pytest.raises(ConfigError, match="cannot read label_filename 'missing.txt'"):
        read_labels(tmp_path, "missing.txt", "y")
    with pytest.raises(ConfigError, match="leaves the model folder"):
        read_labels(tmp_path, "../outside.txt", "y")
