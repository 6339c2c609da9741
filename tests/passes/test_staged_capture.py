"""Staged captures: each stage's values equal a full run of the model as it is then, while only
the nodes past the kept frontier run."""

import numpy as np
import pytest

import ir
import passes
from passes.calibration import CalibrationSet, capture_session
from passes.staged_capture import StagedCapture
from tests.passes.sparsify.graphs import mlp, residual_mlp

# The inputs of up/down of each block of residual_mlp, and the stream the block adds to.
STAGES = [["s0"], ["a0", "s0"], ["s1"], ["a1", "s1"], ["s2"], ["a2", "s2"]]


def _feeds(count=5, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 8, 32)).astype(np.float32)} for _ in range(count)]


def _full_run(model, names, feeds):
    session = capture_session(model, names)
    return [dict(zip(names, session.run(names, feed))) for feed in feeds]


def _nodes(model):
    return {node.name: node for node in model.graph.nodes}


@pytest.mark.parametrize("budget", [None, 0])
def test_each_stage_matches_a_full_run_of_the_changed_model(budget):
    model = ir.load_model(residual_mlp())
    feeds = _feeds()
    staged = StagedCapture(model, feeds) if budget is None \
        else StagedCapture(model, feeds, budget_bytes=budget)
    nodes = _nodes(model)
    for index, names in enumerate(STAGES):
        got = list(staged.capture(names))
        expected = _full_run(model, names, feeds)
        assert len(got) == len(feeds)
        for ours, theirs in zip(got, expected):
            for name in names:
                np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-6)
        if budget == 0:
            assert staged.kept_names == set()
        else:
            assert staged.kept_names  # the stream at least is pending
        # Change the layers this stage fed (as sparsify does) and say so.
        block = index // 2
        changed = nodes[f"up{block}"] if index % 2 == 0 else nodes[f"down{block}"]
        changed.input(1).const = changed.input(1).const * np.float32(0.5)
        staged.invalidate([changed])


def test_the_frontier_is_what_later_nodes_read():
    model = ir.load_model(residual_mlp())
    staged = StagedCapture(model, _feeds())
    list(staged.capture(["a0", "s0"]))
    # a0 feeds down0, s0 the residual Add; u0 and the nodes before are no longer read.
    assert staged.kept_names == {"a0", "s0"}
    staged.invalidate([_nodes(model)["down0"]])
    assert staged.kept_names == {"a0", "s0"}  # both are upstream of down0
    staged.invalidate([_nodes(model)["fc_in"]])
    assert staged.kept_names == set()


def test_a_capture_stopped_early_keeps_nothing():
    model = ir.load_model(residual_mlp())
    feeds = _feeds()
    staged = StagedCapture(model, feeds)
    list(staged.capture(["s0"]))
    assert staged.kept_names == {"s0"}
    stream = staged.capture(["s1"])
    next(stream)
    stream.close()
    assert staged.kept_names == set()
    # ... and the next capture is still right.
    got = list(staged.capture(["s1"]))
    for ours, theirs in zip(got, _full_run(model, ["s1"], feeds)):
        np.testing.assert_allclose(ours["s1"], theirs["s1"], rtol=1e-6, atol=1e-6)


def test_without_keep_only_the_needed_nodes_run():
    model = ir.load_model(mlp())
    feeds = [{"x": np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)}]
    staged = StagedCapture(model, feeds, keep=False)
    got = next(staged.capture(["h0", "m1"]))
    expected = _full_run(model, ["h0", "m1"], feeds)[0]
    for name in ("h0", "m1"):
        np.testing.assert_array_equal(got[name], expected[name])
    assert staged.kept_names == set()


def test_sequential_sparsify_is_the_same_with_and_without_kept_activations(monkeypatch):
    import passes.sparsify.sparsify as sparsify_module
    spec = ("sparsify:pattern=nm:nm=2of4:method=sparsegpt:error_correction=true:"
            "bias_correction=true:residual_correction=true:min_size=0")
    rng = np.random.default_rng(3)
    calibration = {"x": rng.standard_normal((12, 1, 8, 32)).astype(np.float32)}

    def sparsified():
        model = ir.load_model(residual_mlp())
        passes.compress(model, spec, calibration=CalibrationSet(dict(calibration)))
        return {v.name: v.const for v in model.graph.values().values() if v.is_constant}

    staged = sparsified()
    monkeypatch.setattr(sparsify_module, "StagedCapture",
                        lambda model, feeds: StagedCapture(model, feeds, keep=False))
    from_inputs = sparsified()
    assert staged.keys() == from_inputs.keys()
    changed = [name for name in staged if name.endswith("_sparse")]
    assert len(changed) >= 4
    for name in staged:
        np.testing.assert_allclose(staged[name], from_inputs[name], rtol=1e-5, atol=1e-6)


def test_graphs_with_subgraphs_run_whole_and_keep_nothing():
    from onnx import TensorProto, helper, numpy_helper
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "then", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["n"])], "else", [],
                              [helper.make_tensor_value_info("n", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other),
         helper.make_node("Sigmoid", ["y"], ["z"])], "if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(True), "cond")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.load_model(proto)
    feeds = [{"x": np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)}]
    staged = StagedCapture(model, feeds)
    got = list(staged.capture(["y"]))
    np.testing.assert_array_equal(got[0]["y"], np.maximum(feeds[0]["x"], 0))
    assert staged.kept_names == set()
