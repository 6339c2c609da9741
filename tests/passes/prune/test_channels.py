"""prune-channels: removing channels whose weights are zero must not change the outputs at all;
groups couple residual partners, depthwise convs, Concat inputs and Flatten->Gemm spans."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import passes
from passes.prune import analyze_groups
from tests.helpers import run_onnx

RNG = np.random.default_rng(0)


def _model(nodes, inits, x_shape, y_shape):
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _dead_channels(weight, bias, dead):
    """Zero the weights and bias of output channels `dead` (their activation is then 0)."""
    weight, bias = weight.copy(), bias.copy()
    weight[dead] = 0
    bias[dead] = 0
    return weight, bias


def _assert_same_outputs(original, pruned, x_shape):
    x = RNG.standard_normal(x_shape).astype(np.float32)
    np.testing.assert_allclose(run_onnx(pruned, {"x": x})[0], run_onnx(original, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_conv_relu_conv_prunes_dead_channels_exactly():
    w1, b1 = _dead_channels(RNG.standard_normal((16, 3, 3, 3)), RNG.standard_normal(16),
                            [1, 3, 4, 7, 9, 10, 12, 15])
    inits = {"w1": w1, "b1": b1, "w2": RNG.standard_normal((8, 16, 3, 3)), "b2": np.zeros(8)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], pads=[1] * 4)]
    original = _model(nodes, inits, [1, 3, 6, 6], [1, 8, 6, 6])
    pruned = passes.apply(original, "prune-channels:ratio=0.5")
    weights = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert sorted(weights.values()) == [[8], [8], [8, 3, 3, 3], [8, 8, 3, 3]]
    _assert_same_outputs(original, pruned, [1, 3, 6, 6])


def test_residual_add_couples_both_branches_and_depthwise_follows():
    dead = [0, 2, 5, 6, 8, 11, 13, 14]
    w1, b1 = _dead_channels(RNG.standard_normal((16, 3, 1, 1)), RNG.standard_normal(16), dead)
    w2, b2 = _dead_channels(RNG.standard_normal((16, 3, 1, 1)), RNG.standard_normal(16), dead)
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": b2,
             "wd": RNG.standard_normal((16, 1, 3, 3)), "bd": np.zeros(16),
             "fc": RNG.standard_normal((16 * 4 * 4, 5)), "fb": RNG.standard_normal(5)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"]),
             helper.make_node("Conv", ["x", "w2", "b2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("Conv", ["s", "wd", "bd"], ["d"], group=16, pads=[1] * 4),
             helper.make_node("Flatten", ["d"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["m"]),
             helper.make_node("Add", ["m", "fb"], ["y"])]
    original = _model(nodes, inits, [1, 3, 4, 4], [1, 5])
    model = ir.load_model(original)
    passes.prepare(model)
    (group,) = [g for g in analyze_groups(model.graph) if g.prunable]
    assert group.size == 16 and len(group.sources) == 2
    pruned = passes.apply(original, "prune-channels:ratio=0.5")
    dims = {t.name.split("_")[0]: list(t.dims) for t in pruned.graph.initializer}
    assert dims["wd"] == [8, 1, 3, 3] and dims["fc"] == [8 * 16, 5]
    assert [a.i for n in pruned.graph.node if n.op_type == "Conv" and
            any(a.name == "group" for a in n.attribute) for a in n.attribute
            if a.name == "group"] == [8]
    _assert_same_outputs(original, pruned, [1, 3, 4, 4])


def test_concat_output_follows_its_inputs():
    dead = [1, 2, 3, 4, 9, 10, 11, 12]
    w1, b1 = _dead_channels(RNG.standard_normal((16, 3, 1, 1)), RNG.standard_normal(16), dead)
    inits = {"w1": w1, "b1": b1, "w2": RNG.standard_normal((8, 3, 1, 1)), "b2": np.zeros(8),
             "w3": RNG.standard_normal((4, 24, 1, 1)), "b3": np.zeros(4)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"]),
             helper.make_node("Conv", ["x", "w2", "b2"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("Conv", ["c", "w3", "b3"], ["y"])]
    original = _model(nodes, inits, [1, 3, 4, 4], [1, 4, 4, 4])
    pruned = passes.apply(original, "prune-channels:ratio=0.5")
    dims = sorted(list(t.dims) for t in pruned.graph.initializer if len(t.dims) == 4)
    assert [4, 16, 1, 1] in dims  # consumer keeps 8 of a's 16 and all of b's 8
    _assert_same_outputs(original, pruned, [1, 3, 4, 4])


def test_unknown_op_freezes_and_graph_output_freezes():
    inits = {"w": RNG.standard_normal((8, 3, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Hardmax", ["c"], ["y"], axis=1)]
    model = ir.load_model(_model(nodes, inits, [1, 3, 2, 2], [1, 8, 2, 2]))
    passes.prepare(model)
    groups = [g for g in analyze_groups(model.graph) if g.sources]
    assert len(groups) == 1 and not groups[0].prunable
    assert any("Hardmax" in reason for reason in groups[0].frozen)
    report = passes.compress(model, "prune-channels:ratio=0.5")
    assert report.after["params"] == report.before["params"]


def test_never_prunes_to_zero_and_rounds_to_multiple():
    inits = {"w1": RNG.standard_normal((20, 3, 1, 1)), "w2": RNG.standard_normal((4, 20, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"]),
             helper.make_node("Conv", ["c", "w2"], ["y"])]
    original = _model(nodes, inits, [1, 3, 2, 2], [1, 4, 2, 2])
    for ratio, kept in ((0.9, 8), (0.5, 8), (0.2, 16)):
        pruned = passes.apply(original, f"prune-channels:ratio={ratio}:round_to=8")
        assert [list(t.dims) for t in pruned.graph.initializer if t.dims[0] != 4] == [[kept, 3, 1, 1]]


@pytest.mark.parametrize("bad", ["ratio=1.5", "criterion=random", "round_to=0"])
def test_bad_options(bad):
    with pytest.raises(passes.OptionError):
        model = ir.load_model(_model([helper.make_node("Relu", ["x"], ["y"])], {}, [1, 2], [1, 2]))
        passes.compress(model, f"prune-channels:{bad}")
