"""The consumer layers of a channel group as matrices: weight W [K inputs, N outputs] (MatMul
layout), the design rows X [rows, K] built from the layer's captured input, and the bias.

A group's channels are read by its *sink* layers (MatMul with a constant 2-D weight, Gemm without
transA, Conv with group 1). Unit u of the group owns `span` consecutive rows of W: one row per
FFN unit, head-size rows per attention head, kh*kw rows per conv channel (im2col, OIHW).
The bias (Gemm/Conv input C, or the constant 1-D bias of an Add right after a MatMul) becomes
row K of an augmented weight fed by a constant-1 column, so refits can move it too. When the
(biased) output is then added to another activation of the same shape (a residual connection),
that activation is the consumer's `residual`: a refit may also absorb its drift.

Weights are written back in place (`Value.const`), keeping every other reference to the same
constant (the group actions that later slice it) valid. Layers whose weight or bias is shared
with another node are not supported (their other user would change too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ir import Node, Value

from ..calibration import real_token_rows
from .compensate import _bias_slot
from .groups import Action, ChannelGroup
from .reconstruct import _conv_geometry, im2col

__all__ = ["Consumer", "group_consumers", "linear_consumer", "token_rows", "output_rows"]


@dataclass
class Consumer:
    node: Node
    weight: Value
    span: int                 # rows of W per unit of the group
    bias: Value | None = None
    residual: Value | None = None  # the activation added to the (biased) output, if any

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def matrix(self) -> np.ndarray:
        """W [K, N] in float64, with the bias as row K when there is one."""
        weight = self.weight.const.astype(np.float64)
        if self.node.op_type == "Conv":
            weight = weight.reshape(weight.shape[0], -1).T
        elif self.node.op_type == "Gemm" and self.node.attr("transB", 0):
            weight = weight.T
        if self.bias is not None:
            weight = np.vstack([weight, np.broadcast_to(self.bias.const.astype(np.float64),
                                                        (weight.shape[1],))[None]])
        return weight

    def write(self, matrix: np.ndarray) -> None:
        """Store an augmented [K(+1), N] matrix back into the weight (and bias) in place."""
        if self.bias is not None:
            self.bias.const = matrix[-1].reshape(self.bias.shape).astype(self.bias.dtype)
            matrix = matrix[:-1]
        shape, dtype = self.weight.shape, self.weight.dtype
        if self.node.op_type == "Conv":
            matrix = matrix.T.reshape(shape)
        elif self.node.op_type == "Gemm" and self.node.attr("transB", 0):
            matrix = matrix.T
        self.weight.const = np.ascontiguousarray(matrix).astype(dtype)

    def rows(self, activation: np.ndarray, token_mask: np.ndarray | None) -> np.ndarray:
        """Design rows [rows, K] of one captured input; padding tokens (mask 0) left out."""
        if self.node.op_type == "Conv":
            rows = im2col(activation, *_conv_geometry(self.node, self.weight.const))
        else:
            activation = real_token_rows(activation, token_mask)
            rows = activation.reshape(-1, activation.shape[-1])
        return rows


def output_rows(activation: np.ndarray, token_mask: np.ndarray | None,
                conv: bool) -> np.ndarray:
    """Rows [rows, N] of an activation shaped like the consumer's output, in the order of the
    design rows (im2col positions for Conv, tokens otherwise)."""
    if conv:
        return np.moveaxis(activation, 1, -1).reshape(-1, activation.shape[1])
    activation = real_token_rows(activation, token_mask)
    return activation.reshape(-1, activation.shape[-1])


def _residual_of(node: Node, bias_owner: Node | None) -> Value | None:
    """The other operand of the Add that reads the consumer's (biased) output, when it is a
    same-shape activation (y = x + f(x)); else None."""
    output = (bias_owner or node).output
    readers = output.consumers()
    if len(readers) != 1 or readers[0].op_type != "Add" or output.is_graph_output():
        return None
    add = readers[0]
    other = add.input(1) if add.input(0) is output else add.input(0)
    if other is None or other.is_constant or other.shape != output.shape:
        return None
    return other


def _single_user(value: Value | None) -> bool:
    return value is None or len(value.uses()) == 1


def _bias_of(node: Node) -> Value | None:
    if node.op_type in ("Conv", "Gemm"):
        bias = node.input(2)
        if bias is not None and node.op_type == "Gemm" and node.attr("beta", 1.0) != 1.0:
            return None
        return bias if bias is not None and bias.is_constant else None
    slot = _bias_slot(None, node)  # a constant 1-D bias Add that reads only this MatMul
    return slot[0].input(slot[1]) if slot is not None else None


def _consumer(action: Action) -> Consumer | None:
    node = action.node
    weight = action.value
    if node is None or node.input(1) is not weight or not weight.is_constant:
        return None
    if node.op_type == "MatMul" and weight.const.ndim == 2 and action.axis == 0:
        span = action.span
    elif node.op_type == "Gemm" and not node.attr("transA", 0) and node.attr("alpha", 1.0) == 1.0:
        span = action.span
    elif (node.op_type == "Conv" and node.attr("group", 1) == 1 and weight.const.ndim == 4
          and node.attr("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET") and action.axis == 1):
        span = action.span * int(np.prod(weight.shape[2:]))
    else:
        return None
    bias = _bias_of(node)
    if not _single_user(weight):
        return None
    if bias is not None and (not _single_user(bias) or bias.const.size != weight_outputs(node)):
        bias = None
    owner = None
    if bias is not None and node.op_type == "MatMul":
        owner = _bias_slot(None, node)[0]
    return Consumer(node, weight, span, bias, _residual_of(node, owner))


def linear_consumer(node: Node) -> Consumer | None:
    """Any supported linear layer (not tied to a group) as a Consumer with span 1."""
    weight = node.input(1) if len(node.inputs) > 1 else None
    data = node.input(0)
    if weight is None or not weight.is_constant or data is None or data.is_constant:
        return None
    axis = {"MatMul": 0, "Conv": 1}.get(node.op_type)
    if node.op_type == "Gemm":
        axis = 1 if node.attr("transB", 0) else 0
    if axis is None:
        return None
    return _consumer(Action(weight, axis, role="sink", node=node))


def weight_outputs(node: Node) -> int:
    shape = node.input(1).shape
    if node.op_type == "Conv":
        return int(shape[0])
    if node.op_type == "Gemm" and node.attr("transB", 0):
        return int(shape[0])
    return int(shape[-1])


def group_consumers(group: ChannelGroup) -> list[Consumer] | None:
    """Every sink of the group as a Consumer, or None when one of them is not supported (the
    group then cannot be pruned by reconstruction error)."""
    sinks = [a for a in group.actions if a.role == "sink"]
    consumers = [_consumer(a) for a in sinks]
    if not consumers or any(c is None for c in consumers):
        return None
    for consumer in consumers:
        if consumer.weight.const.size and consumer.matrix().shape[0] - consumer.has_bias \
                != group.size * consumer.span:
            return None
    return consumers


def token_rows(feed: dict, mask_name: str | None) -> np.ndarray | None:
    """The [batch, seq] mask of real tokens of a feed, or None."""
    if mask_name is None or mask_name not in feed:
        return None
    return np.asarray(feed[mask_name]) != 0
