"""Read an ONNX model's declared inputs and outputs without loading its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from pipeserve.errors import ModelLoadError
from pipeserve.tensors import triton_from_ort_type

# onnx TensorProto element type -> onnxruntime-style type string, so tensors.py keeps one table.
_ONNX_TO_ORT: dict[int, str] = {
    onnx.TensorProto.BOOL: "tensor(bool)",
    onnx.TensorProto.UINT8: "tensor(uint8)",
    onnx.TensorProto.UINT16: "tensor(uint16)",
    onnx.TensorProto.UINT32: "tensor(uint32)",
    onnx.TensorProto.UINT64: "tensor(uint64)",
    onnx.TensorProto.INT8: "tensor(int8)",
    onnx.TensorProto.INT16: "tensor(int16)",
    onnx.TensorProto.INT32: "tensor(int32)",
    onnx.TensorProto.INT64: "tensor(int64)",
    onnx.TensorProto.FLOAT16: "tensor(float16)",
    onnx.TensorProto.FLOAT: "tensor(float)",
    onnx.TensorProto.DOUBLE: "tensor(double)",
    onnx.TensorProto.BFLOAT16: "tensor(bfloat16)",
    onnx.TensorProto.STRING: "tensor(string)",
}


@dataclass(frozen=True, slots=True)
class GraphTensor:
    name: str
    datatype: str  # Triton name
    shape: tuple[int, ...]  # -1 for symbolic or unknown dimensions


@dataclass(frozen=True, slots=True)
class GraphIO:
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]
    # Graph inputs that an initializer gives a default value: a config may list them as inputs
    # (usually `optional`) that a request may override, as Triton's ONNX backend allows; they
    # are not auto-completed into a config.
    overridable: tuple[GraphTensor, ...] = ()

    def supports_batching(self) -> bool:
        """Triton's rule: every input and output has a variable first dimension."""
        tensors = self.inputs + self.outputs
        return bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)


def model_file(path: Path) -> Path:
    """`model.onnx` may be a file or a folder holding `model.onnx` plus external weight files."""
    return path / "model.onnx" if path.is_dir() else path


def read_graph_io(path: Path) -> GraphIO:
    """Inputs (those with an initializer apart) and outputs of the ONNX graph at `path`."""
    file = model_file(path)
    try:
        model = onnx.load(str(file), load_external_data=False)
    except FileNotFoundError:
        raise ModelLoadError(f"model file '{file}' does not exist") from None
    except Exception as exc:  # onnx raises DecodeError and others for corrupt files
        raise ModelLoadError(f"failed to parse ONNX model '{file}': {exc}") from None
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    return GraphIO(
        inputs=tuple(_tensor(v, file) for v in graph.input if v.name not in initializers),
        outputs=tuple(_tensor(v, file) for v in graph.output),
        overridable=tuple(_tensor(v, file) for v in graph.input if v.name in initializers),
    )


def _tensor(value: onnx.ValueInfoProto, file: Path) -> GraphTensor:
    if not value.type.HasField("tensor_type"):
        raise ModelLoadError(f"'{file}': '{value.name}' is not a tensor; only tensors are served")
    tensor_type = value.type.tensor_type
    ort_type = _ONNX_TO_ORT.get(tensor_type.elem_type, f"onnx type {tensor_type.elem_type}")
    try:
        datatype = triton_from_ort_type(ort_type)
    except ValueError as exc:
        raise ModelLoadError(f"'{file}': tensor '{value.name}': {exc}") from None
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
    return GraphTensor(value.name, datatype, shape)
