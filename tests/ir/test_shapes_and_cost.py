"""Shape inference, constant folding of exporter-style shape chains, BN folding, cost."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import passes
from tests.helpers import run_onnx


def _reshape_chain_model():
    """x[2,3,4] -> Reshape(x, Concat(Gather(Shape(x), 0), [-1])) -> [2,12]: what exporters emit."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_shape_chain_folds_into_a_constant_reshape_target():
    model = ir.load_model(_reshape_chain_model())
    report = passes.compress(model, "cleanup")
    assert [n.op_type for n in model.graph.nodes] == ["Reshape"]
    target = model.graph.nodes[0].input(1)
    assert target.is_constant and target.const.tolist() == [2, -1]
    assert model.graph.outputs[0].shape == (2, 12)
    assert report.after["nodes"] == 1


def _layer_bn_model(op):
    rng = np.random.default_rng(3)
    if op == "Conv":
        weight, shape, out_shape = rng.standard_normal((6, 4, 3, 3)), [1, 4, 5, 5], [1, 6, 3, 3]
        layer = helper.make_node("Conv", ["x", "w", "b"], ["h"])
    elif op == "ConvTranspose":
        weight, shape, out_shape = rng.standard_normal((4, 3, 2, 2)), [1, 4, 5, 5], [1, 6, 6, 6]
        layer = helper.make_node("ConvTranspose", ["x", "w", "b"], ["h"], group=2)
    else:
        weight, shape, out_shape = rng.standard_normal((6, 4)), [3, 4], [3, 6]
        layer = helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1, beta=0.5)
    params = [rng.uniform(0.5, 2, 6), rng.standard_normal(6), rng.standard_normal(6),
              rng.uniform(0.5, 2, 6)]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             zip([weight, rng.standard_normal(6), *params], ["w", "b", "g", "be", "m", "v"])]
    nodes = [layer, helper.make_node("BatchNormalization", ["h", "g", "be", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", 1, shape)],
                              [helper.make_tensor_value_info("y", 1, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), shape


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose", "Gemm"])
def test_batchnorm_folding_matches_onnxruntime(op):
    original, shape = _layer_bn_model(op)
    folded = passes.apply(original, "fold-batchnorm")
    assert [n.op_type for n in folded.graph.node] == [op]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(run_onnx(folded, {"x": x})[0], run_onnx(original, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


def test_remove_identity_keeps_output_names():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
        "id", [helper.make_tensor_value_info("x", 1, [2])],
        [helper.make_tensor_value_info("y", 1, [2])])
    out = passes.apply(helper.make_model(graph, ir_version=8), "remove-identity")
    assert [n.op_type for n in out.graph.node] == ["Relu"] and out.graph.output[0].name == "y"


def test_cost_counts_macs_params_and_bytes_by_hand():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((16, 5)).astype(np.float32), "m"),
             numpy_helper.from_array(np.array([8, 16], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "m"], ["y"])]
    graph = helper.make_graph(nodes, "cost", [helper.make_tensor_value_info("x", 1, [1, 4, 4, 4])],
                              [helper.make_tensor_value_info("y", 1, [8, 5])], inits)
    model = ir.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    ir.infer_shapes(model)
    cost = ir.graph_cost(model.graph)
    conv, _, matmul = model.graph.nodes
    # Conv: 8 out channels x 4x4 positions x (2 in-channels per group x 3x3).
    assert cost.per_node[conv.name].macs == 8 * 4 * 4 * 2 * 9
    # MatMul [8,16] @ [16,5].
    assert cost.per_node[matmul.name].macs == 8 * 5 * 16
    assert cost.macs == 8 * 4 * 4 * 2 * 9 + 8 * 5 * 16
    assert cost.params == 8 * 2 * 9 + 16 * 5  # int64 shape constant is not a parameter
    assert cost.bytes == (8 * 2 * 9 + 16 * 5) * 4 + 2 * 8
