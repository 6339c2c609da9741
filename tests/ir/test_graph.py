"""Use-def chains, rewrites, removal, ordering and subgraph captures of `ir.graph`."""

import numpy as np
import pytest

import ir
from ir import Graph, GraphError, Model
from passes.cleanup import EliminateDeadCode
from passes.core import PassContext
from tests.helpers import run_onnx


def _input(graph, name, shape=(2, 3)):
    return graph.add_input(graph.make_value(name, np.float32, shape))


def _two_input_graph():
    """x, z -> a = Relu(x) -> s = Add(a, a) -> output s."""
    graph = Graph("g")
    x, z = _input(graph, "x"), _input(graph, "z")
    relu = graph.add_node("Relu", [x], name="relu")
    add = graph.add_node("Add", [relu.output, relu.output], name="add")
    graph.outputs = [add.output]
    return graph, x, z, relu, add


def test_downstream_nodes_follow_every_reader_once():
    graph, x, z, relu, add = _two_input_graph()
    side = graph.add_node("Neg", [z], name="side")
    assert set(ir.downstream_nodes([relu])) == {id(relu), id(add)}
    assert set(ir.downstream_nodes([add])) == {id(add)}
    assert set(ir.downstream_nodes([side])) == {id(side)}
    assert ir.downstream_nodes([]) == {}


# -- use-def sync ----------------------------------------------------------------------------------
def test_set_input_moves_exactly_one_use():
    graph, x, z, relu, add = _two_input_graph()
    a = relu.output
    assert a.uses() == [(add, 0), (add, 1)]
    assert a.consumers() == [add]  # one node, however many times it reads the value

    add.set_input(1, z)
    assert a.uses() == [(add, 0)]
    assert z.uses() == [(add, 1)]
    assert add.inputs == (a, z)
    ir.check_graph(graph)


def test_inputs_setter_rewrites_all_uses_and_accepts_omitted_inputs():
    graph, x, z, relu, add = _two_input_graph()
    add.inputs = [z, x]
    assert relu.output.uses() == []
    assert z.uses() == [(add, 0)] and x.uses() == [(relu, 0), (add, 1)]

    clip = graph.add_node("Clip", [x, None, relu.output], name="clip")
    assert clip.input(1) is None and clip.input(5) is None
    assert relu.output.uses() == [(clip, 2)]
    clip.inputs = []
    assert relu.output.uses() == [] and x.uses() == [(relu, 0), (add, 1)]


# -- replace_all_uses_with ---------------------------------------------------------------------------
def test_replace_output_by_internal_value_renames_it_to_the_output_name():
    graph = Graph("g")
    x = _input(graph, "x")
    neg = graph.add_node("Neg", [x], name="neg")
    ident = graph.add_node("Identity", [neg.output], [graph.make_value("y", np.float32, (2, 3))])
    graph.outputs = [ident.output]

    ident.output.replace_all_uses_with(neg.output)
    graph.remove_node(ident)

    assert [v.name for v in graph.outputs] == ["y"]
    assert graph.outputs[0] is neg.output
    model = Model(graph)
    ir.check_model(model)
    feed = np.arange(6, dtype=np.float32).reshape(2, 3)
    (out,) = run_onnx(ir.to_onnx(model), {"x": feed})
    np.testing.assert_array_equal(out, -feed)


def test_replace_output_by_graph_input_bridges_with_identity():
    """A graph input cannot take the output's name: an Identity keeps both names."""
    graph = Graph("g")
    x = _input(graph, "x")
    relu = graph.add_node("Relu", [x], [graph.make_value("y", np.float32, (2, 3))])
    graph.outputs = [relu.output]

    relu.output.replace_all_uses_with(x)
    graph.remove_node(relu)

    assert [v.name for v in graph.inputs] == ["x"]
    assert [v.name for v in graph.outputs] == ["y"]
    assert graph.outputs[0].producer.op_type == "Identity"
    feed = np.full((2, 3), -1.0, np.float32)
    (out,) = run_onnx(ir.to_onnx(Model(graph)), {"x": feed})
    np.testing.assert_array_equal(out, feed)


def test_replace_all_uses_updates_every_reader():
    graph, x, z, relu, add = _two_input_graph()
    relu.output.replace_all_uses_with(z)
    assert add.inputs == (z, z)
    assert relu.output.uses() == []
    graph.remove_node(relu)
    ir.check_graph(graph)


# -- removal ---------------------------------------------------------------------------------------
def test_remove_node_refuses_to_leave_readers_or_outputs_undefined():
    graph, x, z, relu, add = _two_input_graph()
    with pytest.raises(GraphError, match="undefined"):
        graph.remove_node(relu)  # add still reads relu's output
    with pytest.raises(GraphError, match="undefined"):
        graph.remove_node(add)  # add's output is the graph output
    stranger = ir.Node("Relu", [x], [ir.Value("w")])
    with pytest.raises(GraphError, match="not in graph"):
        graph.remove_node(stranger)
    ir.check_graph(graph)  # a refused removal changes nothing
    assert relu.output.producer is relu and add.output.producer is add


def test_remove_node_detaches_its_inputs():
    graph, x, z, relu, add = _two_input_graph()
    extra = graph.add_node("Neg", [x], name="neg")
    graph.remove_node(extra)
    assert x.uses() == [(relu, 0)]
    assert extra not in graph.nodes and extra.graph is None


# -- ordering ---------------------------------------------------------------------------------------
def _chain_graph(length=12):
    graph = Graph("chain")
    value = _input(graph, "x")
    first = value
    for index in range(length):
        # Each node reads the previous value and the graph input: a chain with extra edges.
        value = graph.add_node("Add", [value, first], name=f"n{index}").output
    graph.outputs = [value]
    return graph


def test_toposort_orders_shuffled_nodes_and_is_stable():
    graph = _chain_graph()
    expected = [n.name for n in graph.nodes]
    graph.toposort()
    assert [n.name for n in graph.nodes] == expected  # already sorted: unchanged
    rng = np.random.default_rng(0)
    for _ in range(5):
        rng.shuffle(graph.nodes)
        assert graph.toposort() is graph
        assert [n.name for n in graph.nodes] == expected


def test_toposort_detects_a_cycle():
    graph = Graph("cycle")
    x = _input(graph, "x")
    a = graph.make_value("a")
    b = graph.make_value("b")
    graph.add_node("Add", [x, b], [a], name="first")
    graph.add_node("Relu", [a], [b], name="second")
    graph.outputs = [b]
    with pytest.raises(GraphError, match="cycle"):
        graph.toposort()
    with pytest.raises(GraphError, match="cycle"):
        ir.check_graph(graph)


# -- subgraphs ---------------------------------------------------------------------------------------
def _if_reading_outer_value():
    """w = Neg(x); dead = Relu(x); y = If(cond, then: Identity(w), else: Identity(x))."""
    graph = Graph("main")
    x = _input(graph, "x")
    cond = graph.add_input(graph.make_value("cond", np.bool_, ()))
    neg = graph.add_node("Neg", [x], name="neg")
    dead = graph.add_node("Relu", [x], name="dead")
    if_node = graph.add_node("If", [cond], [graph.make_value("y", np.float32, (2, 3))], name="if")
    branches = {}
    for branch, source in (("then_branch", neg.output), ("else_branch", x)):
        sub = Graph(branch, parent=if_node)
        inner = sub.add_node("Identity", [source], [sub.make_value(f"{branch}_out", np.float32,
                                                                   (2, 3))])
        sub.outputs = [inner.output]
        if_node.attrs[branch] = sub
        branches[branch] = inner
    graph.outputs = [if_node.output]
    return Model(graph), neg, dead, if_node, branches


def test_subgraph_reads_are_uses_and_captured_values():
    model, neg, dead, if_node, branches = _if_reading_outer_value()
    assert neg.output.uses() == [(branches["then_branch"], 0)]
    captured = if_node.captured_values()
    assert {v.name for v in captured} == {"x", neg.output.name}
    assert {v.name for v in if_node.all_inputs()} == {"cond", "x", neg.output.name}
    with pytest.raises(GraphError):
        model.graph.remove_node(neg)  # still read inside the then-branch
    ir.check_model(model)


def test_toposort_and_dead_code_respect_captured_values():
    model, neg, dead, if_node, branches = _if_reading_outer_value()
    graph = model.graph
    graph.nodes = [if_node, dead, neg]  # the If before the producer of the value it captures
    graph.toposort()
    assert graph.nodes.index(neg) < graph.nodes.index(if_node)

    result = EliminateDeadCode().run(model, PassContext())
    assert result.changed
    assert [n.name for n in graph.nodes] == ["neg", "if"]  # the unread Relu went, Neg stayed

    feed = np.arange(6, dtype=np.float32).reshape(2, 3)
    proto = ir.to_onnx(model)
    for cond, expected in ((True, -feed), (False, feed)):
        (out,) = run_onnx(proto, {"x": feed, "cond": np.array(cond)})
        np.testing.assert_array_equal(out, expected)


def test_names_are_unique_across_subgraphs():
    model, neg, dead, if_node, branches = _if_reading_outer_value()
    sub = if_node.attrs["then_branch"]
    fresh = sub.make_value("x")  # "x" is taken by the root graph's input
    assert fresh.name != "x"
    with pytest.raises(GraphError, match="duplicate"):
        sub.claim_name("cond")
