"""ModelSpec.validate: the one place requests are checked against a model."""

from __future__ import annotations

import numpy as np
import pytest

from pipeserve.errors import InvalidInputError
from pipeserve.inference import InferRequest, ModelSpec, TensorSpec

SPEC = ModelSpec(
    "m",
    1,
    8,
    (
        TensorSpec("a", "FP32", (4,)),
        TensorSpec("b", "INT64", (-1,)),
        TensorSpec("opt", "FP32", (1,), optional=True),
    ),
    (TensorSpec("y", "FP32", (4,)),),
)


def _req(outputs=(), **arrays) -> InferRequest:
    return InferRequest(
        "m", "", "", dict(arrays), tuple(outputs), datatypes={k: "?" for k in arrays}
    )


def test_valid_request_sets_batch_size():
    request = _req(a=np.zeros((3, 4), np.float32), b=np.zeros((3, 7), np.int64))
    SPEC.validate(request)
    assert request.batch_size == 3


@pytest.mark.parametrize(
    ("arrays", "outputs", "message"),
    [
        (
            {"a": np.zeros((1, 4), np.float32)},
            (),
            "expected number of inputs between 2 and 3 but got 1 inputs for model 'm'. Got input",
        ),
        (
            {"a": np.zeros((1, 4), np.float32), "b": np.zeros((1, 1), np.int64), "c": np.zeros(1)},
            (),
            "unexpected inference input 'c'",
        ),
        (
            {"a": np.zeros((1, 4), np.float64), "b": np.zeros((1, 1), np.int64)},
            (),
            "model 'm' expects FP32",
        ),
        (
            {"a": np.zeros((1, 5), np.float32), "b": np.zeros((1, 1), np.int64)},
            (),
            r"Expected \[-1,4\], got \[1,5\]",
        ),
        (
            {"a": np.zeros((4,), np.float32), "b": np.zeros((1, 1), np.int64)},
            (),
            "unexpected shape for input 'a'",
        ),
        (
            {"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 1), np.int64)},
            (),
            "batch size 3 but other inputs have batch size 2",
        ),
        (
            {"a": np.zeros((9, 4), np.float32), "b": np.zeros((9, 1), np.int64)},
            (),
            "batch-size must be <= 8",
        ),
        (
            {"a": np.zeros((0, 4), np.float32), "b": np.zeros((0, 1), np.int64)},
            (),
            "batch-size must be >= 1",
        ),
        (
            {"a": np.zeros((1, 4), np.float32), "b": np.zeros((1, 1), np.int64)},
            ("z",),
            "unexpected inference output 'z'",
        ),
    ],
)
def test_bad_requests_name_the_tensor(arrays, outputs, message):
    with pytest.raises(InvalidInputError, match=message):
        SPEC.validate(_req(outputs, **arrays))


def test_non_batching_model_checks_full_shape():
    spec = ModelSpec("n", 1, 0, (TensorSpec("x", "INT32", (2, 3)),), ())
    request = _req(x=np.zeros((2, 3), np.int32))
    spec.validate(request)
    assert request.batch_size == 1
    with pytest.raises(InvalidInputError, match=r"Expected \[2,3\], got \[1,2,3\]"):
        spec.validate(_req(x=np.zeros((1, 2, 3), np.int32)))
