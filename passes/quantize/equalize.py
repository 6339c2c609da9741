"""equalize: cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization").

For Conv1 -> Relu -> Conv2 (Relu optional), Relu(x / s) = Relu(x) / s for s > 0, so output
channel i of Conv1 can be divided by s_i (weights and bias) and input channel i of Conv2
multiplied by s_i without changing the float function. Choosing s_i = sqrt(r1_i / r2_i), with
r1_i the range of Conv1's output channel i and r2_i the range of Conv2's input channel i, gives
both the same range sqrt(r1_i r2_i), which evens out per-channel weight ranges: the depthwise
convolutions of MobileNet-style nets, whose channels differ by orders of magnitude, then lose far
less under per-tensor (or even per-channel activation-limited) int8 quantization.

Weight layout: OIHW; Conv2 with `group` g reads input channel i in group i // (C/g) at index
i % (C/g) of axis 1. Chains (Conv1 -> Conv2 -> Conv3) are equalized pair by pair, repeated until
the scales settle.
"""

from __future__ import annotations

import numpy as np

from ir import Graph, Model, Node

from ..core import Option, Pass, PassContext, PassResult, register_pass

__all__ = ["Equalize", "equalize_model", "equalizable_pairs"]

# Activations between the two convolutions that commute with a positive per-channel scale.
_SCALE_EQUIVARIANT = ("Relu",)


def _single_reader(value) -> Node | None:
    if value.is_graph_output():
        return None
    uses = value.uses()
    return uses[0][0] if len(uses) == 1 and uses[0][1] == 0 else None


def _is_conv_with_constants(node: Node) -> bool:
    return (node.op_type == "Conv" and not node.domain and node.input(1) is not None
            and node.input(1).is_constant
            and (node.input(2) is None or node.input(2).is_constant))


def equalizable_pairs(graph: Graph) -> list[tuple[Node, Node]]:
    """(Conv1, Conv2) pairs linked by nothing or by one Relu, each link read only once."""
    pairs = []
    for first in graph.nodes:
        if not _is_conv_with_constants(first):
            continue
        reader = _single_reader(first.output)
        if reader is not None and reader.op_type in _SCALE_EQUIVARIANT:
            reader = _single_reader(reader.output)
        if reader is not None and _is_conv_with_constants(reader):
            pairs.append((first, reader))
    return pairs


def _input_channel_view(weight: np.ndarray, group: int) -> np.ndarray:
    """Conv2's weight as [C_in, ...]: row i holds every weight that reads input channel i."""
    out_channels, per_group = weight.shape[0], weight.shape[1]
    out_per_group = out_channels // group
    grouped = weight.reshape(group, out_per_group, per_group, -1)  # [g, O/g, C/g, k]
    return grouped.transpose(0, 2, 1, 3).reshape(group * per_group, -1)


def _scale_input_channels(weight: np.ndarray, group: int, scales: np.ndarray) -> np.ndarray:
    out_channels, per_group = weight.shape[0], weight.shape[1]
    factors = scales.reshape(group, 1, per_group)  # channel i = g * per_group + j
    shaped = weight.reshape(group, out_channels // group, per_group, -1)
    return (shaped * factors[..., None]).reshape(weight.shape).astype(weight.dtype)


def _replace_constant(graph: Graph, node: Node, index: int, array: np.ndarray) -> None:
    old = node.input(index)
    new = graph.add_constant(f"{old.name}_equalized", array.astype(old.const.dtype))
    if "sparsity" in old.meta:
        new.meta["sparsity"] = dict(old.meta["sparsity"])  # scaling keeps zeros zero
    node.set_input(index, new)


def equalize_pair(graph: Graph, first: Node, second: Node) -> float:
    """Equalize one pair in place; returns max |log s| (0 when already balanced)."""
    w1, w2 = first.input(1).const, second.input(1).const
    group = int(second.attr("group", 1))
    if w2.shape[1] * group != w1.shape[0]:
        return 0.0
    r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
    r2 = np.abs(_input_channel_view(w2, group)).max(axis=1)
    valid = (r1 > 0) & (r2 > 0)
    scales = np.ones_like(r1)
    scales[valid] = np.sqrt(r1[valid] / r2[valid])
    if np.allclose(scales, 1.0, rtol=1e-6):
        return 0.0
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    _replace_constant(graph, first, 1, w1 / scales.reshape(shape1))
    if first.input(2) is not None:
        _replace_constant(graph, first, 2, first.input(2).const / scales)
    _replace_constant(graph, second, 1, _scale_input_channels(w2, group, scales))
    return float(np.abs(np.log(scales)).max())


def equalize_model(model: Model, iterations: int = 20, tolerance: float = 1e-3) -> dict:
    """Equalize every pair until the largest log-scale change is below `tolerance`."""
    graph = model.graph
    pairs = equalizable_pairs(graph)
    rounds = 0
    for rounds in range(1, iterations + 1):
        change = max((equalize_pair(graph, a, b) for a, b in pairs), default=0.0)
        if change < tolerance:
            break
    graph.remove_unused_constants()
    return {"pairs": [[a.name, b.name] for a, b in pairs], "rounds": rounds if pairs else 0}


@register_pass
class Equalize(Pass):
    """Cross-layer equalization for Conv -> (Relu) -> Conv pairs: rescale output channels of the
    first convolution and input channels of the second by s = sqrt(r1 / r2) so both have the same
    per-channel weight range, leaving the float function unchanged (Relu commutes with positive
    scales). Helps int8 quantization of depthwise nets; run it before `quantize` (or use
    `quantize:equalize=true`)."""
    name = "equalize"
    options = {"iterations": Option(int, 20, "maximum sweeps over the chain of pairs")}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        result = equalize_model(model, iterations=self.iterations)
        changed = bool(result["pairs"])
        return PassResult(changed, [f"equalize: {len(result['pairs'])} conv pairs, "
                                    f"{result['rounds']} rounds"], result)
