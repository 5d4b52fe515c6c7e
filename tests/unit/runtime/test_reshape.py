"""runtime/reshape.py: the model's shapes in, the config's dims out (Triton's carry-over rule).

The wrapped runner here is a stand-in that records what it was fed; the served path is tested
end to end in tests/e2e/test_reshape.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from pipeserve.errors import ExecutionError
from pipeserve.inference import ModelSpec, TensorSpec
from pipeserve.runtime.reshape import ReshapingRunner, moved, with_reshapes


class Recording:
    """Answers each output with a fixed array; keeps the shapes it was fed."""

    slot_count = 2
    inline_safe = True

    def __init__(self, answers: dict[str, np.ndarray]) -> None:
        self.answers = answers
        self.fed: dict[str, tuple[int, ...]] = {}
        self.closed = False

    def run(
        self, slot: int, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.fed = {name: a.shape for name, a in inputs.items()}
        return {name: self.answers[name] for name in output_names}

    def close(self) -> None:
        self.closed = True


def spec(batch: int, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> ModelSpec:
    return ModelSpec("m", 1, batch, tuple(inputs), tuple(outputs))


@pytest.mark.parametrize(
    ("shape", "src", "dst", "batch", "want"),
    [
        ((3, 8), (8,), (2, 4), True, (3, 2, 4)),
        ((5, 4), (-1, 4), (-1, 2, 2), False, (5, 2, 2)),
        ((2, 4, 3, 6), (4, -1, 6), (2, 2, -1, 6), True, (2, 2, 2, 3, 6)),
        ((2, 7, 9), (-1, -1), (-1, 1, -1), True, (2, 7, 1, 9)),  # in order
        ((1,), (1,), (), False, ()),  # a scalar in the model
        ((), (), (1, 1), False, (1, 1)),  # and back
        ((4, 1), (1,), (), True, (4,)),
        ((3,), (2, 4), (8,), True, None),  # not the rank it should have
    ],
)
def test_moved_carries_variable_dimensions_over_in_order(shape, src, dst, batch, want):
    assert moved(shape, src, dst, batch) == want


def test_nothing_to_reshape_leaves_the_runner_as_it_is():
    inner = Recording({})
    plain = spec(8, [TensorSpec("x", "FP32", (4,))], [TensorSpec("y", "FP32", (4,))])
    assert with_reshapes(inner, plain) is inner


def test_inputs_reach_the_model_in_its_shape_and_outputs_come_back_in_dims():
    inner = Recording({"y": np.zeros((3, 2, 1), np.float32), "z": np.zeros((3, 5), np.float32)})
    runner = with_reshapes(
        inner,
        spec(
            8,
            [TensorSpec("x", "FP32", (8,), model_dims=(2, 4)), TensorSpec("w", "FP32", (5,))],
            [TensorSpec("y", "FP32", (2,), model_dims=(2, 1)), TensorSpec("z", "FP32", (5,))],
        ),
    )
    assert isinstance(runner, ReshapingRunner)
    assert runner.slot_count == 2 and runner.inline_safe
    x, w = np.arange(24, dtype=np.float32).reshape(3, 8), np.zeros((3, 5), np.float32)
    out = runner.run(0, {"x": x, "w": w}, ["y", "z"])
    assert inner.fed == {"x": (3, 2, 4), "w": (3, 5)}
    assert out["y"].shape == (3, 2) and out["z"].shape == (3, 5)
    runner.close()
    assert inner.closed


def test_an_optional_input_left_out_is_not_reshaped():
    inner = Recording({"y": np.zeros((1, 2), np.float32)})
    runner = with_reshapes(
        inner,
        spec(
            4,
            [TensorSpec("x", "FP32", (4,), optional=True, model_dims=(2, 2))],
            [TensorSpec("y", "FP32", (2,))],
        ),
    )
    runner.run(0, {}, ["y"])
    assert inner.fed == {}


def test_a_scalar_output_gets_its_dims_and_a_tensor_of_unknown_rank_keeps_its_shape():
    outputs = [TensorSpec("y", "FP32", (1,), model_dims=())]
    scalar = with_reshapes(Recording({"y": np.float32(2.0).reshape(())}), spec(0, [], outputs))
    assert scalar.run(0, {}, ["y"])["y"].shape == (1,)
    # A model output of unknown rank (read as a scalar) that came back with a shape: as Triton,
    # its own shape is answered.
    ranked = with_reshapes(Recording({"y": np.zeros((2, 3), np.float32)}), spec(0, [], outputs))
    assert ranked.run(0, {}, ["y"])["y"].shape == (2, 3)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (np.zeros((2, 4), np.float32), r"shape \[2, 4\], which does not have the rank of its "),
        (np.zeros((2, 3, 1), np.float32), r"shape \[2, 3, 1\], which cannot be reshaped to its"),
    ],
)
def test_an_output_that_does_not_fit_its_reshape_fails_the_batch_with_the_reason(answer, message):
    runner = with_reshapes(
        Recording({"y": answer}), spec(4, [], [TensorSpec("y", "FP32", (2,), model_dims=(2, 1))])
    )
    with pytest.raises(ExecutionError, match=message):
        runner.run(0, {}, ["y"])
