"""The cleanup passes on small graphs: fold-batchnorm numerics and remove-identity naming.

(These exercise the IR's rewrite primitives — set_input, replace_all_uses_with, remove_node — as
the passes use them; numerics are compared with onnxruntime on the original model.)
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
from passes import PassManager, build_pipeline
from passes.cleanup import FoldBatchNorm, RemoveIdentity
from passes.core import PassContext
from tests.helpers import conv_bn_relu_gemm, run_onnx

RNG_SEED = 0


def _bn_constants(rng, channels):
    return [numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "gamma"),
            numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "beta"),
            numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "mean"),
            numpy_helper.from_array(rng.uniform(0.5, 2.0, channels).astype(np.float32), "var")]


def _layer_then_bn(layer: onnx.NodeProto, weights, x_shape, channels) -> onnx.ModelProto:
    rng = np.random.default_rng(RNG_SEED + 1)
    nodes = [layer, helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"],
                                     ["y"], name="bn", epsilon=1e-3)]
    graph = helper.make_graph(nodes, "layer_bn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              weights + _bn_constants(rng, channels))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _tensor(rng, name, shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _conv_bn():
    rng = np.random.default_rng(RNG_SEED)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", pads=[1, 1, 1, 1])
    return _layer_then_bn(conv, [_tensor(rng, "w", (6, 4, 3, 3)), _tensor(rng, "b", (6,))],
                          [2, 4, 5, 5], 6)


def _grouped_conv_bn():
    rng = np.random.default_rng(RNG_SEED)
    conv = helper.make_node("Conv", ["x", "w"], ["h"], name="conv", group=2, strides=[2, 2])
    return _layer_then_bn(conv, [_tensor(rng, "w", (6, 2, 3, 3))], [2, 4, 7, 7], 6)


def _gemm_bn():
    rng = np.random.default_rng(RNG_SEED)
    gemm = helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="gemm", transB=1, alpha=0.5,
                            beta=2.0)
    return _layer_then_bn(gemm, [_tensor(rng, "w", (5, 8)), _tensor(rng, "b", (5,))], [3, 8], 5)


def _conv_transpose_bn():
    """Cin=4, group=2, Cout/group=3 -> 6 output channels; weight (Cin, Cout/group, kH, kW)."""
    rng = np.random.default_rng(RNG_SEED)
    deconv = helper.make_node("ConvTranspose", ["x", "w", "b"], ["h"], name="deconv", group=2,
                              strides=[2, 2])
    return _layer_then_bn(deconv, [_tensor(rng, "w", (4, 3, 3, 3)), _tensor(rng, "b", (6,))],
                          [2, 4, 4, 4], 6)


@pytest.mark.parametrize("build", [_conv_bn, _grouped_conv_bn, _gemm_bn, _conv_transpose_bn],
                         ids=["conv", "grouped-conv", "gemm", "conv-transpose-groups"])
def test_fold_batchnorm_matches_onnxruntime(build):
    proto = build()
    model = ir.load_model(proto)
    ir.infer_shapes(model)
    result = FoldBatchNorm().run(model, PassContext())
    assert result.details["folded"] == 1
    assert [n.op_type for n in model.graph.nodes] == [proto.graph.node[0].op_type]
    assert [v.name for v in model.graph.outputs] == ["y"]
    ir.check_model(model)

    x_shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    feed = np.random.default_rng(7).standard_normal(x_shape).astype(np.float32)
    (want,) = run_onnx(proto, {"x": feed})
    (got,) = run_onnx(ir.to_onnx(model), {"x": feed})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_leaves_shared_weights_and_other_readers_alone():
    """A Conv output read by BN *and* another node cannot absorb BN."""
    proto = _conv_bn()
    proto.graph.node.append(helper.make_node("Relu", ["h"], ["z"], name="extra"))
    proto.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    model = ir.load_model(proto)
    ir.infer_shapes(model)
    assert FoldBatchNorm().run(model, PassContext()).details["folded"] == 0
    assert "BatchNormalization" in [n.op_type for n in model.graph.nodes]


def test_cleanup_pipeline_on_conv_bn_relu_gemm_matches_onnxruntime():
    proto = conv_bn_relu_gemm()
    model = ir.load_model(proto)
    ir.infer_shapes(model)
    PassManager(build_pipeline("cleanup")).run(model)
    assert [n.op_type for n in model.graph.nodes] == ["Conv", "Relu", "GlobalAveragePool",
                                                       "Flatten", "Gemm"]
    feed = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(ir.to_onnx(model), {"x": feed})[0],
                               run_onnx(proto, {"x": feed})[0], rtol=1e-4, atol=1e-5)


# -- remove-identity ---------------------------------------------------------------------------------
def _identity_model(nodes, inputs=("x",), outputs=("y",), initializers=()):
    graph = helper.make_graph(
        nodes, "identity",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [3]) for name in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [3]) for name in outputs],
        list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run_pass(proto, pass_):
    model = ir.load_model(proto)
    ir.infer_shapes(model)
    result = pass_.run(model, PassContext())
    ir.check_model(model)
    return model, result


def test_identity_before_graph_output_is_removed_and_output_keeps_its_name():
    proto = _identity_model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                             helper.make_node("Identity", ["r"], ["y"], name="id"),
                             helper.make_node("Neg", ["y"], ["z"], name="neg")],
                            outputs=("y", "z"))
    model, result = _run_pass(proto, RemoveIdentity())
    assert result.details["removed"] == 1
    assert [n.op_type for n in model.graph.nodes] == ["Relu", "Neg"]
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    assert model.graph.nodes[1].input(0) is model.graph.outputs[0]
    exported = ir.to_onnx(model)
    feed = np.array([-1.0, 0.5, 2.0], np.float32)
    y, z = run_onnx(exported, {"x": feed})
    np.testing.assert_array_equal(y, np.maximum(feed, 0))
    np.testing.assert_array_equal(z, -np.maximum(feed, 0))


def test_identity_between_interface_names_is_kept():
    """x -> Identity -> y: both names are the model's interface, so the node must stay."""
    constant = numpy_helper.from_array(np.ones(3, np.float32), "c")
    proto = _identity_model([helper.make_node("Identity", ["x"], ["y"], name="in_out"),
                             helper.make_node("Identity", ["c"], ["w"], name="const_out")],
                            outputs=("y", "w"), initializers=[constant])
    model, result = _run_pass(proto, RemoveIdentity())
    assert result.details["removed"] == 0
    assert [v.name for v in model.graph.outputs] == ["y", "w"]


def test_inference_dropout_is_removed_training_dropout_is_kept():
    training = numpy_helper.from_array(np.array(True), "training")
    ratio = numpy_helper.from_array(np.array(0.5, np.float32), "ratio")
    proto = _identity_model([helper.make_node("Dropout", ["x"], ["d"], name="inference"),
                             helper.make_node("Dropout", ["d", "ratio", "training"], ["t"],
                                              name="training"),
                             helper.make_node("Relu", ["t"], ["y"], name="relu")],
                            initializers=[training, ratio])
    model, result = _run_pass(proto, RemoveIdentity())
    assert result.details["removed"] == 1
    assert [n.name for n in model.graph.nodes] == ["training", "relu"]


def test_training_dropout_on_constants_is_not_folded():
    """A training-mode Dropout's mask is random: folding it would freeze one draw."""
    data = numpy_helper.from_array(np.ones(3, np.float32), "data")
    training = numpy_helper.from_array(np.array(True), "training")
    ratio = numpy_helper.from_array(np.array(0.5, np.float32), "ratio")
    proto = _identity_model([helper.make_node("Dropout", ["data", "ratio", "training"], ["d"],
                                              name="dropout"),
                             helper.make_node("Add", ["x", "d"], ["y"], name="add")],
                            initializers=[data, training, ratio])
    model = ir.load_model(proto)
    ir.infer_shapes(model)
    PassManager(build_pipeline("cleanup")).run(model)
    assert [n.op_type for n in model.graph.nodes] == ["Dropout", "Add"]
