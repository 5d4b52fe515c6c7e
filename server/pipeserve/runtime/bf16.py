"""bfloat16 through onnxruntime: its numpy bridge refuses ml_dtypes' bfloat16 dtype, so models
with a bfloat16 input or output run through OrtValues that carry the raw 16-bit patterns."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from pipeserve.tensors import BF16_DTYPE

BF16_TYPE = "tensor(bfloat16)"
_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


def uses_bf16(session: ort.InferenceSession) -> bool:
    return any(arg.type == BF16_TYPE for arg in [*session.get_inputs(), *session.get_outputs()])


def run_with_ort_values(
    session: ort.InferenceSession,
    inputs: Mapping[str, np.ndarray],
    names: list[str],
    run_options: ort.RunOptions | None = None,
) -> dict[str, np.ndarray]:
    feeds = {name: _to_ort_value(array) for name, array in inputs.items()}
    results = session.run_with_ort_values(names, feeds, run_options)
    return {name: _from_ort_value(value) for name, value in zip(names, results, strict=True)}


def _to_ort_value(array: np.ndarray) -> ort.OrtValue:
    if array.dtype == BF16_DTYPE:
        bits = np.ascontiguousarray(array).view(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, _ONNX_BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _from_ort_value(value: ort.OrtValue) -> np.ndarray:
    if value.data_type() != BF16_TYPE:
        return value.numpy()
    shape = tuple(value.shape())
    count = math.prod(shape)
    if count == 0:
        return np.empty(shape, dtype=BF16_DTYPE)
    # Copy the bits out: the OrtValue owns them and is freed when it goes out of scope.
    bits = (ctypes.c_uint16 * count).from_address(value.data_ptr())
    assert BF16_DTYPE is not None  # a bfloat16 output means ml_dtypes is there (onnx needs it)
    return np.frombuffer(bits, dtype=np.uint16).copy().view(BF16_DTYPE).reshape(shape)
