"""Per-node cost for the partitioner: measured by a short onnxruntime profiling run where the
model can be run once, else estimated from FLOPs and bytes after shape inference.

Both work on the graph loaded without weights (`onnx.load(..., load_external_data=False)`); the
profiling session reads external weights from `base_dir` like any stage does.

Costs are keyed by node index in `graph.node`. Only relative sizes matter: the partitioner
balances stages, it does not predict latency.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, shape_inference

from pipeserve.partition import hints

log = logging.getLogger(__name__)

# Unknown symbolic dimensions get these sizes for profiling and estimates: the first dimension is
# usually the batch, the others sequence lengths or spatial sizes.
DEFAULT_BATCH_HINT, DEFAULT_DIM_HINT = hints.DEFAULT_BATCH_HINT, hints.DEFAULT_DIM_HINT


def dim_values(model: onnx.ModelProto, batch_hint: int, dim_hint: int) -> dict[str, int]:
    """Concrete sizes for the symbolic dimensions of the graph inputs (same name, same size)."""
    sizes: dict[str, int] = {}
    for value in real_inputs(model.graph):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                continue
            key = dim.dim_param or f"{value.name}:{axis}"
            sizes.setdefault(key, batch_hint if axis == 0 else dim_hint)
    return sizes


def real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (old IR versions list initializers as inputs)."""
    initialized = {t.name for t in graph.initializer} | {
        s.values.name for s in graph.sparse_initializer
    }
    return [v for v in graph.input if v.name not in initialized]


def profile_node_costs(
    model: onnx.ModelProto,
    base_dir: Path | None,
    batch_hint: int = DEFAULT_BATCH_HINT,
    dim_hint: int = DEFAULT_DIM_HINT,
    runs: int = 3,
) -> dict[int, float] | None:
    """Microseconds per node from onnxruntime's profiler, or None when the model cannot be run
    on synthetic inputs (the caller then estimates).

    Graph optimisations are off so that every profiled kernel is one node of the original graph.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    by_name: dict[str, int] = {}
    for index, node in enumerate(work.graph.node):
        # Profiling events are keyed by node name; give unnamed or duplicate nodes unique names.
        if not node.name or node.name in by_name:
            node.name = f"__pipeserve_node_{index}"
        by_name[node.name] = index
    feeds = synthetic_inputs(work, batch_hint, dim_hint)
    with tempfile.TemporaryDirectory(prefix="pipeserve-profile-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.log_severity_level = 3
        if base_dir is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(base_dir)
            )
        try:
            session = ort.InferenceSession(
                work.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            for _ in range(runs):
                session.run(None, feeds)
            trace = session.end_profiling()
            events = json.loads(Path(trace).read_text())
        except Exception as exc:  # an unrunnable model is not an error here: we estimate instead
            log.info("profiling run failed (%s); estimating node costs from shapes instead", exc)
            return None
    per_run: dict[int, list[float]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        found = by_name.get(event["name"][: -len("_kernel_time")])
        if found is not None:
            per_run.setdefault(found, []).append(float(event.get("dur", 0)))
    if not per_run:
        return None
    # The minimum over runs drops the first run's allocations and scheduler noise.
    costs = {i: 0.0 for i in range(len(model.graph.node))}
    for index, durations in per_run.items():
        costs[index] = min(durations)
    return costs


def synthetic_inputs(
    model: onnx.ModelProto, batch_hint: int, dim_hint: int
) -> dict[str, np.ndarray]:
    """Inputs of the hinted shapes: normal floats; zeros for integers (valid indices) and bools."""
    sizes = dim_values(model, batch_hint, dim_hint)
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for value in real_inputs(model.graph):
        tensor_type = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [
            dim.dim_value
            if dim.HasField("dim_value")
            else sizes[dim.dim_param or f"{value.name}:{axis}"]
            for axis, dim in enumerate(tensor_type.shape.dim)
        ]
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = np.zeros(shape, dtype=dtype)
    return feeds


def estimate_node_costs(
    model: onnx.ModelProto,
    batch_hint: int = DEFAULT_BATCH_HINT,
    dim_hint: int = DEFAULT_DIM_HINT,
) -> dict[int, float]:
    """FLOPs per node (multiply-add = 2), from shapes inferred with the hinted input sizes.
    Nodes whose shapes stay unknown cost the elements of the weights they read."""
    shapes = inferred_shapes(model, batch_hint, dim_hint)
    weights = {t.name: _numel(t.dims) for t in model.graph.initializer}
    costs: dict[int, float] = {}
    for index, node in enumerate(model.graph.node):
        costs[index] = _node_flops(node, shapes, weights)
    return costs


def inferred_shapes(
    model: onnx.ModelProto, batch_hint: int, dim_hint: int
) -> dict[str, tuple[int, ...]]:
    sizes = dim_values(model, batch_hint, dim_hint)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for value in real_inputs(work.graph):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                dim.dim_value = sizes[dim.dim_param or f"{value.name}:{axis}"]
    try:
        inferred = shape_inference.infer_shapes(work, data_prop=True)
    except Exception as exc:  # shapes only refine the estimate; without them weights still count
        log.info("shape inference failed (%s); estimating from weight sizes only", exc)
        inferred = work
    return known_shapes(inferred.graph)


def known_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """Fully known tensor shapes among the graph's inputs, outputs and value_info."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def _node_flops(
    node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]], weights: Mapping[str, int]
) -> float:
    out = shapes.get(node.output[0]) if node.output else None
    ins = [shapes.get(name) for name in node.input]
    if out is not None:
        out_elems = _numel(out)
        if node.op_type == "MatMul" and ins and ins[0]:
            return 2.0 * out_elems * ins[0][-1]
        if node.op_type == "Gemm" and ins and ins[0]:
            transposed = any(a.name == "transA" and a.i for a in node.attribute)
            k = ins[0][0] if transposed else ins[0][-1]
            return 2.0 * out_elems * k
        if node.op_type in ("Conv", "ConvTranspose") and len(ins) > 1 and ins[1]:
            per_output = _numel(ins[1][1:])  # input channels per group x kernel
            return 2.0 * out_elems * per_output
        in_elems = sum(_numel(s) for s in ins if s is not None)
        return float(max(out_elems, in_elems))
    return float(sum(weights.get(name, 0) for name in node.input) * 2 + 1)


def _numel(dims: Iterable[int]) -> int:
    return int(math.prod(int(d) for d in dims))
