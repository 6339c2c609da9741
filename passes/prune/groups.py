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

A dim may also be an *expansion* of another: Flatten [N,C,H,W] -> [N,C*H*W] makes each channel own
a span of H*W features, and the attention head split Reshape [B,S,384] -> [B,S,12,32] makes each
head own a span of 32 hidden units (the merge Reshape after attention does the reverse). The
expanded class is merged into the unit's group with every action's span multiplied, so Q/K/V
columns, their biases and the output projection rows are sliced a whole head at a time.

Layout conventions: NCHW activations (channel axis 1), Conv weights OIHW, ConvTranspose weights
(I, O/g, k...), Gemm weights [N, K] when transB=1 else [K, N], MatMul weights [K, N].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ir import Graph, Node, Value

__all__ = ["Dim", "Action", "ChannelGroup", "GroupAnalysis", "analyze_groups"]

Dim = tuple[int, int]  # (id(value), axis)
HEAD_SIZE_REASON = "head size of "  # the freeze reason of a head split's head-size axis


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
    # Reshapes whose target must follow the kept count: (node, output axis written as -1).
    reshapes: list[tuple[Node, int]] = field(default_factory=list)
    kind: str = "channels"  # "heads" for attention heads (one unit = a span of hidden units)
    unit_span: int = 1      # hidden units per unit (head size), for rounding kept counts
    # Heads only: the entries inside each head may also be reordered, each head by its own order
    # (see GroupAnalysis._mark_reorderable_heads); the classes of its head-size axes.
    within_heads_reorderable: bool = False
    head_size_classes: list["ChannelGroup"] = field(default_factory=list)

    @property
    def sources(self) -> list[Action]:
        return [a for a in self.actions if a.role == "source"]

    @property
    def prunable(self) -> bool:
        return bool(self.sources) and not self.frozen and not self.derived_from

    def describe(self) -> dict:
        members = sorted({f"{a.node.name if a.node else a.value.name}:{a.role}"
                          for a in self.actions})
        info = {"group": self.index, "kind": self.kind, "channels": self.size,
                "prunable": self.prunable, "frozen": sorted(set(self.frozen)),
                "members": members, "derived": bool(self.derived_from)}
        if self.kind == "heads":
            info.update(head_size=self.unit_span,
                        entries_reorderable=self.within_heads_reorderable)
        return info


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
        self.reshapes: dict[Dim, list[tuple[Node, int]]] = {}
        self.expansions: list[tuple[Dim, Dim, int, str]] = []  # (feature, unit, span, kind)
        self.head_sizes: list[tuple[Dim, Dim]] = []  # (heads dim, head-size dim) of head reshapes

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

    def expand(self, feature: Dim, unit: Dim, span: int, kind: str = "channels") -> None:
        """`feature` is `unit` with each unit owning `span` consecutive entries."""
        self.expansions.append((feature, unit, span, kind))

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
        self._merge_expansions(by_root)
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
        self._mark_reorderable_heads(by_root)
        return [g for g in by_root.values() if g.actions or g.derived_from]

    def _mark_reorderable_heads(self, by_root: dict[Dim, ChannelGroup]) -> None:
        """A heads group may reorder the entries inside each head (V's columns and the output
        projection's rows of one head, say) when its head-size axes are touched by nothing but
        the head reshapes and ops that treat every head alike: no constant acts on them, no
        other freeze, no Concat, and every tensor that carries them also carries this group's
        heads axis (so a per-head order never meets a tensor without heads)."""
        concat_roots = {self.find(out) for out, _ in self.concats} | {
            self.find(part) for _, parts in self.concats for part, _, _ in parts}
        inner: dict[int, tuple[ChannelGroup, set[Dim]]] = {}
        owners: dict[Dim, set[int]] = {}
        for heads, size in self.head_sizes:
            group, root = by_root.get(self.find(heads)), self.find(size)
            if group is None:
                continue
            inner.setdefault(id(group), (group, set()))[1].add(root)
            owners.setdefault(root, set()).add(id(group))
        for group, roots in inner.values():
            carried = {id(value) for value, _ in group.dims}
            group.within_heads_reorderable = all(
                root in by_root and root not in concat_roots and owners[root] == {id(group)}
                and self._only_head_sized(by_root[root], carried) for root in roots)
            if group.within_heads_reorderable:
                group.head_size_classes = [by_root[root] for root in sorted(roots)]

    @staticmethod
    def _only_head_sized(size_class: ChannelGroup, carried: set[int]) -> bool:
        return (not size_class.actions and not size_class.derived_from
                and not size_class.depthwise and not size_class.reshapes
                and all(reason.startswith(HEAD_SIZE_REASON) for reason in size_class.frozen)
                and all(id(value) in carried for value, _ in size_class.dims))

    def _merge_expansions(self, by_root: dict[Dim, ChannelGroup]) -> None:
        """Fold each expanded feature class into its unit group (actions get the span)."""
        merged: dict[Dim, Dim] = {}
        for feature, unit, span, kind in self.expansions:
            feature_root, unit_root = self.find(feature), self.find(unit)
            target = by_root[unit_root]
            if kind == "heads":
                target.kind, target.unit_span = "heads", span
            if feature_root == unit_root:
                target.frozen.append("expanded dim meets its own units")
                continue
            if feature_root in merged:
                if merged[feature_root] != unit_root:
                    target.frozen.append("features expanded from two different unit dims")
                    by_root[merged[feature_root]].frozen.append(
                        "features expanded from two different unit dims")
                continue
            merged[feature_root] = unit_root
            source = by_root.pop(feature_root)
            for action in source.actions:
                action.span *= span
                target.actions.append(action)
            target.frozen.extend(source.frozen)
            target.dims.extend(source.dims)
            if source.depthwise or source.reshapes:
                target.frozen.append("expanded features reach a depthwise Conv or Reshape")
            if any(self.find(d) == feature_root for d, _ in self.concats) or any(
                    self.find(p) == feature_root for _, parts in self.concats for p, _, _ in parts):
                target.frozen.append("expanded features reach a Concat")


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
        _freeze_all(analysis, node, f"{node.op_type} {node.name}: not a flatten of axes 1..")
        return
    span = int(np.prod(data.shape[2:])) if len(data.shape) > 2 else 1
    analysis.union(analysis.dim(data, 0), analysis.dim(out, 0))
    if node.op_type == "Reshape":  # its explicit target [N, C*H*W] must follow the new C
        analysis.reshapes.setdefault(analysis.dim(data, 1), []).append((node, 1))
    if span == 1:
        analysis.union(analysis.dim(data, 1), analysis.dim(out, 1))
        return
    analysis.expand(analysis.dim(out, 1), analysis.dim(data, 1), span)
    analysis.freeze(data, f"Flatten {node.name} spatial axes", range(2, len(data.shape)))


def _head_reshape(analysis: GroupAnalysis, node: Node, grouped: Value, flat: Value) -> None:
    """A Reshape between [..., H*D] (flat) and [..., H, D] (grouped, attention heads): head h
    owns the span [h*D, (h+1)*D) of the flat axis, so heads are pruned whole."""
    rank = len(grouped.shape)
    for axis in range(rank - 2):
        analysis.union(analysis.dim(node.input(0), axis), analysis.dim(node.output, axis))
    heads = analysis.dim(grouped, rank - 2)
    analysis.expand(analysis.dim(flat, -1), heads, int(grouped.shape[-1]), "heads")
    analysis.reshapes.setdefault(heads, []).append((node, rank - 2))
    analysis.freeze(grouped, f"{HEAD_SIZE_REASON}{node.name}", [rank - 1])
    analysis.head_sizes.append((heads, analysis.dim(grouped, rank - 1)))


def _split_last_axis(analysis: GroupAnalysis, node: Node) -> None:
    """[..., H*D] -> [..., H, D]: splitting the hidden axis into heads."""
    _head_reshape(analysis, node, grouped=node.output, flat=node.input(0))


def _merge_last_axes(analysis: GroupAnalysis, node: Node) -> None:
    """[..., H, D] -> [..., H*D]: merging heads back (the reverse of _split_last_axis)."""
    _head_reshape(analysis, node, grouped=node.input(0), flat=node.output)


def _reshape(analysis: GroupAnalysis, node: Node) -> None:
    data, out = node.input(0), node.output
    ins, outs = tuple(data.shape), tuple(out.shape)
    if len(outs) == 2 and outs[0] == ins[0] and len(ins) >= 2:
        _flatten(analysis, node)  # a Flatten written as Reshape([N, -1])
    elif ins == outs:
        _same_axis(analysis, node)
    elif len(outs) == len(ins) + 1 and outs[:-2] == ins[:-1] and outs[-2] * outs[-1] == ins[-1]:
        _split_last_axis(analysis, node)
    elif len(ins) == len(outs) + 1 and ins[:-2] == outs[:-1] and ins[-2] * ins[-1] == outs[-1]:
        _merge_last_axes(analysis, node)
    else:
        _freeze_all(analysis, node, f"Reshape {node.name} {list(ins)} -> {list(outs)} "
                                    "is not a flatten or a head split/merge")


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


def _matmul_dynamic(analysis: GroupAnalysis, node: Node) -> None:
    """MatMul of two activations (attention): batch axes couple with broadcasting, the
    contraction axis couples a[-1] with b[-2], rows follow a and columns follow b."""
    a, b, out = node.input(0), node.input(1), node.output
    rank = len(out.shape)
    if len(a.shape) < 2 or len(b.shape) < 2:
        _freeze_all(analysis, node, f"MatMul {node.name} with a 1-D operand")
        return
    for operand in (a, b):
        offset = rank - len(operand.shape)
        for axis in range(len(operand.shape) - 2):
            if operand.shape[axis] == out.shape[axis + offset]:
                analysis.union(analysis.dim(operand, axis), analysis.dim(out, axis + offset))
    analysis.union(analysis.dim(a, -1), analysis.dim(b, -2))
    analysis.union(analysis.dim(a, -2), analysis.dim(out, -2))
    analysis.union(analysis.dim(b, -1), analysis.dim(out, -1))


def _matmul_any(analysis: GroupAnalysis, node: Node) -> None:
    if _const(node.input(1)) and not _const(node.input(0)):
        _matmul(analysis, node)
    elif not _const(node.input(0)) and not _const(node.input(1)):
        _matmul_dynamic(analysis, node)
    else:
        _freeze_all(analysis, node, f"MatMul {node.name} with a constant left operand")


def _reduce_axis_frozen(analysis: GroupAnalysis, node: Node) -> None:
    """Softmax/LogSoftmax/Hardmax-free ops that normalize along one axis: the other axes pass
    through; that axis cannot lose entries (it would change every other entry)."""
    _same_axis(analysis, node)
    axis = node.attr("axis", -1) % len(node.output.shape)
    analysis.freeze(node.output, f"{node.op_type} {node.name} normalizes along this axis", [axis])


def _reduce(analysis: GroupAnalysis, node: Node) -> None:
    """ReduceMean/Sum/Max...: kept axes pass through, reduced axes are frozen."""
    data, out = node.input(0), node.output
    axes = node.attr("axes")
    if axes is None and node.input(1) is not None:
        if not _const(node.input(1)):
            _freeze_all(analysis, node, f"{node.op_type} {node.name} with dynamic axes")
            return
        axes = node.input(1).const.tolist()
    rank = len(data.shape)
    reduced = set(range(rank)) if not axes else {a % rank for a in axes}
    keep = node.attr("keepdims", 1)
    out_axis = 0
    for axis in range(rank):
        if axis in reduced:
            analysis.freeze(data, f"{node.op_type} {node.name} reduces this axis", [axis])
            out_axis += 1 if keep else 0
            continue
        analysis.union(analysis.dim(data, axis), analysis.dim(out, out_axis))
        out_axis += 1


def _slice_like(analysis: GroupAnalysis, node: Node) -> None:
    """Slice/Split: axes whose size is unchanged pass through; a partially taken axis is frozen
    (its kept channels would have to be remapped into the slice, which is not implemented)."""
    data = node.input(0)
    for out in node.outputs:
        if out is None or out.shape is None or len(out.shape) != len(data.shape):
            continue
        for axis, (before, after) in enumerate(zip(data.shape, out.shape)):
            if before == after:
                analysis.union(analysis.dim(data, axis), analysis.dim(out, axis))
            else:
                reason = f"{node.op_type} {node.name} takes part of this axis"
                analysis.freeze(data, reason, [axis])
                analysis.freeze(out, reason, [axis])


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
_REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1",
           "ReduceProd", "ReduceSumSquare", "ReduceLogSumExp")
_POOL = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize",
         "Upsample", "SpaceToDepth")

RULES = {
    **{op: _same_axis for op in _UNARY},
    **{op: _broadcast for op in _BINARY},
    **{op: _channel_only for op in _POOL},
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul_any,
    "Softmax": _reduce_axis_frozen, "LogSoftmax": _reduce_axis_frozen,
    **{op: _reduce for op in _REDUCE}, "Slice": _slice_like, "Split": _slice_like,
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
    return analysis.groups()
