"""Which layers `quantize` rewrites: Conv, ConvTranspose, MatMul and Gemm with a constant weight.

A target names its node, the input index of the float activation and of the constant weight, and
the weight's output-channel axis (the axis that gets one scale per channel):
- Conv weight OIHW: axis 0 (O = output channels).
- ConvTranspose weight [C_in, C_out/group, kH, kW]: axis 1.
- Gemm B: [N, K] with transB=1 -> axis 0; [K, N] with transB=0 -> axis 1.
- MatMul B: [..., K, N] -> the last axis (N); only a constant second operand is a weight.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from ir import Model, Node

__all__ = ["QuantTarget", "find_targets", "find_activation_matmuls", "SUPPORTED_OPS"]

SUPPORTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass
class QuantTarget:
    node: Node
    activation_index: int
    weight_index: int
    axis: int

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def activation(self):
        return self.node.inputs[self.activation_index]

    @property
    def weight(self):
        return self.node.inputs[self.weight_index]


def _weight_axis(node: Node, weight: np.ndarray) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attr("transB", 0) else 1
    if node.op_type == "MatMul":
        return weight.ndim - 1 if weight.ndim >= 2 else None
    return None


def _excluded(node: Node, patterns: list[str]) -> bool:
    weight = node.input(1)
    names = [node.name, node.op_type] + ([weight.name] if weight is not None else [])
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names)


def find_targets(model: Model, ops: list[str], exclude: list[str]) -> tuple[list[QuantTarget],
                                                                            list[dict]]:
    """Targets in graph order, and the candidate nodes skipped with the reason why."""
    targets, skipped = [], []
    for node in model.graph.nodes:
        if node.op_type not in ops or node.op_type not in SUPPORTED_OPS or node.domain:
            continue
        if _excluded(node, exclude):
            skipped.append({"node": node.name, "reason": "excluded"})
            continue
        activation, weight = node.input(0), node.input(1)
        if activation is None or weight is None or not weight.is_constant:
            skipped.append({"node": node.name, "reason": "no constant weight"})
            continue
        if activation.is_constant:
            skipped.append({"node": node.name, "reason": "constant activation"})
            continue
        if weight.dtype != np.float32 or (activation.dtype is not None
                                          and activation.dtype != np.float32):
            skipped.append({"node": node.name, "reason": "not float32"})
            continue
        axis = _weight_axis(node, weight.const)
        if axis is None:
            skipped.append({"node": node.name, "reason": "weight rank < 2"})
            continue
        targets.append(QuantTarget(node, 0, 1, axis))
    return targets, skipped


def find_activation_matmuls(model: Model, exclude: list[str]) -> list[Node]:
    """MatMuls whose two inputs are both float32 activations (attention's scores Q.K^T and
    probabilities.V), in graph order; excluded ones by node name or op type."""
    found = []
    for node in model.graph.nodes:
        if node.op_type != "MatMul" or node.domain or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if a is None or b is None or a.is_constant or b.is_constant:
            continue
        if any(v.dtype is not None and v.dtype != np.float32 for v in (a, b)):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude
               for name in (node.name, node.op_type)):
            continue
        found.append(node)
    return found
