"""Small real ONNX graphs for tests, built with onnx.helper (IR version 10, opset 17)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
OPSET = 17

# The inputs and outputs of add_sub() in config.pbtxt form (batching: dims without the batch).
ADD_SUB_IO = """
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] }
]
"""
ADD_SUB_CONFIG = f'name: "add_sub"\nmax_batch_size: 8\n{ADD_SUB_IO}'


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def add_sub(elem: int = TensorProto.FLOAT, dims: list[int | str] | None = None) -> onnx.ModelProto:
    """INPUT0, INPUT1 -> OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (Triton's classic
    example). dims default to ["batch", 16]: a batching model."""
    dims = dims if dims is not None else ["batch", 16]
    inputs = [helper.make_tensor_value_info(n, elem, dims) for n in ("INPUT0", "INPUT1")]
    outputs = [helper.make_tensor_value_info(n, elem, dims) for n in ("OUTPUT0", "OUTPUT1")]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    return _model(helper.make_graph(nodes, "add_sub", inputs, outputs))


def identity(elem: int, dims: list[int | str], name: str = "identity") -> onnx.ModelProto:
    """INPUT0 -> OUTPUT0 unchanged (any datatype, including strings)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        name,
        [helper.make_tensor_value_info("INPUT0", elem, dims)],
        [helper.make_tensor_value_info("OUTPUT0", elem, dims)],
    )
    return _model(graph)


def scale(factor: float, features: int = 4) -> onnx.ModelProto:
    """x[batch, features] -> y = x * factor (a weight), to tell versions apart."""
    weight = numpy_helper.from_array(np.array([factor], dtype=np.float32), "factor")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "factor"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features])],
        initializer=[weight],
    )
    return _model(graph)


def gather(size: int = 4) -> onnx.ModelProto:
    """idx INT64 [batch, 1] -> y = table[idx] with table = [0, 1, ..., size-1] as FP32: an index
    outside [-size, size) makes onnxruntime fail at run time (a model that fails on some data)."""
    table = numpy_helper.from_array(np.arange(size, dtype=np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"])],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        initializer=[table],
    )
    return _model(graph)


def mlp(sizes: tuple[int, ...] = (16, 32, 8), seed: int = 0) -> onnx.ModelProto:
    """x[batch, sizes[0]] -> Gemm/Relu chain -> y[batch, sizes[-1]]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        w = numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32) * 0.1, f"w{i}")
        bias = numpy_helper.from_array(np.zeros(b, dtype=np.float32), f"b{i}")
        inits += [w, bias]
        out = f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out]))
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            out = f"r{i}"
        current = out
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=inits,
    )
    return _model(graph)


def write_model(
    repo: Path, name: str, model: onnx.ModelProto, version: int = 1, config: str | None = None
) -> Path:
    """Lay out `<repo>/<name>/<version>/model.onnx` (+ config.pbtxt when given)."""
    folder = repo / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / str(version) / "model.onnx"))
    if config is not None:
        (folder / "config.pbtxt").write_text(config)
    return folder
