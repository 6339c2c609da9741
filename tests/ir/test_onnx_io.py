"""ONNX import/export: what must survive a round trip, and how bad files are refused."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import AttributeProto, TensorProto, helper, numpy_helper

import ir
from tests.helpers import conv_bn_relu_gemm, run_onnx


def _model(graph, opset=17, **opsets) -> onnx.ModelProto:
    """A model onnxruntime 1.31 can load (helper.make_model writes a newer IR version)."""
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in opsets.items()]
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    return model


def _round_trip(proto: onnx.ModelProto) -> onnx.ModelProto:
    return ir.to_onnx(ir.load_model(proto))


# -- model-level fields ------------------------------------------------------------------------------
def _model_with_function() -> onnx.ModelProto:
    """y = local.Double(x) + x, where Double is a model-local function; every doc string set."""
    double = helper.make_function(
        "local", "Double", ["a"], ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        opset_imports=[helper.make_opsetid("", 17)], doc_string="doubles its input")
    nodes = [helper.make_node("Double", ["x"], ["d"], domain="local", name="double",
                              doc_string="node doc"),
             helper.make_node("Add", ["d", "x"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "with_function",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], doc_string="graph doc")
    graph.input[0].doc_string = "input doc"
    model = helper.make_model(graph, functions=[double], doc_string="model doc",
                              producer_name="tests", producer_version="1.2", domain="org.tests",
                              model_version=7,
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("local", 1)])
    model.ir_version = 8
    helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    return model


def test_model_fields_functions_and_doc_strings_survive():
    original = _model_with_function()
    exported = _round_trip(original)
    assert {(o.domain, o.version) for o in exported.opset_import} == {("", 17), ("local", 1)}
    assert {p.key: p.value for p in exported.metadata_props} == {"author": "tests",
                                                                "license": "MIT"}
    assert exported.ir_version == 8
    assert (exported.producer_name, exported.producer_version) == ("tests", "1.2")
    assert (exported.domain, exported.model_version) == ("org.tests", 7)
    assert exported.doc_string == "model doc"
    assert exported.graph.doc_string == "graph doc"
    assert exported.graph.input[0].doc_string == "input doc"
    assert exported.graph.node[0].doc_string == "node doc"
    assert [f.SerializeToString() for f in exported.functions] == \
        [f.SerializeToString() for f in original.functions]
    onnx.checker.check_model(exported)
    feed = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run_onnx(exported, {"x": feed})[0], 3 * feed)


def test_initializer_listed_as_input_becomes_constant():
    """IR version 3 files list weights among the inputs; the IR treats them as constants."""
    proto = conv_bn_relu_gemm()
    for tensor in proto.graph.initializer:
        proto.graph.input.append(helper.make_tensor_value_info(
            tensor.name, tensor.data_type, list(tensor.dims)))
    proto.ir_version = 3
    model = ir.load_model(proto)
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert model.graph.initializers["w"].is_constant
    exported = ir.to_onnx(model)
    assert exported.ir_version >= 4
    assert [i.name for i in exported.graph.input] == ["x"]
    feed = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(exported, {"x": feed})[0],
                               run_onnx(conv_bn_relu_gemm(), {"x": feed})[0], rtol=1e-6)


# -- nodes: omitted inputs/outputs, attributes ---------------------------------------------------------
def test_omitted_optional_inputs_and_outputs_survive():
    nodes = [helper.make_node("Clip", ["x", "", "hi"], ["c"]),
             helper.make_node("Dropout", ["c"], ["y", ""])]
    graph = helper.make_graph(
        nodes, "optional",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array(1.5, np.float32), "hi")])
    model = ir.load_model(_model(graph))
    clip, dropout = model.graph.nodes
    assert clip.input(1) is None and clip.inputs[2].is_constant
    assert len(dropout.outputs) == 2 and dropout.outputs[1] is None
    exported = ir.to_onnx(model)
    assert list(exported.graph.node[0].input) == ["x", "", "hi"]
    assert list(exported.graph.node[1].output) == ["y", ""]
    feed = np.array([-3, 0, 1, 2], np.float32)
    np.testing.assert_array_equal(run_onnx(exported, {"x": feed})[0], [-3, 0, 1, 1.5])


def _attribute_zoo() -> onnx.ModelProto:
    """One custom-domain node carrying every attribute type, including empty lists."""
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["body_out"])], "body", [],
                             [helper.make_tensor_value_info("body_out", TensorProto.FLOAT, [2])])
    node = helper.make_node("Everything", ["x"], ["y"], domain="custom")
    node.attribute.extend([
        helper.make_attribute("f", 0.25),
        helper.make_attribute("i", -3),
        helper.make_attribute("s", "text"),
        helper.make_attribute("raw", b"\xff\x00"),  # not UTF-8: kept as bytes
        helper.make_attribute("t", numpy_helper.from_array(np.arange(3, dtype=np.int32))),
        helper.make_attribute("g", body),
        helper.make_attribute("floats", [1.0, 2.5]),
        helper.make_attribute("ints", [4, 5, 6]),
        helper.make_attribute("strings", ["a", "b"]),
        helper.make_attribute("tensors", [numpy_helper.from_array(np.ones(2, np.float16))]),
        helper.make_attribute("graphs", [body]),
        helper.make_attribute("empty_ints", [], attr_type=AttributeProto.INTS),
        helper.make_attribute("empty_floats", [], attr_type=AttributeProto.FLOATS),
        helper.make_attribute("empty_strings", [], attr_type=AttributeProto.STRINGS),
        helper.make_attribute("zero_float", 0.0),
    ])
    graph = helper.make_graph(
        [node], "attributes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return _model(graph, custom=1)


def _attribute_summary(attr: AttributeProto):
    value = helper.get_attribute_value(attr)
    if attr.type == AttributeProto.GRAPH:
        value = [n.op_type for n in value.node]
    elif attr.type == AttributeProto.GRAPHS:
        value = [[n.op_type for n in g.node] for g in value]
    elif attr.type == AttributeProto.TENSOR:
        value = (value.data_type, numpy_helper.to_array(value).tolist())
    elif attr.type == AttributeProto.TENSORS:
        value = [(t.data_type, numpy_helper.to_array(t).tolist()) for t in value]
    return attr.type, value


def test_every_attribute_type_survives_with_its_type():
    original = _attribute_zoo()
    exported = _round_trip(original)
    want = {a.name: _attribute_summary(a) for a in original.graph.node[0].attribute}
    got = {a.name: _attribute_summary(a) for a in exported.graph.node[0].attribute}
    assert got == want


# -- types: non-tensor values, low-precision constants, external data ---------------------------------
def test_sequence_and_optional_types_survive():
    nodes = [helper.make_node("SequenceConstruct", ["x", "x"], ["seq"]),
             helper.make_node("Optional", ["x"], ["opt"])]
    seq_type = helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [2])
    opt_type = helper.make_value_info(
        "opt", helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT,
                                                                             [2])))
    graph = helper.make_graph(nodes, "types",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [seq_type, opt_type])
    exported = _round_trip(_model(graph, 18))
    assert exported.graph.output[0].type == seq_type.type
    assert exported.graph.output[1].type == opt_type.type
    feed = np.array([1.0, 2.0], np.float32)
    seq, opt = run_onnx(exported, {"x": feed})
    assert len(seq) == 2 and np.array_equal(seq[1], feed) and np.array_equal(opt, feed)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
                                   ml_dtypes.float8_e5m2, ml_dtypes.int4, ml_dtypes.uint4,
                                   np.float16, np.bool_, np.uint64])
def test_low_precision_constants_are_bit_exact(dtype):
    values = np.array([[-2, -1, 0, 1], [2, 3, 0.5, 7]], np.float32)
    array = values.astype(dtype) if dtype is not np.bool_ else values > 0
    tensor = numpy_helper.from_array(array, "c")
    graph = helper.make_graph([helper.make_node("Identity", ["c"], ["y"])], "lowp", [],
                              [helper.make_tensor_value_info("y", tensor.data_type, [2, 4])],
                              [tensor])
    model = ir.load_model(_model(graph, 21))
    constant = model.graph.initializers["c"]
    assert constant.dtype == np.dtype(dtype)
    exported = ir.to_onnx(model)
    assert exported.graph.initializer[0].data_type == tensor.data_type
    assert exported.graph.output[0].type.tensor_type.elem_type == tensor.data_type
    np.testing.assert_array_equal(
        numpy_helper.to_array(exported.graph.initializer[0]).view(np.uint8),
        array.view(np.uint8))


def test_string_constants_survive():
    tensor = helper.make_tensor("words", TensorProto.STRING, [2], [b"alpha", "\u00e9t\u00e9".encode()])
    graph = helper.make_graph([helper.make_node("Identity", ["words"], ["y"])], "strings", [],
                              [helper.make_tensor_value_info("y", TensorProto.STRING, [2])],
                              [tensor])
    exported = _round_trip(_model(graph))
    (out,) = run_onnx(exported, {})
    assert out.tolist() == ["alpha", "\u00e9t\u00e9"]


def test_external_data_is_loaded_next_to_the_model(tmp_path):
    proto = conv_bn_relu_gemm()
    onnx.save_model(onnx.ModelProto.FromString(proto.SerializeToString()), tmp_path / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size > 0
    model = ir.load_model(tmp_path / "model.onnx")
    expected = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w"))
    np.testing.assert_array_equal(model.graph.initializers["w"].const, expected)

    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ir.ModelLoadError):
        ir.load_model(tmp_path / "model.onnx")


# -- bad files ---------------------------------------------------------------------------------------
def test_missing_file_raises_model_load_error(tmp_path):
    with pytest.raises(ir.ModelLoadError, match="not found"):
        ir.load_model(tmp_path / "absent.onnx")
    with pytest.raises(ir.ModelLoadError, match="not a file"):
        ir.load_model(tmp_path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_file_raises_model_load_error(tmp_path, fraction):
    data = conv_bn_relu_gemm().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(ir.ModelLoadError):
        ir.load_model(path)


@pytest.mark.parametrize("content", [b"", b"this is not an onnx model\n", b"\x89PNG\r\n\x1a\n" * 8,
                                     b"\x08\x07"])
def test_non_onnx_file_raises_model_load_error(tmp_path, content):
    path = tmp_path / "bogus.onnx"
    path.write_bytes(content)
    with pytest.raises(ir.ModelLoadError):
        ir.load_model(path)


def test_dangling_reference_is_refused():
    graph = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["y"])], "bad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ir.GraphError, match="undefined"):
        ir.load_model(_model(graph))


def test_sibling_subgraphs_may_reuse_a_name():
    """ONNX allows then/else branches to define the same name; the IR renames one of them."""
    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["x"], ["out"])], name, [],
                                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("then", "Neg"),
                            else_branch=branch("else", "Relu"))
    graph = helper.make_graph(
        [node], "siblings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = ir.load_model(_model(graph))
    ir.check_model(model)
    exported = ir.to_onnx(model)
    onnx.checker.check_model(exported, full_check=True)
    feed = np.array([-1.0, 2.0], np.float32)
    for cond, expected in ((True, -feed), (False, np.maximum(feed, 0))):
        (out,) = run_onnx(exported, {"x": feed, "c": np.array(cond)})
        np.testing.assert_array_equal(out, expected)


def test_duplicate_name_in_one_graph_is_refused():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["a"])]
    graph = helper.make_graph(nodes, "dup", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                           [1])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])])
    with pytest.raises(ir.GraphError, match="duplicate"):
        ir.load_model(_model(graph))


def test_numeric_attribute_set_by_a_pass_as_numpy_keeps_its_type():
    model = ir.load_model(conv_bn_relu_gemm())
    conv = model.graph.find_node("conv")
    conv.attrs["pads"] = np.array([1, 1, 1, 1], np.int64)  # e.g. computed by a rewrite
    model.graph.find_node("bn").attrs["epsilon"] = np.float32(1e-5)
    exported = ir.to_onnx(model)
    pads = next(a for a in exported.graph.node[0].attribute if a.name == "pads")
    assert (pads.type, list(pads.ints)) == (AttributeProto.INTS, [1, 1, 1, 1])
    epsilon = next(a for a in exported.graph.node[1].attribute if a.name == "epsilon")
    assert epsilon.type == AttributeProto.FLOAT
    onnx.checker.check_model(exported)


def test_unnamed_nodes_get_names_that_no_value_uses():
    """An unnamed Relu must not be named "Relu" when a value later in the file is called so."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["Relu"])]
    graph = helper.make_graph(nodes, "names",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("Relu", TensorProto.FLOAT, [2])])
    model = ir.load_model(_model(graph))
    names = [n.name for n in model.graph.nodes]
    assert all(names) and len(set(names)) == 2 and "Relu" not in names
    assert [v.name for v in model.graph.outputs] == ["Relu"]


def test_copy_model_is_independent_and_equal():
    model = ir.load_model(conv_bn_relu_gemm())
    copy = ir.copy_model(model)
    assert ir.to_onnx(copy).SerializeToString() == ir.to_onnx(model).SerializeToString()
    weight = next(v for v in copy.graph.initializers.values() if v.const.ndim == 4)
    weight.const = np.zeros_like(weight.const)
    assert np.abs(model.graph.initializers[weight.name].const).sum() > 0
