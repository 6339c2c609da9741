"""MACs and parameter counts of Conv/Gemm/MatMul, checked against hand computations."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import ir


def _model(node, inputs, weights):
    graph = helper.make_graph(
        [node], "cost",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(array, name) for name, array in weights.items()])
    model = ir.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    ir.infer_shapes(model)
    return model


def test_conv_macs_and_params():
    # x[1,3,8,8], w[8,3,3,3], pad 1 -> y[1,8,8,8]; each output reads 3*3*3 inputs.
    w = np.ones((8, 3, 3, 3), np.float32)
    w[0] = 0.0  # 27 zeros
    model = _model(helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
                   [("x", [1, 3, 8, 8])], {"w": w, "b": np.ones(8, np.float32)})
    cost = ir.graph_cost(model.graph)
    assert cost.macs == (1 * 8 * 8 * 8) * (3 * 3 * 3) == 13824
    assert cost.params == 8 * 3 * 3 * 3 + 8
    assert cost.nonzero_params == cost.params - 27
    assert cost.bytes == (216 + 8) * 4


def test_grouped_strided_conv_macs():
    # x[2,4,9,9], group 2, w[6,2,3,3], stride 2, no pad -> y[2,6,4,4]; each output reads 2*3*3.
    model = _model(helper.make_node("Conv", ["x", "w"], ["y"], group=2, strides=[2, 2]),
                   [("x", [2, 4, 9, 9])], {"w": np.ones((6, 2, 3, 3), np.float32)})
    assert model.graph.outputs[0].shape == (2, 6, 4, 4)
    assert ir.graph_cost(model.graph).macs == (2 * 6 * 4 * 4) * (2 * 3 * 3) == 3456


def test_gemm_macs_with_transposed_weight():
    # x[2,8] @ w[4,8]^T -> y[2,4]: 2*4 outputs, 8 MACs each.
    model = _model(helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1),
                   [("x", [2, 8])], {"w": np.ones((4, 8), np.float32),
                                     "b": np.zeros(4, np.float32)})
    cost = ir.graph_cost(model.graph)
    assert cost.macs == 2 * 4 * 8 == 64
    assert (cost.params, cost.nonzero_params) == (36, 32)


def test_gemm_macs_with_transposed_input():
    # x[8,2]^T @ w[8,4] -> y[2,4]: the reduction is x's first axis.
    model = _model(helper.make_node("Gemm", ["x", "w"], ["y"], transA=1),
                   [("x", [8, 2])], {"w": np.ones((8, 4), np.float32)})
    assert ir.graph_cost(model.graph).macs == 2 * 4 * 8


def test_batched_matmul_macs():
    # x[2,5,6] @ w[6,7] -> y[2,5,7]: 70 outputs, 6 MACs each.
    model = _model(helper.make_node("MatMul", ["x", "w"], ["y"]),
                   [("x", [2, 5, 6])], {"w": np.ones((6, 7), np.float32)})
    assert ir.graph_cost(model.graph).macs == 2 * 5 * 7 * 6 == 420


def test_shape_constants_are_not_parameters():
    model = _model(helper.make_node("Reshape", ["x", "shape"], ["y"]),
                   [("x", [2, 6])], {"shape": np.array([3, 4], np.int64)})
    cost = ir.graph_cost(model.graph)
    assert (cost.macs, cost.params, cost.bytes) == (0, 0, 16)
