"""remove-identity: bypass Identity and inference-time Dropout nodes."""

from __future__ import annotations

from ir import Model, Node

from ..core import Pass, PassContext, PassResult, register_pass

__all__ = ["RemoveIdentity"]


def _is_inference_dropout(node: Node) -> bool:
    """Dropout is the identity at inference unless training_mode is on (or unknown)."""
    training = node.input(2)
    if training is not None and (not training.is_constant or bool(training.const)):
        return False
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    return mask is None or (not mask.uses() and not mask.is_graph_output())


@register_pass
class RemoveIdentity(Pass):
    """Remove Identity nodes and Dropout nodes in inference mode, wiring readers to the input.

    A node whose output is a graph output and whose input is a graph input (or another graph
    output) is kept, since the model's interface needs both names.
    """
    name = "remove-identity"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        removed = 0
        for node in list(graph.nodes):
            if node.op_type == "Identity":
                pass
            elif node.op_type == "Dropout" and _is_inference_dropout(node):
                pass
            else:
                continue
            source, result = node.input(0), node.output
            if result.is_graph_output() and (source.is_graph_input() or source.is_graph_output()
                                             or source.is_constant):
                continue
            result.replace_all_uses_with(source)
            if result.uses() or result.is_graph_output():
                continue
            graph.remove_node(node)
            removed += 1
        return PassResult(changed=bool(removed), details={"removed": removed})
