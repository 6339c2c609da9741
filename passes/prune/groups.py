"""Channel groups: the sets of tensor dimensions that must be pruned together.

Every axis of every tensor is a *dim* `(value, axis)`. Op rules (a table keyed by op type) say
which dims are the same channels (a union-find joins them), which constants must be sliced along
with them, and which dims are *sources* (a weight's output channels define them, so removing a
channel removes real work). A union-find class is a channel group. A group is prunable when it has
a source and nothing in it is frozen; a dim is frozen when the analysis cannot prove that removing
channels there is safe (unknown op, graph input/output, an unsupported reshape, ...), and the
reason is kept for the report.

Concat is the one op whose output channels are not a group of their own: its output dim is
*derived* from the input groups at offsets, so its kept channels follow theirs (a derived class
that also has a source is frozen, parts included).

Layout conventions: NCHW activations (channel axis 1), Conv weights OIHW, ConvTranspose weights
(I, O/g, k...), Gemm weights [N, K] when transB=1 else [K, N], MatMul weights [K, N].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ir import Graph, Node, Value

__all__ = ["Dim", "Action", "ChannelGroup", "GroupAnalysis", "analyze_groups"]

Dim = tuple[int, int]  # (id(value), axis)


@dataclass
class Action:
    """Slice constant `value` along `axis` by the kept channels of the group (each channel owns
    `span` consecutive entries, for features flattened from C x H x W)."""
    value: Value
    axis: int
    span: int = 1
    role: str = "param"  # "source" (defines the channels), "sink" (reads them) or "param"
    node: Node | None = None


@dataclass
class ChannelGroup:
    index: int
    size: int
    dims: list[tuple[Value, int]] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    derived_from: list[tuple["ChannelGroup", int, int]] = field(default_factory=list)
    depthwise: list[Node] = field(default_factory=list)
    reshapes: list[Node] = field(default_factory=list)  # flatten-like Reshapes to rewrite

    @property
    def sources(self) -> list[Action]:
        return [a for a in self.actions if a.role == "source"]

    @property
    def prunable(self) -> bool:
        return bool(self.sources) and not self.frozen and not self.derived_from

    def describe(self) -> dict:
        members = sorted({f"{a.node.name if a.node else a.value.name}:{a.role}"
                          for a in self.actions})
        return {"group": self.index, "channels": self.size, "prunable": self.prunable,
                "frozen": sorted(set(self.frozen)), "members": members,
                "derived": bool(self.derived_from)}


class GroupAnalysis:
    """Union-find over dims plus the per-dim actions and freeze reasons."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.parent: dict[Dim, Dim] = {}
        self.values: dict[int, Value] = {}
        self.actions: dict[Dim, list[Action]] = {}
        self.frozen: dict[Dim, list[str]] = {}
        self.concats: list[tuple[Dim, list[tuple[Dim, int, int]]]] = []
        self.depthwise: dict[Dim, list[Node]] = {}
        self.reshapes: dict[Dim, list[Node]] = {}

    # -- union-find ------------------------------------------------------------------------------
    def dim(self, value: Value, axis: int) -> Dim:
        key = (id(value), axis % len(value.shape))
        self.values[id(value)] = value
        self.parent.setdefault(key, key)
        return key

    def find(self, key: Dim) -> Dim:
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a: Dim, b: Dim) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def act(self, key: Dim, action: Action) -> None:
        self.actions.setdefault(key, []).append(action)

    def freeze(self, value: Value, reason: str, axes=None) -> None:
        if value.shape is None:
            return
        for axis in (range(len(value.shape)) if axes is None else axes):
            self.frozen.setdefault(self.dim(value, axis), []).append(reason)

    # -- groups ----------------------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        by_root: dict[Dim, ChannelGroup] = {}
        for key in self.parent:
            root = self.find(key)
            value = self.values[key[0]]
            group = by_root.get(root)
            if group is None:
                group = by_root[root] = ChannelGroup(len(by_root), int(value.shape[key[1]]))
            group.dims.append((value, key[1]))
            group.actions.extend(self.actions.get(key, []))
            group.frozen.extend(self.frozen.get(key, []))
            group.depthwise.extend(self.depthwise.get(key, []))
            group.reshapes.extend(self.reshapes.get(key, []))
        for out_dim, parts in self.concats:
            derived = by_root[self.find(out_dim)]
            for part_dim, offset, length in parts:
                derived.derived_from.append((by_root[self.find(part_dim)], offset, length))
        for group in by_root.values():  # a derived group with its own source cannot be pruned
            if group.derived_from and group.sources:
                group.frozen.append("Concat output also defined by a weight")
            if group.derived_from and group.frozen:
                for part, _, _ in group.derived_from:
                    part.frozen.append("feeds a Concat whose output is frozen")
        return [g for g in by_root.values() if g.actions or g.derived_from]


# -- op rules --------------------------------------------------------------------------------------
def _const(value: Value | None) -> bool:
    return value is not None and value.is_constant


def _same_axis(analysis: GroupAnalysis, node: Node) -> None:
    """Elementwise unary ops, activations, pooling: every axis passes through."""
    data, out = node.input(0), node.output
    for axis in range(len(out.shape)):
        analysis.union(analysis.dim(data, axis), analysis.dim(out, axis))


def _channel_only(analysis: GroupAnalysis, node: Node) -> None:
    """Ops that keep channel axis 1 but change others (pooling, Resize, spatial Pad)."""
    data, out = node.input(0), node.output
    analysis.union(analysis.dim(data, 1), analysis.dim(out, 1))
    analysis.freeze(data, f"{node.op_type} {node.name}", [0] + list(range(2, len(data.shape))))


def _broadcast(analysis: GroupAnalysis, node: Node) -> None:
    """Binary/variadic elementwise ops: equal-sized aligned axes couple; constants are sliced."""
    out = node.output
    rank = len(out.shape)
    for operand in node.inputs:
        if operand is None:
            continue
        offset = rank - len(operand.shape)
        for axis, size in enumerate(operand.shape):
            out_axis = axis + offset
            if size == 1 and out.shape[out_axis] != 1:
                continue  # broadcast along this axis: no per-channel coupling
            if operand.is_constant:
                analysis.act(analysis.dim(out, out_axis), Action(operand, axis, node=node))
            else:
                analysis.union(analysis.dim(operand, axis), analysis.dim(out, out_axis))


def _conv(analysis: GroupAnalysis, node: Node) -> None:
    data, weight, bias, out = node.input(0), node.input(1), node.input(2), node.output
    if not _const(weight) or (bias is not None and not _const(bias)):
        analysis.freeze(data, f"Conv {node.name} with non-constant weights")
        analysis.freeze(out, f"Conv {node.name} with non-constant weights")
        return
    group = node.attr("group", 1)
    out_dim = analysis.dim(out, 1)
    if group == 1:
        analysis.act(analysis.dim(data, 1), Action(weight, 1, role="sink", node=node))
        analysis.act(out_dim, Action(weight, 0, role="source", node=node))
    elif group == data.shape[1] == out.shape[1] and weight.shape[1] == 1:
        # Depthwise: channel c of the output reads only channel c of the input.
        analysis.union(analysis.dim(data, 1), out_dim)
        analysis.act(out_dim, Action(weight, 0, node=node))
        analysis.depthwise.setdefault(out_dim, []).append(node)
    else:
        analysis.freeze(data, f"grouped Conv {node.name} (group={group})", [1])
        analysis.freeze(out, f"grouped Conv {node.name} (group={group})", [1])
    if bias is not None:
        analysis.act(out_dim, Action(bias, 0, node=node))


def _conv_transpose(analysis: GroupAnalysis, node: Node) -> None:
    data, weight, bias, out = node.input(0), node.input(1), node.input(2), node.output
    if node.attr("group", 1) != 1 or not _const(weight) or (bias is not None and not _const(bias)):
        analysis.freeze(data, f"ConvTranspose {node.name} (grouped or non-constant)", [1])
        analysis.freeze(out, f"ConvTranspose {node.name} (grouped or non-constant)", [1])
        return
    analysis.act(analysis.dim(data, 1), Action(weight, 0, role="sink", node=node))
    analysis.act(analysis.dim(out, 1), Action(weight, 1, role="source", node=node))
    if bias is not None:
        analysis.act(analysis.dim(out, 1), Action(bias, 0, node=node))


def _gemm(analysis: GroupAnalysis, node: Node) -> None:
    data, weight, bias, out = node.input(0), node.input(1), node.input(2), node.output
    if node.attr("transA", 0) or not _const(weight) or (bias is not None and not _const(bias)):
        analysis.freeze(data, f"Gemm {node.name} (transA or non-constant weight)")
        analysis.freeze(out, f"Gemm {node.name} (transA or non-constant weight)")
        return
    trans_b = node.attr("transB", 0)
    analysis.act(analysis.dim(data, 1), Action(weight, 1 if trans_b else 0, role="sink", node=node))
    analysis.act(analysis.dim(out, 1), Action(weight, 0 if trans_b else 1, role="source", node=node))
    if bias is not None:
        if bias.shape and bias.shape[-1] == out.shape[1] and bias.const.size == out.shape[1]:
            analysis.act(analysis.dim(out, 1), Action(bias, len(bias.shape) - 1, node=node))
        elif bias.const.size != 1:
            analysis.freeze(out, f"Gemm {node.name} bias of shape {list(bias.shape)}", [1])
    analysis.freeze(data, f"Gemm {node.name} rows", [0])
    analysis.freeze(out, f"Gemm {node.name} rows", [0])


def _matmul(analysis: GroupAnalysis, node: Node) -> None:
    data, weight, out = node.input(0), node.input(1), node.output
    if not _const(weight) or len(weight.shape) != 2 or _const(data):
        analysis.freeze(data, f"MatMul {node.name} without a constant 2-D weight")
        analysis.freeze(out, f"MatMul {node.name} without a constant 2-D weight")
        return
    analysis.act(analysis.dim(data, -1), Action(weight, 0, role="sink", node=node))
    analysis.act(analysis.dim(out, -1), Action(weight, 1, role="source", node=node))
    for axis in range(len(out.shape) - 1):  # batch/sequence axes pass through
        analysis.union(analysis.dim(data, axis), analysis.dim(out, axis))


def _batchnorm(analysis: GroupAnalysis, node: Node) -> None:
    _same_axis(analysis, node)
    out_dim = analysis.dim(node.output, 1)
    for param in node.inputs[1:5]:
        if not _const(param) or len(param.shape) != 1:
            analysis.freeze(node.output, f"BatchNormalization {node.name} parameters", [1])
            return
        analysis.act(out_dim, Action(param, 0, node=node))
    for extra in node.outputs[1:]:
        if extra is not None and (extra.uses() or extra.is_graph_output()):
            analysis.freeze(node.output, f"training-mode BatchNormalization {node.name}")


def _instance_norm(analysis: GroupAnalysis, node: Node) -> None:
    _same_axis(analysis, node)
    for param in node.inputs[1:3]:
        analysis.act(analysis.dim(node.output, 1), Action(param, 0, node=node))


def _layer_norm(analysis: GroupAnalysis, node: Node) -> None:
    # Mean and variance run over the normalized axes: removing a channel there changes every
    # other channel's output, so those axes are frozen; leading axes pass through.
    data, out = node.input(0), node.output
    axis = node.attr("axis", -1) % len(data.shape)
    for a in range(axis):
        analysis.union(analysis.dim(data, a), analysis.dim(out, a))
    reason = f"LayerNormalization {node.name} normalizes over this axis"
    analysis.freeze(data, reason, range(axis, len(data.shape)))
    analysis.freeze(out, reason, range(axis, len(out.shape)))


def _flatten(analysis: GroupAnalysis, node: Node) -> None:
    """[N, C, H, W] -> [N, C*H*W]: channel c owns the span [c*HW, (c+1)*HW) of features."""
    data, out = node.input(0), node.output
    axis = node.attr("axis", 1) if node.op_type == "Flatten" else 1
    if axis != 1 or len(out.shape) != 2 or len(data.shape) < 2:
        _freeze_all(analysis, node)
        return
    span = int(np.prod(data.shape[2:])) if len(data.shape) > 2 else 1
    analysis.union(analysis.dim(data, 0), analysis.dim(out, 0))
    if node.op_type == "Reshape":  # its explicit target [N, C*H*W] must follow the new C
        analysis.reshapes.setdefault(analysis.dim(data, 1), []).append(node)
    if span == 1:
        analysis.union(analysis.dim(data, 1), analysis.dim(out, 1))
        return
    # The flattened axis is its own dim; consumers slice it with span, so record them on the
    # channel dim with that span instead of joining the dims.
    analysis.flattened = getattr(analysis, "flattened", {})
    analysis.flattened[analysis.dim(out, 1)] = (analysis.dim(data, 1), span)
    analysis.freeze(data, f"Flatten {node.name} spatial axes", range(2, len(data.shape)))


def _reshape(analysis: GroupAnalysis, node: Node) -> None:
    data, out = node.input(0), node.output
    if len(out.shape) == 2 and out.shape[0] == data.shape[0] and len(data.shape) >= 2:
        _flatten(analysis, node)  # a Flatten written as Reshape([N, -1])
    elif tuple(out.shape) == tuple(data.shape):
        _same_axis(analysis, node)
    else:
        _freeze_all(analysis, node)


def _transpose(analysis: GroupAnalysis, node: Node) -> None:
    data, out = node.input(0), node.output
    perm = node.attr("perm") or list(reversed(range(len(data.shape))))
    for out_axis, in_axis in enumerate(perm):
        analysis.union(analysis.dim(data, in_axis), analysis.dim(out, out_axis))


def _concat(analysis: GroupAnalysis, node: Node) -> None:
    out = node.output
    axis = node.attr("axis") % len(out.shape)
    parts, offset = [], 0
    for operand in node.inputs:
        for a in range(len(out.shape)):
            if a != axis:
                analysis.union(analysis.dim(operand, a), analysis.dim(out, a))
        length = int(operand.shape[axis])
        if operand.is_constant:
            analysis.freeze(out, f"Concat {node.name} with a constant operand", [axis])
        parts.append((analysis.dim(operand, axis), offset, length))
        offset += length
    analysis.concats.append((analysis.dim(out, axis), parts))


def _pad(analysis: GroupAnalysis, node: Node) -> None:
    pads = node.input(1).const if node.input(1) is not None and _const(node.input(1)) \
        else node.attr("pads")
    rank = len(node.output.shape)
    if pads is None or pads[1] != 0 or pads[1 + rank] != 0:
        _freeze_all(analysis, node)
    else:
        _channel_only(analysis, node)


def _freeze_all(analysis: GroupAnalysis, node: Node, reason: str | None = None) -> None:
    reason = reason or f"no channel rule for {node.op_type} ({node.name})"
    for value in [*node.inputs, *node.outputs]:
        if value is not None and value.shape is not None and not value.is_constant:
            analysis.freeze(value, reason)


_UNARY = ("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid",
          "HardSwish", "Tanh", "Softplus", "Softsign", "Clip", "Abs", "Neg", "Exp", "Log", "Sqrt",
          "Reciprocal", "Erf", "Gelu", "Mish", "Identity", "Dropout", "Cast", "Floor", "Ceil",
          "Round", "Sin", "Cos", "Not", "ThresholdedRelu", "Sign", "LRN")
_BINARY = ("Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "Where", "Equal",
           "Greater", "Less", "And", "Or")
_POOL = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize",
         "Upsample", "SpaceToDepth")

RULES = {
    **{op: _same_axis for op in _UNARY},
    **{op: _broadcast for op in _BINARY},
    **{op: _channel_only for op in _POOL},
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul,
    "BatchNormalization": _batchnorm, "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm, "Flatten": _flatten, "Reshape": _reshape,
    "Transpose": _transpose, "Concat": _concat, "Pad": _pad,
}


def analyze_groups(graph: Graph) -> list[ChannelGroup]:
    """Channel groups of a graph with inferred shapes (run shape inference first)."""
    analysis = GroupAnalysis(graph)
    for node in graph.nodes:
        if any(v is not None and v.shape is None and not v.is_constant
               for v in [*node.inputs, node.output]):
            _freeze_all(analysis, node, f"{node.op_type} {node.name}: unknown shapes")
            continue
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None or node.subgraphs():
            _freeze_all(analysis, node)
            continue
        if node.op_type in ("LRN",):  # LRN mixes neighbouring channels
            _freeze_all(analysis, node, f"LRN {node.name} mixes neighbouring channels")
            continue
        if node.op_type in ("Resize", "Upsample") and len(node.output.shape) < 2:
            _freeze_all(analysis, node)
            continue
        rule(analysis, node)
        if node.op_type in ("Dropout", "MaxPool") and len(node.outputs) > 1:
            for extra in node.outputs[1:]:
                if extra is not None and (extra.uses() or extra.is_graph_output()):
                    _freeze_all(analysis, node, f"{node.op_type} {node.name} second output used")
    for value in graph.inputs:
        if value.shape is not None:
            analysis.freeze(value, "graph input")
    for value in graph.outputs:
        if value.shape is not None:
            analysis.freeze(value, "graph output")
    _attach_flattened(analysis)
    return analysis.groups()


def _attach_flattened(analysis: GroupAnalysis) -> None:
    """Move actions recorded on a flattened feature dim onto its channel dim, with the span."""
    for feature_dim, (channel_dim, span) in getattr(analysis, "flattened", {}).items():
        for action in analysis.actions.pop(feature_dim, []):
            action.span = span
            analysis.act(channel_dim, action)
        # Anything else that the flattened dim joined (other tensors) cannot follow the span.
        for key in list(analysis.parent):
            if key != feature_dim and analysis.find(key) == analysis.find(feature_dim):
                analysis.frozen.setdefault(channel_dim, []).append(
                    "flattened features reach an op other than a weight")
                break
        if feature_dim in analysis.frozen:
            analysis.frozen.setdefault(channel_dim, []).extend(analysis.frozen[feature_dim])
