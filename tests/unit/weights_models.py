"""Small real ONNX graphs for the weights/pack tests, with the features packing must survive:
MatMul weights onnxruntime pre-packs, small biases that stay inline, two initializers with equal
bytes, a float16 weight, an If whose branches hold their own initializers, a Constant node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
OPSET = 20
DIM = 64


def transformer_like(layers: int = 2, dim: int = DIM, seed: int = 0) -> onnx.ModelProto:
    """x[batch, seq, dim] -> y[batch, seq, dim]."""
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, shape: list[int], dtype: type = np.float32) -> str:
        data: np.ndarray = (rng.standard_normal(shape) * 0.05).astype(dtype)
        inits.append(numpy_helper.from_array(data, name))
        return name

    x = "x"
    for layer in range(layers):
        p = f"l{layer}_"
        nodes += [
            helper.make_node(
                "LayerNormalization",
                [x, weight(p + "g", [dim]), weight(p + "b", [dim])],
                [p + "h"],
                axis=-1,
            ),
            helper.make_node("MatMul", [p + "h", weight(p + "w1", [dim, 4 * dim])], [p + "f"]),
            helper.make_node("Add", [p + "f", weight(p + "b1", [4 * dim])], [p + "fb"]),
            helper.make_node("Relu", [p + "fb"], [p + "r"]),
            helper.make_node("MatMul", [p + "r", weight(p + "w2", [4 * dim, dim])], [p + "o"]),
            helper.make_node("Add", [x, p + "o"], [p + "out"]),
        ]
        x = p + "out"
    # Two initializers with the same bytes: the packer stores them once.
    tied = (rng.standard_normal([dim, dim]) * 0.05).astype(np.float32)
    inits += [numpy_helper.from_array(tied, "tie_a"), numpy_helper.from_array(tied, "tie_b")]
    nodes += [
        helper.make_node("MatMul", [x, "tie_a"], ["ta"]),
        helper.make_node("MatMul", ["ta", "tie_b"], ["tb"]),
    ]
    # A float16 weight, cast up.
    nodes += [
        helper.make_node(
            "Cast", [weight("half", [dim, dim], np.float16)], ["half32"], to=TensorProto.FLOAT
        ),
        helper.make_node("MatMul", ["tb", "half32"], ["th"]),
    ]
    # An If whose branches own initializers (subgraph weights).
    nodes += [
        helper.make_node("ReduceSum", ["th"], ["total"], keepdims=0),
        helper.make_node(
            "Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32))
        ),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node(
            "If",
            ["positive"],
            ["branch"],
            then_branch=_branch("then", "th", dim, rng),
            else_branch=_branch("else", "th", dim, rng),
        ),
        helper.make_node("Add", ["th", "branch"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "transformer_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _branch(name: str, source: str, dim: int, rng: np.random.Generator) -> onnx.GraphProto:
    w = numpy_helper.from_array(
        (rng.standard_normal([dim, dim]) * 0.05).astype(np.float32), f"{name}_w"
    )
    return helper.make_graph(
        [helper.make_node("MatMul", [source, f"{name}_w"], [f"{name}_out"])],
        f"{name}_branch",
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
        [w],
    )


def save_external(model: onnx.ModelProto, path: Path, *, one_file: bool = True) -> Path:
    """Save with ONNX external data (tensors >= 1 KiB): one file `<name>.data`, or one file per
    tensor. Returns the graph path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=one_file,
        location=path.name + ".data" if one_file else None,
        size_threshold=1024,
    )
    return path


def save_inline(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def sample_input(seed: int = 1, batch: int = 2, seq: int = 5, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, seq, dim)).astype(np.float32)
