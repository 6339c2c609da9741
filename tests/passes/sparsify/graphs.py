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


def residual_mlp(width=32, hidden=64, blocks=3, tokens=8, seed=0, up_bias=False):
    """x[1, tokens, width] -> fc_in -> blocks of (up (+ bias with `up_bias`) -> Relu -> down
    (+ bias) -> Add stream -> LayerNormalization), post-LN like BERT -> fc_out -> y. Names:
    up{i}, down{i}, res{i}."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def weight(name, rows, cols):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32), name))

    def vector(name, size, value=None):
        data = rng.standard_normal(size) * 0.1 if value is None else np.full(size, value)
        inits.append(numpy_helper.from_array(data.astype(np.float32), name))

    weight("w_in", width, width)
    nodes.append(helper.make_node("MatMul", ["x", "w_in"], ["s0"], name="fc_in"))
    stream = "s0"
    for i in range(blocks):
        weight(f"w_up{i}", width, hidden)
        weight(f"w_down{i}", hidden, width)
        vector(f"b_down{i}", width)
        vector(f"gamma{i}", width, 1.0)
        vector(f"beta{i}", width)
        up = [helper.make_node("MatMul", [stream, f"w_up{i}"], [f"u{i}"], name=f"up{i}")]
        if up_bias:
            vector(f"b_up{i}", hidden)
            up = [helper.make_node("MatMul", [stream, f"w_up{i}"], [f"um{i}"], name=f"up{i}"),
                  helper.make_node("Add", [f"um{i}", f"b_up{i}"], [f"u{i}"], name=f"up_bias{i}")]
        nodes += up + [
            helper.make_node("Relu", [f"u{i}"], [f"a{i}"], name=f"relu{i}"),
            helper.make_node("MatMul", [f"a{i}", f"w_down{i}"], [f"d{i}"], name=f"down{i}"),
            helper.make_node("Add", [f"d{i}", f"b_down{i}"], [f"db{i}"], name=f"bias{i}"),
            helper.make_node("Add", [f"db{i}", stream], [f"r{i}"], name=f"res{i}"),
            helper.make_node("LayerNormalization", [f"r{i}", f"gamma{i}", f"beta{i}"],
                             [f"s{i + 1}"], axis=-1, name=f"ln{i}"),
        ]
        stream = f"s{i + 1}"
    weight("w_out", width, 8)
    nodes.append(helper.make_node("MatMul", [stream, "w_out"], ["y"], name="fc_out"))
    graph = helper.make_graph(
        nodes, "residual_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
