"""The graph model: `Value`, `Node`, `Graph` and `Model`, linked by use-def chains.

Design (after torch.fx and onnx-ir):
- A `Value` is an SSA tensor. It knows its `producer` node (None for graph inputs and
  constants) and its uses, the `(node, input_index)` pairs that read it. Constants (ONNX
  initializers) are values with `const` set to a numpy array.
- A `Node` owns its inputs only through `set_input` / `inputs = [...]`, which keep every value's
  use list in sync, so the links cannot drift. Optional inputs/outputs that ONNX leaves empty are
  `None`.
- Rewrites are `value.replace_all_uses_with(other)` followed by `graph.remove_node(node)`.
- Subgraphs of If/Loop/Scan are `Graph` objects stored in the node's attributes. Their nodes may
  read values of an enclosing graph directly; such reads are ordinary uses, so dead-code
  elimination and rewrites in the outer graph see them (`Node.captured_values`).

Shapes are tuples whose entries are ints (static), strings (symbolic, as in ONNX `dim_param`) or
None (unknown); a shape of None means the rank is unknown. Layout conventions are ONNX's: NCHW
activations, OIHW conv weights, Gemm/MatMul weights as given by the op.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .errors import GraphError

__all__ = ["Value", "Node", "Graph", "Model", "is_static_shape", "downstream_nodes"]


def is_static_shape(shape) -> bool:
    """True when the rank and every dimension are known integers."""
    return shape is not None and all(isinstance(d, (int, np.integer)) for d in shape)


def downstream_nodes(nodes: Iterable["Node"]) -> dict[int, "Node"]:
    """`nodes` and every node that reads what they compute, directly or not, by id."""
    found: dict[int, Node] = {}
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if id(node) in found:
            continue
        found[id(node)] = node
        for value in node.outputs:
            if value is not None:
                stack.extend(value.consumers())
    return found


class Value:
    """A tensor flowing through the graph (or a constant).

    Attributes:
        name: unique within the model.
        dtype: numpy dtype, or None when unknown.
        shape: tuple of int | str | None per dim, or None when the rank is unknown.
        const: numpy array for constants (initializers), else None.
        type_proto: the ONNX TypeProto of non-tensor values (sequences, maps, optionals), kept
            verbatim so they round-trip; None for tensors.
        meta: free-form annotations that passes attach for later passes and backends, e.g.
            ``meta["sparsity"]`` (pattern, block shape, density) or ``meta["quant"]`` (scales).
    """

    def __init__(self, name: str, dtype=None, shape=None, const: np.ndarray | None = None,
                 type_proto=None):
        self.name = name
        self.dtype = np.dtype(dtype) if dtype is not None else None
        self.shape = tuple(shape) if shape is not None else None
        self.type_proto = type_proto
        self.producer: Node | None = None
        self.graph: Graph | None = None
        self.meta: dict[str, Any] = {}
        self.doc_string = ""
        self._uses: list[tuple[Node, int]] = []
        self._const: np.ndarray | None = None
        if const is not None:
            self.const = const

    # -- constant data -------------------------------------------------------------------------
    @property
    def const(self) -> np.ndarray | None:
        return self._const

    @const.setter
    def const(self, array: np.ndarray | None) -> None:
        if array is None:
            self._const = None
            return
        array = np.asarray(array)
        self._const = array
        self.dtype = array.dtype
        self.shape = tuple(int(d) for d in array.shape)

    @property
    def is_constant(self) -> bool:
        return self._const is not None

    # -- use-def navigation ----------------------------------------------------------------------
    def uses(self) -> list[tuple["Node", int]]:
        """The `(node, input_index)` pairs reading this value, in any graph."""
        return list(self._uses)

    def consumers(self) -> list["Node"]:
        """The distinct nodes reading this value."""
        seen: dict[int, Node] = {}
        for node, _ in self._uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    def is_graph_output(self) -> bool:
        return self.graph is not None and any(v is self for v in self.graph.outputs)

    def sole_add(self) -> tuple["Node", int] | None:
        """(add, index of its other input) when one binary Add alone reads this value (not a
        graph output, not x + x): where a layer's bias lives, so passes can fold into it."""
        readers = self.consumers()
        if self.is_graph_output() or len(readers) != 1 or readers[0].op_type != "Add":
            return None
        add = readers[0]
        if len(add.inputs) != 2 or add.input(0) is add.input(1):
            return None
        return add, 1 if add.input(0) is self else 0

    def is_graph_input(self) -> bool:
        return self.graph is not None and any(v is self for v in self.graph.inputs)

    def replace_all_uses_with(self, other: "Value") -> None:
        """Make every reader of this value read `other` instead, graph outputs included.

        A graph output keeps its name (the model's interface): when `other` is free to be
        renamed it takes this value's name; otherwise an Identity node bridges the two.
        """
        if other is self:
            return
        for node, index in list(self._uses):
            node.set_input(index, other)
        graph = self.graph
        if graph is None or not self.is_graph_output():
            return
        out_name = self.name
        can_rename = (other.graph is graph and not other.is_graph_input()
                      and not other.is_graph_output() and not other.is_constant)
        graph.rename_value(self, graph.unique_name(out_name + "_replaced"))
        if can_rename:
            graph.outputs = [other if v is self else v for v in graph.outputs]
            graph.rename_value(other, out_name)
        else:
            bridge = graph.make_value(out_name, dtype=other.dtype, shape=other.shape)
            graph.add_node("Identity", [other], [bridge], name=graph.unique_name(out_name + "/keep"))
            graph.outputs = [bridge if v is self else v for v in graph.outputs]

    def __repr__(self) -> str:
        kind = "const " if self.is_constant else ""
        return f"Value({kind}{self.name!r}, {self.dtype}, {self.shape})"


class Node:
    """One operator application. Inputs are `Value | None`; outputs are `Value | None`.

    `attrs` maps attribute names to Python values: int, float, str, list, numpy array (tensor
    attributes) or `Graph` (subgraph attributes). `attr_types` remembers the ONNX attribute type
    of imported attributes so empty lists and other ambiguous values export unchanged.
    """

    def __init__(self, op_type: str, inputs: Sequence[Value | None] = (),
                 outputs: Sequence[Value | None] = (), attrs: dict | None = None,
                 name: str = "", domain: str = ""):
        self.op_type = op_type
        self.domain = domain
        self.name = name
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.attr_types: dict[str, int] = {}
        self.doc_string = ""
        self.graph: Graph | None = None
        self._inputs: list[Value | None] = []
        self._outputs: list[Value | None] = []
        self.inputs = list(inputs)
        self.outputs = list(outputs)

    # -- inputs ----------------------------------------------------------------------------------
    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @inputs.setter
    def inputs(self, values: Sequence[Value | None]) -> None:
        for index, old in enumerate(self._inputs):
            if old is not None:
                old._uses.remove((self, index))
        self._inputs = list(values)
        for index, new in enumerate(self._inputs):
            if new is not None:
                new._uses.append((self, index))

    def set_input(self, index: int, value: Value | None) -> None:
        old = self._inputs[index]
        if old is value:
            return
        if old is not None:
            old._uses.remove((self, index))
        self._inputs[index] = value
        if value is not None:
            value._uses.append((self, index))

    def replace_input(self, old: Value, new: Value | None) -> None:
        for index, value in enumerate(self._inputs):
            if value is old:
                self.set_input(index, new)

    def input(self, index: int) -> Value | None:
        """The input at `index`, or None when absent or omitted."""
        return self._inputs[index] if index < len(self._inputs) else None

    # -- outputs ---------------------------------------------------------------------------------
    @property
    def outputs(self) -> tuple[Value | None, ...]:
        return tuple(self._outputs)

    @outputs.setter
    def outputs(self, values: Sequence[Value | None]) -> None:
        for old in self._outputs:
            if old is not None and old.producer is self:
                old.producer = None
        self._outputs = list(values)
        for new in self._outputs:
            if new is not None:
                if new.producer is not None and new.producer is not self:
                    raise GraphError(f"value {new.name!r} already has a producer")
                new.producer = self

    @property
    def output(self) -> Value:
        """The first output (most ops have exactly one)."""
        return self._outputs[0]

    # -- attributes and subgraphs ------------------------------------------------------------------
    def attr(self, name: str, default=None):
        return self.attrs.get(name, default)

    def subgraphs(self) -> list["Graph"]:
        found = []
        for value in self.attrs.values():
            if isinstance(value, Graph):
                found.append(value)
            elif isinstance(value, list):
                found.extend(v for v in value if isinstance(v, Graph))
        return found

    def captured_values(self) -> list[Value]:
        """Values of enclosing graphs that this node's subgraphs read (implicit inputs)."""
        inner = set()
        captured: dict[int, Value] = {}
        for sub in self.subgraphs():
            for graph in sub.walk_graphs():
                inner.add(id(graph))
        for sub in self.subgraphs():
            for graph in sub.walk_graphs():
                for node in graph.nodes:
                    for value in node.inputs:
                        if value is not None and id(value.graph) not in inner:
                            captured.setdefault(id(value), value)
                for value in graph.outputs:
                    if id(value.graph) not in inner:
                        captured.setdefault(id(value), value)
        return list(captured.values())

    def all_inputs(self) -> list[Value]:
        """Explicit inputs plus captured outer values: everything this node depends on."""
        explicit = [v for v in self._inputs if v is not None]
        if not self.subgraphs():
            return explicit
        return explicit + [v for v in self.captured_values() if all(v is not e for e in explicit)]

    def __repr__(self) -> str:
        ins = ", ".join(v.name if v is not None else "_" for v in self._inputs)
        outs = ", ".join(v.name if v is not None else "_" for v in self._outputs)
        return f"Node({self.op_type} {self.name!r}: ({ins}) -> ({outs}))"


class Graph:
    """A list of nodes with its inputs, outputs and constants.

    Values are owned by exactly one graph (`value.graph`). Names are unique across the whole
    model (subgraphs share the root's name table), as ONNX requires.
    """

    def __init__(self, name: str = "graph", parent: Node | None = None):
        self.name = name
        self.parent = parent
        self.nodes: list[Node] = []
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.initializers: dict[str, Value] = {}
        self.doc_string = ""
        self._names: set[str] = set()
        self._counter = itertools.count()

    # -- naming ----------------------------------------------------------------------------------
    @property
    def root(self) -> "Graph":
        graph = self
        while graph.parent is not None and graph.parent.graph is not None:
            graph = graph.parent.graph
        return graph

    def unique_name(self, base: str) -> str:
        """A name not used anywhere in the model, derived from `base`."""
        names = self.root._names
        if base and base not in names:
            names.add(base)
            return base
        while True:
            candidate = f"{base}_{next(self.root._counter)}"
            if candidate not in names:
                names.add(candidate)
                return candidate

    def claim_name(self, name: str) -> None:
        """Reserve a name read from a file (duplicates are an error in ONNX)."""
        names = self.root._names
        if name in names:
            raise GraphError(f"duplicate value name {name!r}")
        names.add(name)

    def rename_value(self, value: Value, new_name: str) -> None:
        names = self.root._names
        if new_name != value.name and new_name in names and not self._name_free(new_name, value):
            raise GraphError(f"cannot rename {value.name!r} to existing name {new_name!r}")
        if value.is_constant and value.name in self.initializers:
            del self.initializers[value.name]
            self.initializers[new_name] = value
        names.discard(value.name)  # the old name is free again
        value.name = new_name
        names.add(new_name)

    def _name_free(self, name: str, value: Value) -> bool:
        return all(v is value or v.name != name for v in self.root.all_values())

    # -- construction ----------------------------------------------------------------------------
    def make_value(self, name: str, dtype=None, shape=None) -> Value:
        """A new value owned by this graph; `name` is made unique."""
        value = Value(self.unique_name(name), dtype=dtype, shape=shape)
        value.graph = self
        return value

    def add_constant(self, name: str, array) -> Value:
        """A new constant (initializer) value holding `array`."""
        value = Value(self.unique_name(name), const=np.asarray(array))
        value.graph = self
        self.initializers[value.name] = value
        return value

    def add_input(self, value: Value) -> Value:
        value.graph = self
        self.inputs.append(value)
        return value

    def add_node(self, op_type: str, inputs: Sequence[Value | None],
                 outputs: Sequence[Value | None] | int = 1, attrs: dict | None = None,
                 name: str = "", domain: str = "", before: Node | None = None,
                 after: Node | None = None) -> Node:
        """Create a node and insert it (at the end, or before/after a given node).

        `outputs` is either a list of values (made with `make_value`) or a count, in which case
        fresh outputs named after the node are created with unknown dtype and shape.
        """
        node_name = self.unique_name(name or op_type)
        if isinstance(outputs, int):
            outputs = [self.make_value(f"{node_name}_out{i}" if outputs > 1 else f"{node_name}_out")
                       for i in range(outputs)]
        node = Node(op_type, inputs, outputs, attrs, name=node_name, domain=domain)
        self.insert_node(node, before=before, after=after)
        return node

    def insert_node(self, node: Node, before: Node | None = None, after: Node | None = None) -> Node:
        node.graph = self
        for value in node.outputs:
            if value is not None:
                value.graph = self
        if before is not None:
            self.nodes.insert(self._index_of(before), node)
        elif after is not None:
            self.nodes.insert(self._index_of(after) + 1, node)
        else:
            self.nodes.append(node)
        return node

    def _index_of(self, node: Node) -> int:
        for index, candidate in enumerate(self.nodes):
            if candidate is node:
                return index
        raise GraphError(f"{node!r} is not in graph {self.name!r}")

    # -- removal ---------------------------------------------------------------------------------
    def remove_node(self, node: Node) -> None:
        """Detach a node: its inputs lose this use; its outputs lose their producer.

        Outputs that still have uses are an error unless they were turned into constants
        (constant folding keeps the same `Value` and just gives it data).
        """
        # Validate everything before changing anything: a refused removal leaves the graph intact.
        index = self._index_of(node)
        for value in node.outputs:
            if (value is not None and (value._uses or value.is_graph_output())
                    and not value.is_constant):
                raise GraphError(f"removing {node!r} would leave {value.name!r} undefined")
        for value in node.outputs:
            if value is not None and value.producer is node:
                value.producer = None
        self.detach_inputs(node)
        self.nodes.pop(index)
        node.graph = None

    @staticmethod
    def detach_inputs(node: Node) -> None:
        """Drop every read the node makes, including reads from inside its subgraphs."""
        node.inputs = []
        for sub in node.subgraphs():
            for inner_graph in sub.walk_graphs():
                for inner in inner_graph.nodes:
                    inner.inputs = []

    def remove_unused_constants(self) -> int:
        """Drop initializers nobody reads; returns how many were dropped."""
        dead = [name for name, value in self.initializers.items()
                if not value._uses and not value.is_graph_output()]
        for name in dead:
            del self.initializers[name]
        return len(dead)

    def promote_to_constant(self, value: Value, array: np.ndarray) -> None:
        """Give a computed value constant data (used by constant folding)."""
        value.const = array
        value.producer = None
        self.initializers[value.name] = value

    # -- iteration -------------------------------------------------------------------------------
    def walk_graphs(self) -> Iterator["Graph"]:
        """This graph and every nested subgraph."""
        yield self
        for node in self.nodes:
            for sub in node.subgraphs():
                yield from sub.walk_graphs()

    def all_values(self) -> Iterator[Value]:
        """Every value defined in this graph and its subgraphs."""
        for graph in self.walk_graphs():
            yield from graph.inputs
            yield from graph.initializers.values()
            for node in graph.nodes:
                for value in node.outputs:
                    if value is not None:
                        yield value

    def values(self) -> dict[str, Value]:
        """Name -> value for the values defined in this graph (not subgraphs)."""
        table: dict[str, Value] = {}
        for value in itertools.chain(self.inputs, self.initializers.values()):
            table[value.name] = value
        for node in self.nodes:
            for value in node.outputs:
                if value is not None:
                    table[value.name] = value
        return table

    def find_node(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def nodes_of(self, *op_types: str) -> list[Node]:
        return [n for n in self.nodes if n.op_type in op_types]

    # -- ordering --------------------------------------------------------------------------------
    def toposort(self) -> "Graph":
        """Order nodes so each comes after its producers (stable; in place). Returns self."""
        order: list[Node] = []
        state: dict[int, int] = {}  # 1 = on stack, 2 = done
        local = {id(n) for n in self.nodes}
        for start in self.nodes:
            if state.get(id(start)) == 2:
                continue
            stack = [(start, iter(start.all_inputs()))]
            state[id(start)] = 1
            while stack:
                node, pending = stack[-1]
                advanced = False
                for value in pending:
                    producer = self._local_producer(value, local)
                    if producer is None or state.get(id(producer)) == 2:
                        continue
                    if state.get(id(producer)) == 1:
                        raise GraphError(f"cycle through {producer!r}")
                    state[id(producer)] = 1
                    stack.append((producer, iter(producer.all_inputs())))
                    advanced = True
                    break
                if not advanced:
                    stack.pop()
                    state[id(node)] = 2
                    order.append(node)
        self.nodes = order
        return self

    def _local_producer(self, value: Value, local: set[int]) -> Node | None:
        """The node of this graph that a value depends on (walking out of subgraphs)."""
        node = value.producer
        while node is not None and id(node) not in local:
            parent_graph = node.graph
            node = parent_graph.parent if parent_graph is not None else None
        return node

    def __repr__(self) -> str:
        return (f"Graph({self.name!r}, {len(self.nodes)} nodes, {len(self.inputs)} inputs, "
                f"{len(self.outputs)} outputs, {len(self.initializers)} constants)")


class Model:
    """A graph plus the model-level ONNX fields that must survive a round trip."""

    def __init__(self, graph: Graph, opset_imports: dict[str, int] | None = None,
                 ir_version: int = 8, producer_name: str = "", producer_version: str = "",
                 domain: str = "", model_version: int = 0, doc_string: str = "",
                 metadata_props: dict[str, str] | None = None, functions: Iterable = ()):
        self.graph = graph
        self.opset_imports = dict(opset_imports or {"": 17})
        self.ir_version = ir_version
        self.producer_name = producer_name
        self.producer_version = producer_version
        self.domain = domain
        self.model_version = model_version
        self.doc_string = doc_string
        self.metadata_props = dict(metadata_props or {})
        # Model-local functions are kept as ONNX FunctionProtos: no pass looks inside them.
        self.functions = list(functions)

    @property
    def opset(self) -> int:
        """The default-domain opset version."""
        return self.opset_imports.get("", self.opset_imports.get("ai.onnx", 1))

    def __repr__(self) -> str:
        return f"Model(opset={self.opset}, {self.graph!r})"
