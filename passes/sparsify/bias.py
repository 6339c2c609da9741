"""Adding a per-output-channel shift to a layer's output, folded into its bias when it has one.

`shift` has one entry per row of the layer's [out, in] view (see `layers`): N for MatMul/Gemm,
O for Conv. Where it goes:

| layer                                   | shift lands in                                      |
|-----------------------------------------|-----------------------------------------------------|
| Conv                                    | input 2 (bias [O]), added when absent               |
| Gemm                                    | input C (shift / beta, broadcast), added when absent |
| MatMul read only by an Add of a constant | that constant (a new copy: it may be shared)        |
|   whose last dim is N or 1              |                                                     |
| anything else                           | a new Add after the layer                            |

Constants are never modified in place (another node may read them); a new constant replaces the
input of this layer's node only.
"""

from __future__ import annotations

import numpy as np

from ir import Graph

from .layers import SparsifyTarget

__all__ = ["add_output_shift"]


def add_output_shift(graph: Graph, target: SparsifyTarget, shift: np.ndarray) -> str:
    """Make the layer's output larger by `shift` (per output channel); returns where it went."""
    shift = np.asarray(shift, dtype=np.float64)
    node = target.node
    dtype = target.weight.const.dtype
    if node.op_type == "Conv":
        bias = node.input(2)
        if bias is None:
            node.inputs = list(node.inputs[:2]) + [graph.add_constant(
                f"{target.weight.name}_bias", shift.astype(dtype))]
            return "new conv bias"
        if bias.is_constant:
            node.set_input(2, graph.add_constant(f"{bias.name}_corrected",
                                                 (bias.const + shift).astype(dtype)))
            return "conv bias"
        return _add_after(graph, target, shift.reshape(-1, *([1] * len(target.kernel))))
    if node.op_type == "Gemm":
        beta = float(node.attr("beta", 1.0))
        bias = node.input(2)
        if beta != 0.0 and bias is None:
            node.inputs = list(node.inputs[:2]) + [graph.add_constant(
                f"{target.weight.name}_bias", (shift / beta).astype(dtype))]
            return "new gemm C"
        if beta != 0.0 and bias.is_constant:
            node.set_input(2, graph.add_constant(f"{bias.name}_corrected",
                                                 (bias.const + shift / beta).astype(dtype)))
            return "gemm C"
        return _add_after(graph, target, shift)
    folded = _fold_into_add(graph, target, shift)
    return folded or _add_after(graph, target, shift)


def _fold_into_add(graph: Graph, target: SparsifyTarget, shift: np.ndarray) -> str | None:
    """Fold into the constant of the single Add reading a MatMul's output, when broadcast allows."""
    output = target.node.output
    found = output.sole_add()
    if found is None:
        return None
    add, index = found
    bias = add.input(index)
    if bias is None or not bias.is_constant or bias.const.dtype.kind != "f":
        return None
    rank = len(output.shape) if output.shape is not None else None
    if bias.const.ndim > 0 and bias.const.shape[-1] not in (1, len(shift)):
        return None
    if rank is None or bias.const.ndim > rank:
        return None
    # bias.shape[-1] in (1, N): bias + shift broadcasts to [..., N], which still broadcasts
    # against the MatMul output [..., N] without changing the Add's output shape.
    add.set_input(index, graph.add_constant(f"{bias.name}_corrected",
                                            (bias.const + shift).astype(bias.const.dtype)))
    return "bias add"


def _add_after(graph: Graph, target: SparsifyTarget, shift: np.ndarray) -> str:
    output = target.node.output
    shifted = graph.make_value(f"{output.name}_shifted", dtype=output.dtype, shape=output.shape)
    constant = graph.add_constant(f"{target.weight.name}_shift",
                                  shift.astype(target.weight.const.dtype))
    # Readers (and a graph output's name) move to the shifted value first, then the Add that
    # produces it reads the original output, so the Add is not rewired onto itself.
    output.replace_all_uses_with(shifted)
    graph.add_node("Add", [output, constant], [shifted],
                   name=f"{target.node.name}/mean_correction", after=target.node)
    return "new add"
