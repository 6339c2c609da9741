"""A networkx view of a graph for dependency analysis (reachability, dominators, paths).

The view is a snapshot: nodes are `Node` objects, and each edge producer -> consumer carries the
`Value` it passes as attribute ``value``. Rebuild it after editing the graph.
"""

from __future__ import annotations

import networkx as nx

from .graph import Graph

__all__ = ["to_networkx"]


def to_networkx(graph: Graph) -> nx.MultiDiGraph:
    """Nodes of `graph` (root level) as a MultiDiGraph; one edge per (value, reading node)."""
    view = nx.MultiDiGraph(name=graph.name)
    local = {id(n) for n in graph.nodes}
    for node in graph.nodes:
        view.add_node(node, op_type=node.op_type, name=node.name)
    for node in graph.nodes:
        for value in node.all_inputs():
            producer = graph._local_producer(value, local)
            if producer is not None:
                view.add_edge(producer, node, value=value)
    return view
