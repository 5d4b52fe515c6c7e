"""A transformer encoder stack built with onnx.helper, for the pipeline benchmarks (no torch).

x [batch, seq, width] -> `layers` pre-norm blocks (LayerNorm, multi-head attention, LayerNorm,
GELU MLP, residuals) -> y. Random weights, seeded; embedded in the file or written as external
data beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def encoder_stack(
    layers: int = 4, width: int = 256, heads: int = 4, ffn: int = 1024, seed: int = 0
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    head_dim = width // heads
    inits: list[onnx.TensorProto] = []

    def weight(name: str, *shape: int, scale: float = 0.05) -> str:
        inits.append(
            numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)
        )
        return name

    def const(name: str, values: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(values, name))
        return name

    split_shape = const("split_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, width], np.int64))
    scale = const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    half = const("half", np.array(0.5, np.float32))
    one = const("one", np.array(1.0, np.float32))
    root2 = const("root2", np.array(np.sqrt(2.0), np.float32))
    nodes: list[onnx.NodeProto] = []
    x = "x"
    for i in range(layers):
        p = f"l{i}_"

        def node(op: str, inputs: list[str], out: str, p: str = p, **attrs: object) -> str:
            nodes.append(helper.make_node(op, inputs, [p + out], name=p + out, **attrs))
            return p + out

        gamma = const(p + "g1", np.ones(width, np.float32))
        beta = const(p + "b1", np.zeros(width, np.float32))
        h = node("LayerNormalization", [x, gamma, beta], "ln1", axis=-1)
        heads_out = []
        for name in ("q", "k", "v"):
            proj = node("MatMul", [h, weight(p + "w" + name, width, width)], name)
            proj = node("Add", [proj, weight(p + "b" + name, width)], name + "_b")
            proj = node("Reshape", [proj, split_shape], name + "_r")
            perm = [0, 2, 3, 1] if name == "k" else [0, 2, 1, 3]
            heads_out.append(node("Transpose", [proj], name + "_t", perm=perm))
        q, k, v = heads_out
        scores = node("Mul", [node("MatMul", [q, k], "qk"), scale], "qk_s")
        attn = node("MatMul", [node("Softmax", [scores], "sm", axis=-1), v], "av")
        attn = node(
            "Reshape", [node("Transpose", [attn], "av_t", perm=[0, 2, 1, 3]), merge_shape], "av_r"
        )
        attn = node(
            "Add",
            [node("MatMul", [attn, weight(p + "wo", width, width)], "o"), weight(p + "bo", width)],
            "o_b",
        )
        x = node("Add", [x, attn], "res1")
        gamma2 = const(p + "g2", np.ones(width, np.float32))
        beta2 = const(p + "b2", np.zeros(width, np.float32))
        h = node("LayerNormalization", [x, gamma2, beta2], "ln2", axis=-1)
        h = node(
            "Add",
            [node("MatMul", [h, weight(p + "w1", width, ffn)], "fc1"), weight(p + "bf1", ffn)],
            "fc1_b",
        )
        gelu = node(
            "Mul",
            [
                node("Mul", [h, half], "g_half"),
                node(
                    "Add", [node("Erf", [node("Div", [h, root2], "g_div")], "g_erf"), one], "g_one"
                ),
            ],
            "gelu",
        )
        h = node(
            "Add",
            [node("MatMul", [gelu, weight(p + "w2", ffn, width)], "fc2"), weight(p + "bf2", width)],
            "fc2_b",
        )
        x = node("Add", [x, h], "res2")
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(
        nodes,
        "encoder_stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, folder: Path, external: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    if external:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="weights.bin",
            size_threshold=1024,
        )
    else:
        onnx.save(model, str(path))
    return path
