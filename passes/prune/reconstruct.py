"""Least-squares reconstruction of layers whose input channels were pruned (no retraining).

For each consumer layer (Conv with group 1, Gemm, MatMul) that lost input channels, in
topological order: capture its input in the pruned model and its output in the original model on
calibration data, then solve min ||X_pruned W' - (Y_original - b)||^2 (+ a small ridge term for
stability) for the remaining weights. Earlier layers are refitted first, so later ones see the
refitted activations. Convolutions are solved on im2col patches (NCHW, OIHW).

Token models: when the model has an attention-mask input [B, S] and a layer's input starts with
[B, S], rows of padding tokens are left out of the fit; their hidden states are never pooled, and
in short calibration sentences they are half the rows, which otherwise pull the fit their way.
"""

from __future__ import annotations

import numpy as np

from ir import Model, Node

from ..calibration import capture
from ..core import PassContext
from .apply import kept_indices_of
from .groups import ChannelGroup

__all__ = ["reconstruct_consumers", "im2col"]

# Ridge strength relative to the mean diagonal of X^T X. The ridge pulls toward the layer's
# current (pruned) weights, not toward zero: with few calibration rows per input feature (token
# models) an unanchored fit overfits and generalizes worse than no refit at all.
_RIDGE = 1e-2


def im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """Patches of x[N,C,H,W] as rows [N*Ho*Wo, C*kh*kw] in OIHW order of the weight."""
    n, c, h, w = x.shape
    kh, kw = kernel
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_h = (h + pads[0] + pads[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (w + pads[1] + pads[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    cols = np.empty((n, c, kh, kw, out_h, out_w), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilations[0], j * dilations[1]
            cols[:, :, i, j] = padded[:, :, top:top + strides[0] * out_h:strides[0],
                                      left:left + strides[1] * out_w:strides[1]]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * out_h * out_w, c * kh * kw)


def _conv_geometry(node: Node, weight: np.ndarray):
    kernel = weight.shape[2:]
    strides = node.attr("strides", [1, 1])
    pads = node.attr("pads", [0, 0, 0, 0])
    dilations = node.attr("dilations", [1, 1])
    return kernel, strides, pads, dilations


def _design(node: Node, x: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return im2col(x, *_conv_geometry(node, node.input(1).const))
    return x.reshape(-1, x.shape[-1])


def _targets(node: Node, y: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def _solvable(node: Node) -> bool:
    if node.op_type == "Conv":
        return (node.attr("group", 1) == 1 and len(node.input(1).shape) == 4
                and node.attr("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET"))
    if node.op_type == "Gemm":
        return not node.attr("transA", 0) and node.attr("alpha", 1.0) == 1.0
    return node.op_type == "MatMul"


def _output_indices(node: Node, groups: list[ChannelGroup], kept) -> np.ndarray | None:
    for group in groups:
        if any(a.role == "source" and a.node is node for a in group.actions):
            return kept_indices_of(group, kept)
    return None


def reconstruct_consumers(model: Model, reference: Model, groups: list[ChannelGroup],
                          kept: dict[int, np.ndarray], ctx: PassContext, samples: int) -> list[str]:
    """Refit every consumer of a pruned group; returns the names of the refitted layers."""
    consumers: dict[int, Node] = {}
    for group in groups:
        if group.index in kept:
            for action in group.actions:
                if action.role == "sink" and _solvable(action.node):
                    consumers[id(action.node)] = action.node
    order = [n for n in model.graph.nodes if id(n) in consumers]
    if not order:
        return []
    calibration = ctx.require_calibration(model)
    reference_nodes = {n.name: n for n in reference.graph.nodes}
    targets = capture(reference, [reference_nodes[n.name].output.name for n in order
                                  if n.name in reference_nodes], calibration, limit=samples)
    refitted = []
    for node in ctx.progress(order, desc="prune-channels: reconstruct"):
        if node.name not in reference_nodes:
            continue
        x = np.concatenate(capture(model, [node.input(0).name], calibration,
                                   limit=samples)[node.input(0).name]).astype(np.float64)
        y = np.concatenate(targets[reference_nodes[node.name].output.name]).astype(np.float64)
        y = _targets(node, y)
        out_index = _output_indices(node, groups, kept)
        if out_index is not None:
            y = y[:, out_index]
        bias = node.input(2)
        if bias is not None and bias.is_constant and bias.const.size == y.shape[1]:
            y = y - bias.const.reshape(1, -1)
        design = _design(node, x)
        real = _real_token_rows(model, calibration, samples, x.shape)
        if real is not None:
            design, y = design[real], y[real]
        gram = design.T @ design
        strength = _RIDGE * (np.trace(gram) / len(gram) + 1e-12)
        gram += np.eye(len(gram)) * strength
        anchor = _as_solution(node, node.input(1).const.astype(np.float64))
        solution = np.linalg.solve(gram, design.T @ y + strength * anchor)  # [inputs, outputs]
        _set_weight(model, node, solution)
        refitted.append(node.name)
    return refitted


def _real_token_rows(model: Model, calibration, samples: int, shape) -> np.ndarray | None:
    """Boolean row mask of non-padding tokens for a [B, S, features] layer input, else None."""
    masks = [v for v in model.graph.inputs if "mask" in v.name.lower() and v.shape is not None
             and len(v.shape) == 2]
    if not masks or len(shape) != 3:
        return None
    feeds = calibration.feeds(model, samples)
    mask = np.concatenate([feed[masks[0].name] for feed in feeds])
    if mask.shape[0] * mask.shape[1] * shape[2] != np.prod(shape) or mask.shape[1] != shape[1]:
        return None
    rows = mask.reshape(-1) != 0
    return rows if rows.any() else None


def _as_solution(node: Node, weight: np.ndarray) -> np.ndarray:
    """A layer's weight in the [inputs, outputs] layout that the solver uses (see _set_weight)."""
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1).T
    if node.op_type == "Gemm" and node.attr("transB", 0):
        return weight.T
    return weight


def _set_weight(model: Model, node: Node, solution: np.ndarray) -> None:
    weight = node.input(1)
    if node.op_type == "Conv":
        new = solution.T.reshape(weight.shape)
    elif node.op_type == "Gemm" and node.attr("transB", 0):
        new = solution.T
    else:
        new = solution
    replacement = model.graph.add_constant(weight.name + "_refit", new.astype(weight.dtype))
    replacement.meta.update(weight.meta)
    node.set_input(1, replacement)
    model.graph.remove_unused_constants()
