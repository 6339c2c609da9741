"""prune-layers bridge=linear: a removed block is replaced by y = x + x D + c fitted by least
squares; a block whose branch is affine is reproduced exactly, adjacent removed blocks are
bridged in order, and a nonlinear block is approximated better than by the identity."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import passes
from passes.core import OptionError
from passes.prune.bridge import fit_bridge
from tests.helpers import run_onnx

RNG = np.random.default_rng(5)
F, S = 6, 5


def _token_blocks(nonlinear=(False, False, True)):
    """x[1,S,F] -> 3 x (y = x + MatMul(act(MatMul(x) + b))) -> Tanh -> y."""
    nodes, inits, x = [], {}, "x"
    for i, bent in enumerate(nonlinear):
        inits.update({f"u{i}": RNG.standard_normal((F, 2 * F)) * 0.4,
                      f"b{i}": RNG.standard_normal(2 * F) * 0.4,
                      f"d{i}": RNG.standard_normal((2 * F, F)) * 0.4})
        nodes += [helper.make_node("MatMul", [x, f"u{i}"], [f"h{i}"]),
                  helper.make_node("Add", [f"h{i}", f"b{i}"], [f"hb{i}"]),
                  helper.make_node("Relu" if bent else "Identity", [f"hb{i}"], [f"a{i}"]),
                  helper.make_node("MatMul", [f"a{i}", f"d{i}"], [f"o{i}"]),
                  helper.make_node("Add", [x, f"o{i}"], [f"s{i}"], name=f"block{i}")]
        x = f"s{i}"
    nodes.append(helper.make_node("Tanh", [x], ["y"]))
    graph = helper.make_graph(
        nodes, "tokens", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, F])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, F])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _error(original, pruned):
    x = RNG.standard_normal((8, 1, S, F)).astype(np.float32)
    want = np.stack([run_onnx(original, {"x": s})[0] for s in x])
    got = np.stack([run_onnx(pruned, {"x": s})[0] for s in x])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_fit_bridge_matches_numpy_least_squares():
    x = RNG.standard_normal((200, F))
    y = x @ RNG.standard_normal((F, F)) + 0.3
    update, offset = fit_bridge(x.astype(np.float32), y.astype(np.float32), damp=0.0)
    design = np.hstack([x, np.ones((200, 1))])
    solution, *_ = np.linalg.lstsq(design, y - x, rcond=None)
    np.testing.assert_allclose(update, solution[:-1], atol=1e-4)
    np.testing.assert_allclose(offset, solution[-1], atol=1e-4)


def test_affine_blocks_bridged_exactly_in_order():
    # Blocks 0 and 1 are affine (Identity instead of Relu), so their bridges are exact, also
    # when both go and the second bridge reads the first one's output.
    original = _token_blocks()
    calib = {"x": RNG.standard_normal((64, 1, S, F)).astype(np.float32)}
    model = ir.load_model(original)
    report = passes.compress(model, "prune-layers:count=2:kind=residual:criterion=change:"
                             "bridge=linear:damp=0", calibration=calib)
    removed = report.passes[-1].details["removed"]
    pruned = ir.to_onnx(model)
    assert sum(n.op_type == "MatMul" for n in pruned.graph.node) == 2 + len(removed)
    if sorted(removed) == ["block0", "block1"]:
        assert _error(original, pruned) < 1e-4
    plain = passes.apply(original, "prune-layers:count=2:kind=residual:criterion=change",
                         calibration=calib)
    assert _error(original, pruned) < 0.5 * _error(original, plain)


def test_bridge_beats_identity_on_a_nonlinear_block():
    original = _token_blocks(nonlinear=(True, True, True))
    calib = {"x": RNG.standard_normal((64, 1, S, F)).astype(np.float32)}
    spec = "prune-layers:count=1:kind=residual:criterion=change"
    plain = passes.apply(original, spec, calibration=calib)
    bridged = passes.apply(original, spec + ":bridge=linear", calibration=calib)
    assert _error(original, bridged) < _error(original, plain)


def test_bridge_needs_features_on_the_last_axis():
    from tests.passes.prune.test_layers import _residual_stack
    with pytest.raises(OptionError):
        passes.apply(_residual_stack(zero_block=1), "prune-layers:count=1:bridge=linear")
