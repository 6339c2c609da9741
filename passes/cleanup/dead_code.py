"""eliminate-dead-code: drop nodes and constants that no graph output depends on."""

from __future__ import annotations

from ir import Graph, Model, Node

from ..core import Pass, PassContext, PassResult, register_pass

__all__ = ["EliminateDeadCode", "live_nodes"]


def live_nodes(graph: Graph) -> set[int]:
    """Ids of the nodes of `graph` that some graph output depends on."""
    local = {id(n) for n in graph.nodes}
    live: set[int] = set()
    stack: list[Node] = []
    for value in graph.outputs:
        producer = graph._local_producer(value, local)
        if producer is not None:
            stack.append(producer)
    while stack:
        node = stack.pop()
        if id(node) in live:
            continue
        live.add(id(node))
        for value in node.all_inputs():
            producer = graph._local_producer(value, local)
            if producer is not None and id(producer) not in live:
                stack.append(producer)
    return live


@register_pass
class EliminateDeadCode(Pass):
    """Remove nodes whose outputs no graph output depends on, then unused constants.

    Graph inputs are kept even when unused: they are the model's interface.
    """
    name = "eliminate-dead-code"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        live = live_nodes(graph)
        dead = [n for n in graph.nodes if id(n) not in live]
        # Detach every dead reader first, so no removal below leaves a reader behind.
        for node in dead:
            graph.detach_inputs(node)
        for node in dead:
            graph.remove_node(node)
        removed = graph.remove_unused_constants()
        return PassResult(changed=bool(dead or removed),
                          details={"nodes_removed": len(dead), "constants_removed": removed})
