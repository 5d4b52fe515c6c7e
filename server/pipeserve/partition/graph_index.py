"""An index over one ONNX graph for the partitioner: producers, consumers, outer-scope inputs of
subgraph nodes, and which nodes are cheap shape arithmetic that may be recomputed per stage.

Exported graphs are not neat layer chains: PyTorch's exporter emits hundreds of Shape / Gather /
Unsqueeze / Concat / Constant nodes, and values such as an attention mask are derived once from a
graph input and read by every layer. Such nodes are *recomputable*: each stage that needs their
value computes it itself instead of receiving it across a cut. The remaining nodes are *compute*
nodes; only they are distributed over stages, in topological order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from pipeserve.errors import ConfigError
from pipeserve.partition.cost import real_inputs

# Ops that are cheap when they only touch shape arithmetic, scalars or graph inputs.
RECOMPUTABLE_OPS = frozenset(
    {
        "Shape",
        "Size",
        "Constant",
        "ConstantOfShape",
        "Identity",
        "Gather",
        "Unsqueeze",
        "Squeeze",
        "Concat",
        "Slice",
        "Cast",
        "CastLike",
        "Reshape",
        "Range",
        "Equal",
        "Less",
        "LessOrEqual",
        "Greater",
        "GreaterOrEqual",
        "Where",
        "Not",
        "And",
        "Or",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Expand",
        "Min",
        "Max",
        "Floor",
        "Ceil",
        "Sqrt",
        "Abs",
        "Mod",
        "Tile",
        "Trilu",
        "ReduceProd",
        "Pow",
        "Transpose",
    }
)
# These read only the shape of their input, so that input may be any tensor.
SHAPE_READERS = frozenset({"Shape", "Size"})
# Initializers up to this many elements count as constants (scalars, axes, shape vectors).
SMALL_CONSTANT_ELEMENTS = 16


@dataclass(frozen=True, slots=True)
class NodeInfo:
    index: int  # position in graph.node
    name: str  # node.name, or op_type + index when the node has none
    op_type: str
    inputs: tuple[str, ...]  # explicit inputs, then outer-scope names its subgraphs read
    outputs: tuple[str, ...]
    recomputable: bool


class GraphIndex:
    """Read-only facts about `model.graph` (the model must be loaded without external data)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.model = model
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.sparse_initializers: dict[str, onnx.SparseTensorProto] = {
            s.values.name: s for s in graph.sparse_initializer
        }
        self.graph_inputs: dict[str, onnx.ValueInfoProto] = {v.name: v for v in real_inputs(graph)}
        self.graph_outputs: tuple[str, ...] = tuple(v.name for v in graph.output)
        self.producer: dict[str, int] = {}
        order = _topological_order(graph)
        self.order: tuple[int, ...] = tuple(order)
        nodes: dict[int, NodeInfo] = {}
        for index in order:
            node = graph.node[index]
            explicit = [name for name in node.input if name]
            implicit = sorted(outer_scope_inputs(node) - set(explicit))
            inputs = tuple(explicit + implicit)
            for name in node.output:
                if name:
                    self.producer[name] = index
            nodes[index] = NodeInfo(
                index=index,
                name=node.name or f"{node.op_type}_{index}",
                op_type=node.op_type,
                inputs=inputs,
                outputs=tuple(name for name in node.output if name),
                recomputable=self._is_recomputable(node, inputs, nodes),
            )
        self.nodes = nodes
        self.compute_nodes: tuple[int, ...] = tuple(i for i in order if not nodes[i].recomputable)
        self._roots: dict[int, frozenset[str]] = {}
        self._home: dict[int, int] = {}

    def is_constant(self, name: str) -> bool:
        tensor = self.initializers.get(name)
        return tensor is not None and math.prod(tensor.dims) <= SMALL_CONSTANT_ELEMENTS

    def is_initializer(self, name: str) -> bool:
        return name in self.initializers or name in self.sparse_initializers

    def _is_recomputable(
        self, node: onnx.NodeProto, inputs: tuple[str, ...], done: dict[int, NodeInfo]
    ) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type not in RECOMPUTABLE_OPS:
            return False
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            return False
        if node.op_type in SHAPE_READERS:
            return True
        if inputs and all(self.is_initializer(name) for name in inputs):
            # A function of weights only (the exporter's Identity over a shared parameter):
            # each stage that reads it includes the weight instead of receiving a copy.
            return True
        for name in inputs:
            if name in self.graph_inputs or self.is_constant(name):
                continue
            producer = self.producer.get(name)
            if producer is None or not done[producer].recomputable:
                return False
        return True

    def shape_roots(self, index: int) -> frozenset[str]:
        """Compute-node outputs whose shapes a recomputable node (transitively) reads: the values
        a stage must hold to recompute it."""
        cached = self._roots.get(index)
        if cached is not None:
            return cached
        roots: set[str] = set()
        for name in self.nodes[index].inputs:
            producer = self.producer.get(name)
            if producer is None:
                continue
            if self.nodes[producer].recomputable:
                roots |= self.shape_roots(producer)
            else:
                roots.add(name)
        result = frozenset(roots)
        self._roots[index] = result
        return result

    def home_stage(self, index: int, stage_of: dict[int, int]) -> int:
        """The first stage where a recomputable node can run: after every compute node it
        depends on. Cached, so call with one `stage_of` per index."""
        cached = self._home.get(index)
        if cached is not None:
            return cached
        home = 0
        for name in self.nodes[index].inputs:
            producer = self.producer.get(name)
            if producer is None:
                continue
            if self.nodes[producer].recomputable:
                home = max(home, self.home_stage(producer, stage_of))
            else:
                home = max(home, stage_of[producer])
        self._home[index] = home
        return home


def outer_scope_inputs(node: onnx.NodeProto) -> set[str]:
    """Names read inside a node's subgraphs (If/Loop/Scan bodies, at any depth) that are not
    defined there: the node's implicit inputs from the enclosing graph."""
    names: set[str] = set()
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            names |= _free_names(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            for graph in attribute.graphs:
                names |= _free_names(graph)
    return names


def _free_names(graph: onnx.GraphProto) -> set[str]:
    defined = {v.name for v in graph.input}
    defined |= {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name)
        used |= outer_scope_inputs(node)
        defined.update(node.output)
    used.update(v.name for v in graph.output)
    return used - defined


def _topological_order(graph: onnx.GraphProto) -> list[int]:
    """Node indices in an order where every producer precedes its consumers, keeping the file's
    order where it is already valid (ONNX requires it; a few tools do not honour that)."""
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    available |= {s.values.name for s in graph.sparse_initializer}
    available.add("")
    produced_by: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            produced_by[name] = index
    needs = []
    for node in graph.node:
        wanted = set(node.input) | outer_scope_inputs(node)
        needs.append({n for n in wanted if n not in available and n in produced_by})
    order: list[int] = []
    placed = [False] * len(graph.node)
    remaining = len(graph.node)
    defined = set(available)
    while remaining:
        progressed = False
        for index, node in enumerate(graph.node):
            if placed[index] or not needs[index] <= defined:
                continue
            placed[index] = True
            order.append(index)
            defined.update(node.output)
            remaining -= 1
            progressed = True
        if not progressed:
            stuck = next(graph.node[i] for i in range(len(placed)) if not placed[i])
            raise ConfigError(
                f"graph has a cycle or an undefined input at node '{stuck.name or stuck.op_type}'"
            )
    return order
