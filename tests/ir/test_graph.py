"""Use-def chains, rewrites, ordering and subgraphs of the IR."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import ir
from ir import Graph, GraphError, Node, Value
from passes import PassManager, build_pipeline
from tests.helpers import conv_bn_relu_gemm, run_onnx


def _chain():
    graph = Graph("g")
    x = graph.add_input(Value("x", np.float32, (2,)))
    a = graph.add_node("Relu", [x], name="a").output
    b = graph.add_node("Neg", [a], name="b").output
    graph.outputs.append(b)
    return graph, x, a, b


def test_set_input_keeps_uses_in_sync():
    graph, x, a, b = _chain()
    neg = b.producer
    assert a.uses() == [(neg, 0)] and x.consumers() == [a.producer]
    neg.set_input(0, x)
    assert a.uses() == [] and sorted(n.name for n in x.consumers()) == ["a", "b"]
    neg.inputs = [a, a]
    assert a.uses() == [(neg, 0), (neg, 1)] and x.uses() == [(a.producer, 0)]


def test_replace_all_uses_keeps_the_output_name():
    graph, x, a, b = _chain()
    c = graph.add_node("Abs", [a], name="c").output
    name = b.name
    b.replace_all_uses_with(c)
    graph.remove_node(b.producer)
    assert graph.outputs == [c] and c.name == name
    ir.check_graph(graph)


def test_replace_output_by_an_input_bridges_with_identity():
    graph, x, a, b = _chain()
    name = b.name
    b.replace_all_uses_with(x)
    graph.remove_node(b.producer)
    (out,) = graph.outputs
    assert out.name == name and out.producer.op_type == "Identity" and out.producer.input(0) is x


def test_remove_node_refuses_to_orphan_readers():
    graph, x, a, b = _chain()
    with pytest.raises(GraphError, match="undefined"):
        graph.remove_node(a.producer)


def test_toposort_restores_order_and_detects_cycles():
    graph, x, a, b = _chain()
    graph.nodes.reverse()
    assert [n.name for n in graph.toposort().nodes] == ["a", "b"]
    a.producer.set_input(0, b)
    with pytest.raises(GraphError, match="cycle"):
        graph.toposort()


def _if_model():
    """y = If(cond) then (x + c) else (x - c), where x and c live in the outer graph."""
    then_graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_graph = helper.make_graph([helper.make_node("Sub", ["x", "c"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("Relu", ["x0"], ["x"]),
        helper.make_node("Neg", ["x0"], ["unused"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(
        nodes, "main",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [onnx.numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_subgraph_reads_are_uses_and_survive_dead_code_elimination():
    model = ir.load_model(_if_model())
    graph = model.graph
    x = graph.values()["x"]
    if_node = graph.nodes_of("If")[0]
    assert {n.op_type for n in x.consumers()} == {"Add", "Sub"}
    assert {v.name for v in if_node.captured_values()} == {"x", "c"}
    PassManager(build_pipeline("eliminate-dead-code")).run(model)
    assert [n.op_type for n in graph.nodes] == ["Relu", "If"]
    proto = ir.to_onnx(model)
    x0 = np.array([-1.0, 3.0], np.float32)
    for cond, expected in ((True, [1.0, 5.0]), (False, [-1.0, 1.0])):
        out = run_onnx(proto, {"x0": x0, "cond": np.array(cond)})[0]
        np.testing.assert_allclose(out, expected)


def test_model_fields_round_trip():
    original = conv_bn_relu_gemm()
    original.doc_string = "doc"
    original.producer_name = "tests"
    original.functions.append(helper.make_function(
        "custom", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)]))
    original.opset_import.append(helper.make_opsetid("custom", 1))
    proto = ir.to_onnx(ir.load_model(original))
    assert proto.doc_string == "doc" and proto.producer_name == "tests"
    assert {p.key: p.value for p in proto.metadata_props} == {"author": "tests",
                                                              "purpose": "round trip"}
    assert [f.name for f in proto.functions] == ["Twice"]
    assert {(o.domain, o.version) for o in proto.opset_import} == {("", 17), ("custom", 1)}


@pytest.mark.parametrize("data, fragment", [
    (b"", "empty file"),
    (b"\x08\x07garbage that is not protobuf \xff\xff", "not"),
])
def test_bad_bytes_are_load_errors(data, fragment):
    with pytest.raises(ir.ModelLoadError, match=fragment):
        ir.load_model(data)


def test_missing_file_is_a_load_error(tmp_path):
    with pytest.raises(ir.ModelLoadError, match="not found"):
        ir.load_model(tmp_path / "missing.onnx")


def test_initializer_inputs_become_constants():
    model = conv_bn_relu_gemm()
    model.ir_version = 3
    model.graph.input.extend([helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 3, 3, 3])])
    loaded = ir.load_model(model)
    assert [v.name for v in loaded.graph.inputs] == ["x"]
    assert loaded.graph.initializers["w"].is_constant
    assert ir.to_onnx(loaded).ir_version >= 4
