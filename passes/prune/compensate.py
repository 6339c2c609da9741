"""Mean compensation: fold the average contribution of removed channels into the next bias.

A removed input channel c of a consumer layer used to add x_c * W[c, :] to its output. Its
calibration mean E[x_c] times W[c, :] is the part that does not depend on the input; adding it
to the consumer's bias keeps the output's mean where it was (channels after ReLU/GELU have a
clearly non-zero mean, so dropping them shifts every output). Consumers: Conv (the kernel's
spatial sum is used, exact away from padded borders), Gemm, and MatMul followed by a constant
bias Add. Layouts: Conv OIHW, Gemm [N, K] with transB else [K, N], MatMul [K, N].
"""

from __future__ import annotations

import numpy as np

from ir import Graph, Model, Node

from ..calibration import capture
from ..core import PassContext
from .apply import _expand, kept_indices_of
from .groups import ChannelGroup

__all__ = ["mean_shifts", "apply_mean_shifts"]


def _rows_by_input(node: Node, weight: np.ndarray) -> np.ndarray | None:
    """The consumer weight as [input features, outputs], or None when unsupported."""
    if node.op_type == "Conv" and node.attr("group", 1) == 1:
        return weight.sum(axis=tuple(range(2, weight.ndim))).T
    if node.op_type == "Gemm" and not node.attr("transA", 0):
        return weight.T if node.attr("transB", 0) else weight
    if node.op_type == "MatMul" and weight.ndim == 2:
        return weight
    return None


def mean_shifts(model: Model, groups: list[ChannelGroup], kept: dict[int, np.ndarray],
                ctx: PassContext, samples: int) -> dict[int, tuple[Node, np.ndarray]]:
    """Per consumer node: the output shift that the removed input channels contributed on
    average (computed on the unpruned model, before any weight is sliced)."""
    sinks = []
    for group in groups:
        if group.index not in kept:
            continue
        for action in group.actions:
            if action.role == "sink" and action.node is not None:
                rows = _rows_by_input(action.node, action.value.const.astype(np.float64))
                if rows is not None:
                    sinks.append((group, action, rows))
    if not sinks:
        return {}
    names = sorted({a.node.input(0).name for _, a, _ in sinks})
    captured = capture(model, names, ctx.require_calibration(model), limit=samples)
    shifts: dict[int, tuple[Node, np.ndarray]] = {}
    for group, action, rows in sinks:
        node = action.node
        axis = 1 if node.op_type in ("Conv", "Gemm") else -1
        x = np.concatenate([np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
                            for a in captured[node.input(0).name]], axis=1)
        removed = np.setdiff1d(np.arange(rows.shape[0]),
                               _expand(kept_indices_of(group, kept), action.span))
        shift = x[removed].mean(axis=1).astype(np.float64) @ rows[removed]
        shift = shift[_kept_outputs(node, groups, kept, shift.size)]  # its own outputs shrink too
        previous = shifts.get(id(node), (node, 0.0))[1]
        shifts[id(node)] = (node, previous + shift)
    return shifts


def _kept_outputs(node: Node, groups: list[ChannelGroup], kept, size: int) -> np.ndarray:
    for group in groups:
        for action in group.actions:
            if action.role == "source" and action.node is node:
                return _expand(kept_indices_of(group, kept), action.span)
    return np.arange(size)


def _bias_slot(graph: Graph, node: Node):
    """(node, input index) of the constant bias that the node's output gets, or None."""
    if node.op_type in ("Conv", "Gemm"):
        return node, 2
    readers = node.output.consumers()
    if len(readers) == 1 and readers[0].op_type == "Add" and not node.output.is_graph_output():
        add = readers[0]
        index = 1 if add.input(0) is node.output else 0
        bias = add.input(index)
        if bias is not None and bias.is_constant and bias.const.ndim == 1:
            return add, index
    return None


def apply_mean_shifts(graph: Graph, shifts: dict[int, tuple[Node, np.ndarray]]) -> list[str]:
    """Add each shift to its consumer's bias (creating a Conv/Gemm bias when missing)."""
    done = []
    for node, shift in shifts.values():
        slot = _bias_slot(graph, node)
        if slot is None:
            continue
        owner, index = slot
        bias = owner.input(index)
        dtype = node.input(1).dtype if node.input(1).dtype is not None else np.float32
        current = bias.const.astype(np.float64) if bias is not None else 0.0
        if bias is not None and bias.const.size not in (1, shift.size):
            continue
        new = (np.broadcast_to(current, shift.shape) + shift).astype(dtype)
        constant = graph.add_constant(f"{owner.name}_bias_compensated", new)
        if index < len(owner.inputs):
            owner.set_input(index, constant)
        else:  # a Conv/Gemm without bias gets one
            owner.inputs = [*owner.inputs, *([None] * (index - len(owner.inputs))), constant]
        done.append(node.name)
    graph.remove_unused_constants()
    return done
