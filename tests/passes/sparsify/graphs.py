"""Small seeded ONNX graphs for the sparsify tests."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def mlp(widths=(16, 32, 32, 32, 8), tokens=4, seed=0, gemm_head=False):
    """x[1, tokens, w0] -> MatMul -> Relu -> ... -> y; layers named fc0, fc1, ...

    With `gemm_head` the last layer is a Gemm (transB=1) on the flattened last token."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    layers = len(widths) - 1
    for i in range(layers):
        w_in, w_out = widths[i], widths[i + 1]
        last = i == layers - 1
        if last and gemm_head:
            nodes.append(helper.make_node("Flatten", [current], ["flat"], axis=1, name="flatten"))
            inits.append(numpy_helper.from_array(
                rng.standard_normal((w_out, w_in * tokens)).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("Gemm", ["flat", f"w{i}"], ["y"], transB=1,
                                          name=f"fc{i}"))
            out_shape = [1, w_out]
            break
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((w_in, w_out)) / np.sqrt(w_in)).astype(np.float32), f"w{i}"))
        out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [out if last else f"m{i}"],
                                      name=f"fc{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out], name=f"relu{i}"))
        current = out
        out_shape = [1, tokens, w_out]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def conv_net(seed=0):
    """x[1,4,8,8] -> Conv3x3(8) -> Relu -> Conv3x3(16, stride 2, dilation 1, pads 1) -> Relu
    -> Conv1x1(16, group 2) -> Relu -> Conv3x3(8, dilation 2, pads 2) -> y."""
    rng = np.random.default_rng(seed)
    specs = [  # (name, out, in_per_group, k, attrs)
        ("c0", 8, 4, 3, dict(pads=[1, 1, 1, 1])),
        ("c1", 16, 8, 3, dict(pads=[1, 1, 1, 1], strides=[2, 2])),
        ("c2", 16, 8, 1, dict(group=2)),
        ("c3", 8, 16, 3, dict(pads=[2, 2, 2, 2], dilations=[2, 2])),
    ]
    nodes, inits, current = [], [], "x"
    for index, (name, out, cin, k, attrs) in enumerate(specs):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((out, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32),
            f"{name}_w"))
        conv_out = "y" if index == len(specs) - 1 else f"{name}_out"
        nodes.append(helper.make_node("Conv", [current, f"{name}_w"], [conv_out], name=name,
                                      **attrs))
        if conv_out != "y":
            nodes.append(helper.make_node("Relu", [conv_out], [f"{name}_relu"], name=f"{name}_r"))
            current = f"{name}_relu"
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model, feeds):
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
