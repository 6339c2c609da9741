"""Gradient rules (`passes.vjp`) against finite differences, and the output-sensitivity metric
(`passes.output_sensitivity`) against the exact J^T J of small graphs."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
from passes.calibration import CalibrationSet, make_session
from passes.output_sensitivity import NotDifferentiable, _backward, _path_nodes, \
    output_sensitivity

RNG = np.random.default_rng(5)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return proto


def _const(shape, positive=False):
    array = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(array) + 0.5 if positive else array


# (op, attributes, input shapes, constant inputs {index: array}, positive inputs)
CASES = [
    ("Add", {}, [(2, 3), (3,)], {}, False),
    ("Sub", {}, [(2, 3), (2, 1)], {}, False),
    ("Mul", {}, [(2, 3), (2, 3)], {}, False),
    ("Div", {}, [(2, 3), (1, 3)], {}, True),
    ("Pow", {}, [(2, 3)], {1: np.array(3.0, np.float32)}, True),
    ("MatMul", {}, [(2, 3, 4), (4, 5)], {}, False),
    ("MatMul", {}, [(2, 3, 4), (2, 4, 5)], {}, False),
    ("Gemm", {"transB": 1, "alpha": 0.5}, [(3, 4)], {1: _const((5, 4)), 2: _const((5,))}, False),
    ("Relu", {}, [(2, 5)], {}, False),
    ("Sigmoid", {}, [(2, 5)], {}, False),
    ("Tanh", {}, [(2, 5)], {}, False),
    ("Erf", {}, [(2, 5)], {}, False),
    ("Exp", {}, [(2, 5)], {}, False),
    ("Sqrt", {}, [(2, 5)], {}, True),
    ("Log", {}, [(2, 5)], {}, True),
    ("Gelu", {}, [(2, 5)], {}, False),
    ("HardSwish", {}, [(2, 5)], {}, False),
    ("Clip", {}, [(2, 5)], {1: np.array(-0.5, np.float32), 2: np.array(0.5, np.float32)}, False),
    ("Reshape", {}, [(2, 6)], {1: np.array([3, 4], np.int64)}, False),
    ("Transpose", {"perm": [2, 0, 1]}, [(2, 3, 4)], {}, False),
    ("Unsqueeze", {}, [(2, 3)], {1: np.array([1], np.int64)}, False),
    ("Concat", {"axis": 1}, [(2, 3), (2, 2)], {}, False),
    ("Split", {"axis": 1}, [(2, 4)], {1: np.array([1, 3], np.int64)}, False),
    ("Slice", {}, [(3, 6)], {1: np.array([1], np.int64), 2: np.array([5], np.int64),
                            3: np.array([1], np.int64), 4: np.array([2], np.int64)}, False),
    ("Softmax", {"axis": -1}, [(2, 3, 4)], {}, False),
    ("LayerNormalization", {"axis": -1, "epsilon": 1e-5}, [(2, 3, 6)],
     {1: _const((6,)), 2: _const((6,))}, False),
    ("ReduceSum", {"keepdims": 0}, [(2, 3, 4)], {1: np.array([1], np.int64)}, False),
    ("ReduceMean", {"axes": [-1], "keepdims": 1}, [(2, 3, 4)], {}, False),
    ("ReduceL2", {"axes": [1], "keepdims": 1}, [(2, 3, 4)], {}, False),
    ("Where", {}, [(2, 3), (2, 3)], {}, False),
    ("Expand", {}, [(1, 3)], {1: np.array([4, 3], np.int64)}, False),
    ("Conv", {"pads": [1, 0, 2, 1], "strides": [2, 1]}, [(2, 3, 5, 4)],
     {1: _const((4, 3, 3, 2))}, False),
    ("Conv", {"group": 2, "strides": [2, 1], "auto_pad": "SAME_UPPER"}, [(1, 4, 6, 5)],
     {1: _const((6, 2, 2, 3)), 2: _const((6,))}, False),
    ("Conv", {"group": 3, "dilations": [2]}, [(1, 3, 7)], {1: _const((3, 1, 3))}, False),
    ("BatchNormalization", {}, [(2, 3, 4, 4)], {1: _const((3,)), 2: _const((3,)),
                                                3: _const((3,)), 4: _const((3,), True)}, False),
    ("GlobalAveragePool", {}, [(2, 3, 4, 5)], {}, False),
    ("Flatten", {"axis": 1}, [(2, 3, 4)], {}, False),
]


def _case_model(op, attrs, shapes, constants, positive):
    """One node; variable inputs x0.. are graph inputs, constants are initializers, and Where's
    condition is a constant first input."""
    names, inputs, inits, feeds = [], [], [], {}
    variable = iter(range(len(shapes)))
    total = len(shapes) + len(constants) + (op == "Where")
    for index in range(total):
        if op == "Where" and index == 0:
            inits.append(("cond", RNG.random((2, 3)) > 0.5))
            names.append("cond")
        elif index in constants:
            inits.append((f"c{index}", constants[index]))
            names.append(f"c{index}")
        else:
            position = next(variable)
            name = f"x{position}"
            names.append(name)
            inputs.append((name, shapes[position]))
            feeds[name] = _const(shapes[position], positive)
    outputs = ["y0", "y1"] if op == "Split" else ["y0"]
    node = helper.make_node(op, names, outputs, name="n", **attrs)
    return _model([node], inputs, outputs, inits, 20 if op == "Gelu" else 17), feeds, outputs


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_rule_matches_finite_differences(case):
    proto, feeds, outputs = _case_model(*case)
    model = ir.load_model(proto)
    session = make_session(proto)
    forward = dict(feeds)
    forward.update(zip(outputs, session.run(outputs, feeds)))
    seeds = {name: RNG.standard_normal((1, *forward[name].shape)).astype(np.float32)
             for name in outputs}
    values = [model.graph.values()[name] for name in feeds]
    path = _path_nodes(model.graph, values, [model.graph.values()[n] for n in outputs])
    grads = _backward(model, path, forward, seeds, set(feeds))

    def objective(name, array):
        results = session.run(outputs, {**feeds, name: array})
        return sum(float((seeds[o][0] * r).astype(np.float64).sum())
                   for o, r in zip(outputs, results))

    step = 1e-2
    for name, x in feeds.items():
        numeric = np.zeros(x.size)
        for i in range(x.size):
            plus, minus = x.copy().ravel(), x.copy().ravel()
            plus[i] += step
            minus[i] -= step
            numeric[i] = (objective(name, plus.reshape(x.shape))
                          - objective(name, minus.reshape(x.shape))) / (2 * step)
        analytic = np.asarray(grads[name][0], np.float64).ravel()
        np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=2e-3 * max(
            1.0, np.abs(numeric).max()))


@pytest.mark.parametrize("op, attrs, shapes", [
    ("MatMul", {}, [(2, 3, 4), (4, 5), (2, 3, 5)]),
    ("Gemm", {"transB": 1}, [(3, 4), (5, 4), (3, 5)]),
])
def test_matmul_and_gemm_leave_out_the_gradients_not_wanted(op, attrs, shapes):
    from passes.vjp import pull_back
    proto = _model([helper.make_node(op, ["a", "b"], ["y"], name="n", **attrs)],
                   [("a", shapes[0]), ("b", shapes[1])], ["y"])
    node = ir.load_model(proto).graph.nodes[0]
    a, b, y = (_const(shape) for shape in shapes)
    grad = RNG.standard_normal((3, *shapes[2])).astype(np.float32)
    every = pull_back(node, [grad], [a, b], [y], 17)
    only_a = pull_back(node, [grad], [a, b], [y], 17, wanted=[True, False])
    only_b = pull_back(node, [grad], [a, b], [y], 17, wanted=[False, True])
    assert only_a[1] is None and only_b[0] is None
    np.testing.assert_array_equal(only_a[0], every[0])
    np.testing.assert_array_equal(only_b[1], every[1])


B = _const((6, 5))


def _two_layer_net(reader):
    """x -> MatMul(A) = h -> `reader`: the sensitivity of h is J^T J of the reader."""
    a = _const((4, 6))
    nodes = [helper.make_node("MatMul", ["x", "a"], ["h"], name="fc")] + reader
    return _model(nodes, [("x", (1, 3, 4))], ["y"], [("a", a), ("b", B)])


def test_matrix_estimate_converges_to_exact_gauss_newton():
    # y = h @ B per row: J^T J = B B^T for every token.
    proto = _two_layer_net([helper.make_node("MatMul", ["h", "b"], ["y"], name="out")])
    model = ir.load_model(proto)
    calib = CalibrationSet({"x": RNG.standard_normal((64, 1, 3, 4)).astype(np.float32)})
    h = model.graph.values()["h"]
    exact = B.astype(np.float64) @ B.T
    estimate = output_sensitivity(model, [h], calib, 64, probes=32, matrix=True)["h"]
    assert estimate.shape == (6, 6)
    assert np.linalg.norm(estimate - exact) / np.linalg.norm(exact) < 0.1
    diagonal = output_sensitivity(model, [h], calib, 64, probes=32)["h"]
    np.testing.assert_allclose(diagonal, np.diag(estimate), rtol=1e-6)


def test_padding_rows_and_channel_axis():
    # The mask's zero positions contribute nothing; the rows averaged are the real ones.
    nodes = [helper.make_node("Mul", ["x", "s"], ["y"], name="scale")]
    proto = _model(nodes, [("x", (1, 4, 3))], ["y"], [("s", np.array([1, 2, 3], np.float32))])
    graph = proto.graph
    graph.input.append(helper.make_tensor_value_info("mask", TensorProto.INT64, [1, 4]))
    model = ir.load_model(proto)
    mask = np.array([[[1, 1, 0, 0]]] * 8, np.int64)
    calib = CalibrationSet({"x": RNG.standard_normal((8, 1, 4, 3)).astype(np.float32),
                            "mask": mask})
    x = model.graph.values()["x"]
    diagonal = output_sensitivity(model, [x], calib, 8, mask_name="mask", probes=8)["x"]
    np.testing.assert_allclose(diagonal, [1, 4, 9], rtol=1e-6)  # signs squared are exactly 1
    first_axis = output_sensitivity(model, [x], calib, 8, mask_name="mask", probes=8,
                                    channel_axis={"x": 1})["x"]
    assert first_axis.shape == (4,)


def test_outputs_the_value_does_not_reach_and_errors():
    proto = _two_layer_net([helper.make_node("TopK", ["h", "k"], ["y", "i"], name="top")])
    proto.graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "k"))
    model = ir.load_model(proto)
    calib = CalibrationSet({"x": RNG.standard_normal((4, 1, 3, 4)).astype(np.float32)})
    h = model.graph.values()["h"]
    with pytest.raises(NotDifferentiable, match="TopK"):
        output_sensitivity(model, [h], calib, 4)
    with pytest.raises(KeyError, match="nope"):
        output_sensitivity(model, [h], calib, 4, outputs=["nope"])
    # A value with no path to the chosen output has zero sensitivity.
    proto = _model([helper.make_node("MatMul", ["x", "a"], ["h"], name="fc"),
                    helper.make_node("Relu", ["x2"], ["y"], name="other")],
                   [("x", (1, 3, 4)), ("x2", (1, 3, 6))], ["y", "h"], [("a", _const((4, 6)))])
    model = ir.load_model(proto)
    calib = CalibrationSet({"x": RNG.standard_normal((4, 1, 3, 4)).astype(np.float32),
                            "x2": RNG.standard_normal((4, 1, 3, 6)).astype(np.float32)})
    sensitivity = output_sensitivity(model, [model.graph.values()["x"]], calib, 4,
                                     outputs=["y"])
    assert sensitivity["x"].shape == (4,) and not sensitivity["x"].any()


def test_several_outputs_count_relative_to_their_size():
    # y1 = 100 * h and y2 = h: relative to their energies both outputs move alike, so the
    # sensitivity is twice that of one output alone (up to the energies' normalization).
    nodes = [helper.make_node("Mul", ["x", "big"], ["y1"], name="big_copy"),
             helper.make_node("Identity", ["x"], ["y2"], name="copy")]
    proto = _model(nodes, [("x", (1, 2, 3))], ["y1", "y2"],
                   [("big", np.array(100.0, np.float32))])
    model = ir.load_model(proto)
    calib = CalibrationSet({"x": RNG.standard_normal((16, 1, 2, 3)).astype(np.float32)})
    x = model.graph.values()["x"]
    both = output_sensitivity(model, [x], calib, 16, probes=64)["x"]
    small = output_sensitivity(model, [x], calib, 16, outputs=["y2"], probes=64)["x"]
    energy = np.mean([float((calib.arrays["x"][i] ** 2).sum()) for i in range(16)])
    np.testing.assert_allclose(both, 2 / energy, rtol=0.1)
    np.testing.assert_allclose(small, 1.0, rtol=1e-6)
