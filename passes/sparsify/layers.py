"""The layers `sparsify` works on and how each op's weight is viewed as W[out, in].

| op     | weight            | view W[out, in]                          | inputs of one output (columns)  |
|--------|-------------------|------------------------------------------|---------------------------------|
| MatMul | B [K, N] (input 1) | B transposed: [N, K]                     | x[..., K]                       |
| Gemm   | B [N, K], transB=1 | B as is: [N, K]                          | rows of A (A^T if transA=1)     |
| Gemm   | B [K, N], transB=0 | B transposed: [N, K]                     | same                            |
| Conv   | [O, I/g, k...]     | reshaped to [O, I/g * prod(k)], (c, k...) | im2col patches of the input     |

Grouped convolutions have `groups` row groups: rows of group g read only the input channels of
group g, so data-aware methods keep one input statistic per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np

from ir import Graph, Node, Value

__all__ = ["SparsifyTarget", "find_targets", "boundary_targets", "matches_any"]


@dataclass
class SparsifyTarget:
    """One weight to sparsify: the node reading it, the constant, and its 2-D view."""
    node: Node
    weight: Value

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def groups(self) -> int:
        return int(self.node.attr("group", 1)) if self.op_type == "Conv" else 1

    @property
    def transposed(self) -> bool:
        """True when the stored weight is [in, out] and the view transposes it."""
        if self.op_type == "MatMul":
            return True
        if self.op_type == "Gemm":
            return not self.node.attr("transB", 0)
        return False

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.const.shape[2:]) if self.op_type == "Conv" else ()

    @property
    def layout(self) -> str:
        """How the 2-D view was made (recorded in the metadata for the backends)."""
        shape = list(self.weight.const.shape)
        if self.op_type == "Conv":
            return f"Conv weight {shape} (OIHW) reshaped to [O, I/group*kh*kw]"
        if self.transposed:
            return f"{self.op_type} weight {shape} ([in, out]) transposed to [out, in]"
        return f"{self.op_type} weight {shape} (transB=1) is [out, in]"

    def matrix(self) -> np.ndarray:
        """The weight as a float64 [out, in] matrix (a copy)."""
        w = self.weight.const.astype(np.float64)
        if self.op_type == "Conv":
            return w.reshape(w.shape[0], -1).copy()
        return w.T.copy() if self.transposed else w.copy()

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Back from the [out, in] view to the stored layout and dtype."""
        shape, dtype = self.weight.const.shape, self.weight.const.dtype
        stored = matrix.T if self.transposed else matrix
        return np.ascontiguousarray(stored.reshape(shape)).astype(dtype)

    def row_groups(self) -> list[slice]:
        rows = self.weight.const.shape[1 if self.transposed else 0]
        per = rows // self.groups
        return [slice(g * per, (g + 1) * per) for g in range(self.groups)]

    def name_matches(self, patterns: list[str]) -> bool:
        return matches_any([self.node.name, self.weight.name, self.op_type], patterns)


def matches_any(names: list[str], patterns: list[str]) -> bool:
    """True when a name equals or glob-matches (``*``, ``?``) one of the patterns."""
    return any(fnmatchcase(name, pattern) for name in names if name for pattern in patterns)


def _weight_of(node: Node) -> Value | None:
    """The constant weight a sparsifiable node reads, or None when it has none we can view."""
    weight = node.input(1)
    activation = node.input(0)
    if weight is None or not weight.is_constant or activation is None or activation.is_constant:
        return None
    if weight.const.dtype.kind != "f":
        return None  # already quantized or integer: nothing to sparsify by magnitude
    rank = weight.const.ndim
    if node.op_type in ("MatMul", "Gemm") and rank != 2:
        return None
    if node.op_type == "Conv" and rank not in (3, 4, 5):
        return None
    return weight


def find_targets(graph: Graph, op_types: list[str]) -> list[SparsifyTarget]:
    """Every node of `op_types` with a viewable constant weight, in topological order."""
    graph.toposort()
    found = []
    for node in graph.nodes:
        if node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
            continue
        weight = _weight_of(node)
        if weight is not None:
            found.append(SparsifyTarget(node, weight))
    return found


def boundary_targets(graph: Graph, targets: list[SparsifyTarget]) -> tuple[set[int], set[int]]:
    """(first, last): indices of targets with no other target upstream / downstream.

    A transformer's Q, K and V projections of the first block are all "first"; a network's
    classifier head is "last". Computed on the data-flow graph, not on list order.
    """
    index_of = {id(t.node): i for i, t in enumerate(targets)}
    # upstream[i] = True when some target feeds node i (transitively); propagate in topo order.
    fed: dict[int, bool] = {}
    has_upstream: set[int] = set()
    for node in graph.nodes:
        reached = any(fed.get(id(v.producer), False)
                      for v in node.all_inputs() if v.producer is not None)
        fed[id(node)] = reached or id(node) in index_of
        if id(node) in index_of and reached:
            has_upstream.add(index_of[id(node)])
    feeds_target: dict[int, bool] = {}
    has_downstream: set[int] = set()
    for node in reversed(graph.nodes):
        readers = [r for out in node.outputs if out is not None for r in out.consumers()]
        reaches = any(feeds_target.get(id(r), False) or id(r) in index_of for r in readers)
        feeds_target[id(node)] = reaches or id(node) in index_of
        if id(node) in index_of and reaches:
            has_downstream.add(index_of[id(node)])
    first = {i for i in range(len(targets)) if i not in has_upstream}
    last = {i for i in range(len(targets)) if i not in has_downstream}
    return first, last

