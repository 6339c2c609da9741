"""fold-constants: evaluate nodes whose inputs are all known at compile time."""

from __future__ import annotations

import numpy as np

from ir import Model, Node, is_static_shape
from ir.node_eval import NotEvaluable, evaluate_node

from ..core import Option, Pass, PassContext, PassResult, register_pass

__all__ = ["FoldConstants"]

# Ops whose output differs from run to run (or that read no data) must never be folded.
# Dropout too: in training mode its mask is random (in inference mode remove-identity drops it).
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                     "Multinomial", "Bernoulli", "Dropout"}


@register_pass
class FoldConstants(Pass):
    """Replace nodes whose inputs are constants by their computed outputs.

    Folds `Constant`, `ConstantOfShape`, and every deterministic node fed only by constants; also
    `Shape`/`Size` of values whose shape is static, which resolves the Shape->Gather->Concat->Reshape
    chains that exporters emit. Subgraphs (If/Loop/Scan bodies) are left as they are. Outputs
    larger than `max_elements` stay unfolded so a model file does not balloon.
    """
    name = "fold-constants"
    options = {"max_elements": Option(int, 1 << 28, "largest folded output, in elements")}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        folded = 0
        for node in list(ctx.progress(graph.nodes, desc="fold-constants")):
            outputs = self._fold(node, model)
            if outputs is None:
                continue
            for value, array in zip(node.outputs, outputs):
                if value is not None:
                    graph.promote_to_constant(value, array)
            graph.remove_node(node)
            folded += 1
        removed = graph.remove_unused_constants()
        return PassResult(changed=bool(folded or removed), details={"folded": folded})

    def _fold(self, node: Node, model: Model) -> list[np.ndarray] | None:
        if node.op_type in _NONDETERMINISTIC or node.subgraphs() or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in ("Shape", "Size"):
            return self._fold_shape(node)
        if node.op_type == "Constant":
            try:
                return [_constant_value(node)]
            except NotEvaluable:
                pass  # e.g. sparse_value: the evaluator below densifies it
        if not all(v is None or v.is_constant for v in node.inputs):
            return None
        if node.op_type == "ConstantOfShape":
            shape = node.input(0).const.astype(np.int64)
            if int(np.prod(shape)) > self.max_elements:
                return None
            fill = node.attr("value")
            fill = np.zeros(1, np.float32) if fill is None else np.asarray(fill).reshape(-1)
            return [np.full(tuple(shape), fill[0], dtype=fill.dtype)]
        try:
            outputs = evaluate_node(node, model)
        except NotEvaluable:
            return None
        if any(o is not None and o.size > self.max_elements for o in outputs):
            return None
        return outputs

    @staticmethod
    def _fold_shape(node: Node) -> list[np.ndarray] | None:
        data = node.input(0)
        if data is None or not is_static_shape(data.shape):
            return None
        if node.op_type == "Size":
            return [np.array(int(np.prod(data.shape)), dtype=np.int64)]
        dims = np.array(data.shape, dtype=np.int64)
        rank = len(dims)
        start = node.attr("start", 0)
        end = node.attr("end", rank)
        return [dims[slice(start, end)]]


def _constant_value(node: Node) -> np.ndarray:
    """The tensor of a Constant node, whichever attribute form it uses."""
    attrs = node.attrs
    if "value" in attrs:
        return np.asarray(attrs["value"])
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    if "value_string" in attrs:
        return np.array(attrs["value_string"], dtype=object)
    if "value_strings" in attrs:
        return np.array(attrs["value_strings"], dtype=object)
    raise NotEvaluable(f"Constant node {node.name!r} has no supported value attribute")
