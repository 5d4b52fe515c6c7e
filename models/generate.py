"""Regenerate the example models in this folder: `python models/generate.py`.

- add_sub     FP32 [16] x2 -> sum and difference; batching with dynamic_batching (config.pbtxt)
- text_upper  BYTES [-1] -> the same strings upper-cased; no batching (config.pbtxt)
- mlp         FP32 [batch, 64] -> [batch, 10]; no config.pbtxt: auto-completed from the graph
Needs the `onnx` package (a pipeserve dependency). Deterministic: same bytes every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent


def _save(graph: onnx.GraphProto, name: str) -> None:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pipeserve-examples"
    )
    model.ir_version = 10  # onnxruntime 1.31 reads IR <= 13
    onnx.checker.check_model(model)
    target = HERE / name / "1" / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))


def add_sub() -> None:
    shape = ["batch", 16]
    _save(
        helper.make_graph(
            [
                helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
                helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
            ],
            "add_sub",
            [
                helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                for n in ("INPUT0", "INPUT1")
            ],
            [
                helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                for n in ("OUTPUT0", "OUTPUT1")
            ],
        ),
        "add_sub",
    )


def text_upper() -> None:
    node = helper.make_node(
        "StringNormalizer",
        ["TEXT"],
        ["UPPER"],
        case_change_action="UPPER",
        is_case_sensitive=1,
        locale="C.UTF-8",  # present on every glibc system, unlike the default en_US.UTF-8
    )
    _save(
        helper.make_graph(
            [node],
            "text_upper",
            [helper.make_tensor_value_info("TEXT", TensorProto.STRING, ["n"])],
            [helper.make_tensor_value_info("UPPER", TensorProto.STRING, ["n"])],
        ),
        "text_upper",
    )


def mlp() -> None:
    rng = np.random.default_rng(2026)
    layers = [(64, 128), (128, 10)]
    nodes, weights = [], []
    x = "input"
    for i, (fan_in, fan_out) in enumerate(layers):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        weights += [
            numpy_helper.from_array(w, f"W{i}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"B{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"B{i}"], [f"gemm{i}"]))
        x = f"gemm{i}"
        if i + 1 < len(layers):
            nodes.append(helper.make_node("Relu", [x], [f"relu{i}"]))
            x = f"relu{i}"
    nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=-1))
    _save(
        helper.make_graph(
            nodes,
            "mlp",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
            initializer=weights,
        ),
        "mlp",
    )


if __name__ == "__main__":
    add_sub()
    text_upper()
    mlp()
    print(f"example models written under {HERE}")
