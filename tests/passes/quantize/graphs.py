"""Small seeded ONNX graphs for the quantize tests."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 13 else 8
    return model


def conv_chain(opset=17, depthwise=False, seed=0):
    """x[1,4,8,8] -> Conv(8,3x3,bias) -> Relu -> Conv(8, 3x3 or depthwise) -> Relu -> Conv(6,1x1)
    -> y. Channel ranges of conv1 differ by up to 100x so equalization has work to do."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 4, 3, 3)) * np.logspace(-1, 1, 8)[:, None, None, None]
    w2 = rng.standard_normal((8, 1, 3, 3) if depthwise else (8, 8, 3, 3))
    w3 = rng.standard_normal((6, 8, 1, 1))
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             [(w1, "w1"), (rng.standard_normal(8), "b1"), (w2, "w2"), (w3, "w3"),
              (rng.standard_normal(6), "b3")]]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                         group=8 if depthwise else 1),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])], inits,
                  opset)


def matmul_gemm(seed=0, trans_b=0):
    """x[1,5,16] -> MatMul(W [16,24]) -> Add(b) -> Relu -> Reshape [5,24] -> Gemm(12) -> y."""
    rng = np.random.default_rng(seed)
    gemm_w = rng.standard_normal((12, 24) if trans_b else (24, 12)) / 5
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             [(rng.standard_normal((16, 24)) / 4, "w"), (rng.standard_normal(24), "b"),
              (gemm_w, "gw"), (rng.standard_normal(12), "gb")]]
    inits.append(numpy_helper.from_array(np.array([5, 24], np.int64), "shape"))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "b"], ["a"], name="fc_bias"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["flat"], name="reshape"),
        helper.make_node("Gemm", ["flat", "gw", "gb"], ["y"], name="head", transB=trans_b),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 12])], inits)


def calibration(shape, n=64, seed=1, offset=0.0):
    return {"x": (np.random.default_rng(seed).standard_normal((n, *shape[1:])) + offset
                  ).astype(np.float32)}


def attention(seq=12, heads=2, head_dim=8, seed=0):
    """x[1,seq,H*D] -> Q/K/V MatMuls -> heads -> softmax(Q.K^T / sqrt(D)).V -> output MatMul -> y:
    two MatMuls of two activations (scores and probabilities x values) between four with
    constant weights."""
    rng = np.random.default_rng(seed)
    hidden = heads * head_dim
    inits = [numpy_helper.from_array((rng.standard_normal((hidden, hidden)) / 4)
                                     .astype(np.float32), name) for name in "qkvo"]
    inits += [numpy_helper.from_array(np.array([1, seq, heads, head_dim], np.int64), "split"),
              numpy_helper.from_array(np.array([1, seq, hidden], np.int64), "merge"),
              numpy_helper.from_array(np.array(np.sqrt(head_dim), np.float32), "root")]
    nodes = []
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["x", name], [f"{name}_x"], name=f"proj_{name}"),
                  helper.make_node("Reshape", [f"{name}_x", "split"], [f"{name}_s"]),
                  helper.make_node("Transpose", [f"{name}_s"], [f"{name}_h"], perm=perm)]
    nodes += [
        helper.make_node("MatMul", ["q_h", "k_h"], ["scores"], name="scores"),
        helper.make_node("Div", ["scores", "root"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_h"], ["context"], name="context"),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merge"], ["context_m"]),
        helper.make_node("MatMul", ["context_m", "o"], ["y"], name="proj_o"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, hidden])], inits)
