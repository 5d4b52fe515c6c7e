"""Split an ONNX model into contiguous pipeline stages, each a valid ONNX model.

The graph is read without weights (`load_external_data=False`): a stage's initializers are copies
of the original TensorProtos, so external ones keep pointing at the same weight file and offsets
(files over 2 GB included) and no weight is ever read here. Stage k runs the compute nodes
[cut_k, cut_k+1) in topological order plus whatever cheap shape arithmetic it needs (see
graph_index). A value crosses from the stage that produces it to every later stage that reads
it; the executor keeps a per-micro-batch environment of named values, so graph inputs reach every
stage directly and graph outputs produced early are passed through to the end.

Running the stages in order on the same inputs computes the original graph's outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, shape_inference

from pipeserve.errors import ConfigError
from pipeserve.partition import cost as cost_model
from pipeserve.partition.cuts import choose_cuts
from pipeserve.partition.graph_index import GraphIndex
from pipeserve.partition.hints import ESTIMATED_UNIT, PROFILED_UNIT
from pipeserve.progress import ProgressCallback

log = logging.getLogger(__name__)

CostMode = Literal["auto", "profile", "estimate"]
# "auto" profiles only models whose weights fit comfortably in memory for one extra session.
PROFILE_WEIGHT_LIMIT_BYTES = 2 << 30
# What on_progress hears: one phase of four steps (graph read, nodes costed, cuts chosen, stage
# graphs built and checked).
PLAN_PHASE = "planning"
PLAN_STEPS = ("read", "cost", "cut", "build")
# Crossing size assumed for a tensor whose shape could not be inferred.
UNKNOWN_TENSOR_BYTES = 16 << 10


@dataclass(frozen=True, slots=True)
class StagePlan:
    index: int
    nodes: tuple[str, ...]  # compute nodes, in order
    recomputed: tuple[str, ...]  # shape arithmetic this stage computes for itself
    inputs: tuple[str, ...]  # graph inputs and values from earlier stages
    outputs: tuple[str, ...]  # values later stages read, and graph outputs made here
    initializers: tuple[str, ...]
    weight_bytes: int
    est_cost: float
    model: onnx.ModelProto = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class CutPlan:
    """What crosses the boundary after stage `after_stage` (values made at or before it, read
    after it; graph inputs never cross, every stage gets them directly)."""

    after_stage: int
    tensors: tuple[str, ...]
    est_bytes: int  # at the hinted input sizes


@dataclass(frozen=True, slots=True)
class Plan:
    stages: tuple[StagePlan, ...]
    cuts: tuple[CutPlan, ...]
    cost_unit: str  # PROFILED_UNIT, ESTIMATED_UNIT or "units (given)"
    graph_inputs: tuple[str, ...]
    graph_outputs: tuple[str, ...]
    base_dir: Path | None  # where external weight files are found


def load_graph(path: Path) -> onnx.ModelProto:
    """The model's graph and initializer metadata, never its external weights."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ConfigError(f"cannot read ONNX model '{path}': {exc}") from exc


def partition_model(
    path: Path,
    stages: int,
    *,
    cuts: Sequence[str] | None = None,
    cost: CostMode = "auto",
    batch_hint: int = cost_model.DEFAULT_BATCH_HINT,
    dim_hint: int = cost_model.DEFAULT_DIM_HINT,
    on_progress: ProgressCallback | None = None,
) -> Plan:
    """Load `path` without weights and split it into `stages` stages (or at the named `cuts`).
    `on_progress` hears each step (reading, costing, cutting, building the stages)."""
    if on_progress is not None:
        on_progress(PLAN_PHASE, 0, len(PLAN_STEPS), "step")
    model = load_graph(path)
    return partition(
        model,
        stages,
        cuts=cuts,
        cost=cost,
        base_dir=path.parent,
        batch_hint=batch_hint,
        dim_hint=dim_hint,
        on_progress=on_progress,
    )


def partition(
    model: onnx.ModelProto,
    stages: int,
    *,
    cuts: Sequence[str] | None = None,
    cost: CostMode = "auto",
    base_dir: Path | None = None,
    batch_hint: int = cost_model.DEFAULT_BATCH_HINT,
    dim_hint: int = cost_model.DEFAULT_DIM_HINT,
    node_costs: Mapping[int, float] | None = None,
    on_progress: ProgressCallback | None = None,
) -> Plan:
    """Split `model` (loaded without external data). `node_costs` (by node index) overrides
    `cost`; tests use it to place cuts deterministically."""

    def step(done: str) -> None:
        if on_progress is not None:
            on_progress(PLAN_PHASE, PLAN_STEPS.index(done) + 1, len(PLAN_STEPS), "step")

    step("read")
    index = GraphIndex(model)
    compute = index.compute_nodes
    if stages < 1:
        raise ConfigError(f"pipeline needs at least 1 stage, got {stages}")
    if stages > len(compute):
        raise ConfigError(
            f"cannot split into {stages} stages: the graph has only {len(compute)} compute "
            f"node(s) (shape arithmetic is not split); use at most {len(compute)} stages"
        )
    shapes = _crossing_shapes(model, batch_hint, dim_hint)
    unit = "units (given)"
    if node_costs is None:
        node_costs, unit = _node_costs(model, index, cost, base_dir, batch_hint, dim_hint)
    step("cost")
    if cuts is not None:
        positions = _named_cuts(index, cuts, stages)
    else:
        costs = [float(node_costs.get(i, 0.0)) for i in compute]
        crossing = _crossing_bytes(index, shapes)
        positions = choose_cuts(costs, crossing, stages)
    stage_of: dict[int, int] = {}
    bounds = [0, *positions, len(compute)]
    for stage in range(stages):
        for node in compute[bounds[stage] : bounds[stage + 1]]:
            stage_of[node] = stage
    step("cut")
    plan = _build_plan(model, index, stage_of, stages, node_costs, unit, shapes, base_dir)
    step("build")
    return plan


def _node_costs(
    model: onnx.ModelProto,
    index: GraphIndex,
    mode: CostMode,
    base_dir: Path | None,
    batch_hint: int,
    dim_hint: int,
) -> tuple[Mapping[int, float], str]:
    if mode not in ("auto", "profile", "estimate"):
        raise ConfigError(f"unknown cost model '{mode}': expected auto, profile or estimate")
    weights = sum(tensor_bytes(t) for t in index.initializers.values())
    if mode == "profile" or (mode == "auto" and weights <= PROFILE_WEIGHT_LIMIT_BYTES):
        measured = cost_model.profile_node_costs(model, base_dir, batch_hint, dim_hint)
        if measured is not None:
            return measured, PROFILED_UNIT
    return cost_model.estimate_node_costs(model, batch_hint, dim_hint), ESTIMATED_UNIT


def _named_cuts(index: GraphIndex, names: Sequence[str], stages: int) -> list[int]:
    if len(names) != stages - 1:
        raise ConfigError(
            f"pipeline_cuts names {len(names)} tensor(s) but {stages} stages need "
            f"{stages - 1} cut(s)"
        )
    position_of = {node: pos for pos, node in enumerate(index.compute_nodes)}
    positions: list[int] = []
    for name in names:
        producer = index.producer.get(name)
        if producer is None:
            if name in index.graph_inputs or index.is_initializer(name):
                raise ConfigError(
                    f"cut tensor '{name}' is a graph input or initializer; name a tensor "
                    f"produced by a node"
                )
            raise ConfigError(f"cut tensor '{name}' is not in the graph")
        if index.nodes[producer].recomputable:
            raise ConfigError(
                f"cut tensor '{name}' comes from shape arithmetic ({index.nodes[producer].op_type}"
                f" node '{index.nodes[producer].name}'), which every stage recomputes; name a "
                f"tensor produced by a compute node"
            )
        position = position_of[producer] + 1
        if position >= len(index.compute_nodes):
            raise ConfigError(
                f"cut tensor '{name}' is produced by the last compute node; a cut there would "
                f"leave the last stage empty"
            )
        if positions and position <= positions[-1]:
            raise ConfigError(
                f"cut tensors must be listed in graph order, one per stage boundary: "
                f"'{name}' does not come after the previous cut"
            )
        positions.append(position)
    return positions


def _crossing_shapes(
    model: onnx.ModelProto, batch_hint: int, dim_hint: int
) -> dict[str, tuple[int, ...]]:
    """Shapes at the hinted input sizes, for estimating bytes across cuts."""
    return cost_model.inferred_shapes(model, batch_hint, dim_hint)


def _crossing_bytes(index: GraphIndex, shapes: Mapping[str, tuple[int, ...]]) -> list[float]:
    """crossing[j]: bytes of compute-node outputs made before compute position j and read by a
    compute node at or after it (shape arithmetic is recomputed or tiny, so it does not count)."""
    compute = index.compute_nodes
    position_of = {node: pos for pos, node in enumerate(compute)}
    last_use: dict[str, int] = {}
    for pos, node in enumerate(compute):
        for name in index.nodes[node].inputs:
            producer = index.producer.get(name)
            if producer is not None and producer in position_of:
                last_use[name] = max(last_use.get(name, 0), pos)
    delta = [0.0] * (len(compute) + 1)
    elem_types = _elem_types(index.model.graph)
    for name, last in last_use.items():
        first = position_of[index.producer[name]] + 1
        if last >= first:
            size = _value_bytes(name, shapes, elem_types)
            delta[first] += size
            delta[last + 1] -= size
    crossing = [0.0] * (len(compute) + 1)
    running = 0.0
    for pos in range(len(compute) + 1):
        running += delta[pos]
        crossing[pos] = running
    return crossing


def _value_bytes(
    name: str, shapes: Mapping[str, tuple[int, ...]], elem_types: Mapping[str, int]
) -> float:
    shape = shapes.get(name)
    if shape is None:
        return float(UNKNOWN_TENSOR_BYTES)
    itemsize = 4
    elem = elem_types.get(name)
    if elem:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize
    return float(int(np.prod(shape, dtype=np.int64)) * itemsize)


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    return {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.input, *graph.output, *graph.value_info]
        if v.type.HasField("tensor_type")
    }


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Size of an initializer's data without reading it (external data: its declared length)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        for entry in tensor.external_data:
            if entry.key == "length":
                return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        itemsize = 4
    return count * itemsize


class _StageSets:
    """What one stage holds while the plan is being resolved."""

    def __init__(self) -> None:
        self.nodes: set[int] = set()
        self.inputs: set[str] = set()
        self.outputs: set[str] = set()
        self.initializers: set[str] = set()


def _build_plan(
    model: onnx.ModelProto,
    index: GraphIndex,
    stage_of: dict[int, int],
    stages: int,
    node_costs: Mapping[int, float],
    unit: str,
    shapes: Mapping[str, tuple[int, ...]],
    base_dir: Path | None,
) -> Plan:
    sets = [_StageSets() for _ in range(stages)]
    # Values each stage holds without recomputing anything: its own outputs, every graph input,
    # and compute-node outputs its compute nodes read directly (they cross anyway).
    held: list[set[str]] = [set(index.graph_inputs) for _ in range(stages)]
    for node, stage in stage_of.items():
        held[stage].update(index.nodes[node].outputs)
        for name in index.nodes[node].inputs:
            producer = index.producer.get(name)
            if producer is not None and not index.nodes[producer].recomputable:
                held[stage].add(name)

    def need(name: str, stage: int) -> None:
        """Make `name` available inside `stage`."""
        if name in index.graph_inputs:
            sets[stage].inputs.add(name)
            return
        if index.is_initializer(name):
            sets[stage].initializers.add(name)
            return
        producer = index.producer.get(name)
        if producer is None:
            raise ConfigError(f"tensor '{name}' is read but neither produced nor declared")
        info = index.nodes[producer]
        if not info.recomputable:
            source = stage_of[producer]
            if source != stage:
                sets[stage].inputs.add(name)
                sets[source].outputs.add(name)
            return
        if producer in sets[stage].nodes:
            return
        home = index.home_stage(producer, stage_of)
        if home == stage or index.shape_roots(producer) <= held[stage]:
            sets[stage].nodes.add(producer)
            for source_name in info.inputs:
                need(source_name, stage)
        else:
            # Its roots live in an earlier stage only: compute it there once and send it on.
            sets[stage].inputs.add(name)
            sets[home].outputs.add(name)
            need(name, home)

    for node, stage in stage_of.items():
        sets[stage].nodes.add(node)
        for name in index.nodes[node].inputs:
            need(name, stage)
    for name in index.graph_outputs:
        producer = index.producer.get(name)
        if producer is None:
            if index.is_initializer(name):
                need(name, 0)
                sets[0].outputs.add(name)
            continue  # a graph input passed straight through: the executor has it
        stage = (
            stage_of[producer]
            if not index.nodes[producer].recomputable
            else index.home_stage(producer, stage_of)
        )
        need(name, stage)
        sets[stage].outputs.add(name)

    value_info = _value_types(model)
    stage_plans = []
    for stage, held_sets in enumerate(sets):
        stage_model = _stage_model(model, index, stage, held_sets, value_info)
        compute_names = tuple(
            index.nodes[i].name
            for i in index.order
            if i in held_sets.nodes and not index.nodes[i].recomputable
        )
        recomputed = tuple(
            index.nodes[i].name
            for i in index.order
            if i in held_sets.nodes and index.nodes[i].recomputable
        )
        stage_plans.append(
            StagePlan(
                index=stage,
                nodes=compute_names,
                recomputed=recomputed,
                inputs=tuple(i.name for i in stage_model.graph.input),
                outputs=tuple(o.name for o in stage_model.graph.output),
                initializers=tuple(sorted(held_sets.initializers)),
                weight_bytes=sum(_initializer_bytes(index, n) for n in held_sets.initializers),
                est_cost=sum(
                    float(node_costs.get(i, 0.0))
                    for i in held_sets.nodes
                    if not index.nodes[i].recomputable
                ),
                model=stage_model,
            )
        )
    return Plan(
        stages=tuple(stage_plans),
        cuts=_cut_plans(sets, index, stage_of, shapes),
        cost_unit=unit,
        graph_inputs=tuple(index.graph_inputs),
        graph_outputs=index.graph_outputs,
        base_dir=base_dir,
    )


def _initializer_bytes(index: GraphIndex, name: str) -> int:
    tensor = index.initializers.get(name)
    if tensor is not None:
        return tensor_bytes(tensor)
    sparse = index.sparse_initializers[name]
    return tensor_bytes(sparse.values) + tensor_bytes(sparse.indices)


def _cut_plans(
    sets: list[_StageSets],
    index: GraphIndex,
    stage_of: dict[int, int],
    shapes: Mapping[str, tuple[int, ...]],
) -> tuple[CutPlan, ...]:
    made_in: dict[str, int] = {}
    for stage, held in enumerate(sets):
        for name in held.outputs:
            made_in.setdefault(name, stage)
    elem_types = _elem_types(index.model.graph)
    cuts = []
    for boundary in range(len(sets) - 1):
        crossing = sorted(
            {
                name
                for later in sets[boundary + 1 :]
                for name in later.inputs
                if name in made_in and made_in[name] <= boundary
            }
        )
        size = sum(_value_bytes(n, shapes, elem_types) for n in crossing)
        cuts.append(CutPlan(boundary, tuple(crossing), int(size)))
    return tuple(cuts)


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Type and shape of every value: declared, else from ONNX shape inference (symbolic dims
    kept)."""
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception as exc:  # types declared in the model may still suffice
        log.info("shape inference failed (%s); using declared value types only", exc)
        inferred = model
    types: dict[str, onnx.ValueInfoProto] = {}
    for graph in (model.graph, inferred.graph):
        for value in [*graph.value_info, *graph.input, *graph.output]:
            if value.type.WhichOneof("value") is not None:
                types[value.name] = value
    return types


def _typed(name: str, value_info: Mapping[str, onnx.ValueInfoProto]) -> onnx.ValueInfoProto:
    known = value_info.get(name)
    if known is None or not _has_elem_type(known):
        raise ConfigError(
            f"cannot split at tensor '{name}': its type is unknown (ONNX shape inference gave "
            f"none); declare it in the model's value_info or choose other cuts"
        )
    typed = onnx.ValueInfoProto()
    typed.CopyFrom(known)
    return typed


def _has_elem_type(value: onnx.ValueInfoProto) -> bool:
    kind = value.type.WhichOneof("value")
    if kind == "tensor_type":
        return value.type.tensor_type.elem_type != 0
    return kind is not None


def _stage_model(
    model: onnx.ModelProto,
    index: GraphIndex,
    stage: int,
    held: _StageSets,
    value_info: Mapping[str, onnx.ValueInfoProto],
) -> onnx.ModelProto:
    graph = model.graph
    # Graph inputs first in the original order, then received values in a stable order.
    inputs = [index.graph_inputs[n] for n in index.graph_inputs if n in held.inputs]
    inputs += [_typed(n, value_info) for n in sorted(held.inputs - set(index.graph_inputs))]
    originals = {v.name: v for v in graph.output}
    ordered_outputs = [n for n in index.graph_outputs if n in held.outputs]
    ordered_outputs += sorted(held.outputs - set(ordered_outputs))
    outputs = [originals.get(n) or _typed(n, value_info) for n in ordered_outputs]
    nodes = [graph.node[i] for i in index.order if i in held.nodes]
    stage_graph = helper.make_graph(
        nodes,
        f"{graph.name or 'graph'}_stage{stage}",
        inputs,
        outputs,
        initializer=[
            index.initializers[n] for n in sorted(held.initializers) if n in index.initializers
        ],
        sparse_initializer=[
            index.sparse_initializers[n]
            for n in sorted(held.initializers)
            if n in index.sparse_initializers
        ],
    )
    stage_model = helper.make_model(
        stage_graph,
        ir_version=model.ir_version,
        opset_imports=list(model.opset_import),
        producer_name="pipeserve-split",
    )
    stage_model.functions.extend(model.functions)
    helper.set_model_props(stage_model, {"pipeserve.stage": str(stage)})
    try:
        onnx.checker.check_model(_without_external_weights(stage_model))
    except onnx.checker.ValidationError as exc:
        raise ConfigError(f"stage {stage} is not a valid ONNX model: {exc}") from exc
    return stage_model


def _without_external_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for the checker with external initializers turned into typed graph inputs: the
    checker looks for their files relative to the working directory, and a stage model built in
    memory has none."""
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = {t.name for t in external}
    kept = [t for t in copy.graph.initializer if t.name not in names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    copy.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external
    )
    return copy
