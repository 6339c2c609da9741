"""Structural validity of a graph: `check_graph` raises GraphError on the first problem.

The pass manager calls it after every pass, so a pass that leaves a dangling reference, a cycle or a
duplicate name is caught where it happened rather than when the model is saved.
"""

from __future__ import annotations

from .errors import GraphError
from .graph import Graph, Model

__all__ = ["check_graph", "check_model"]


def check_model(model: Model) -> None:
    check_graph(model.graph)


def check_graph(graph: Graph) -> None:
    names: dict[str, object] = {}
    for value in graph.all_values():
        other = names.setdefault(value.name, value)
        if other is not value:
            raise GraphError(f"two values are named {value.name!r}")
    for sub in graph.walk_graphs():
        _check_links(sub)
    graph.toposort()  # raises GraphError on a cycle


def _check_links(graph: Graph) -> None:
    visible = _visible_values(graph)
    for node in graph.nodes:
        if node.graph is not graph:
            raise GraphError(f"{node!r} does not point back to graph {graph.name!r}")
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if id(value) not in visible:
                raise GraphError(f"{node!r} reads {value.name!r}, which is not defined "
                                 f"in its graph or an enclosing one")
            if (node, index) not in value._uses:
                raise GraphError(f"use list of {value.name!r} is out of sync with {node!r}")
        for value in node.outputs:
            if value is not None and value.producer is not node:
                raise GraphError(f"{value.name!r} does not name {node!r} as its producer")
    for value in graph.outputs:
        if id(value) not in visible:
            raise GraphError(f"graph output {value.name!r} is not defined")


def _visible_values(graph: Graph) -> set[int]:
    """Ids of values defined in this graph or any graph enclosing it."""
    visible: set[int] = set()
    current: Graph | None = graph
    while current is not None:
        visible.update(id(v) for v in current.values().values())
        current = current.parent.graph if current.parent is not None else None
    return visible
