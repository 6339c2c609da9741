"""criterion=obs: structured OBS picks the units whose removal the remaining ones can absorb and
computes the least-squares update of the consumer (checked against numpy's lstsq); on graphs
whose hidden units are linearly dependent the pruned model reproduces the original exactly;
sequential statistics let later layers correct earlier errors; the global allocation puts the
removals where they cost least while keeping the requested total."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import passes
from passes.core import OptionError
from passes.prune.obs import ConsumerProblem, damped_inverse, greedy_obs
from tests.helpers import run_onnx

RNG = np.random.default_rng(7)


def _float_model(nodes, weights: dict, name: str, x_shape: list, y_shape: list, y: str = "y"):
    """A float32 ONNX model (opset 17) from `nodes` with input x, output `y` and the weights as
    initializers."""
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _problem(x, weight, span=1, damp=1e-10):
    hessian = x.T @ x / len(x)
    return ConsumerProblem(weight.copy(), damped_inverse(hessian, damp)[0], span)


def test_linear_combination_unit_is_removed_with_zero_error():
    x = RNG.standard_normal((400, 8))
    x[:, 5] = 2 * x[:, 0] - x[:, 3]  # unit 5 carries nothing the others do not
    weight = RNG.standard_normal((8, 6))
    problem = _problem(x, weight)
    alive, costs = greedy_obs([problem], 8, 1)
    assert not alive[[0, 3, 5]].all() and alive.sum() == 7  # one of the dependent three goes
    assert costs[0] < 1e-6
    np.testing.assert_allclose(x @ problem.weight, x @ weight, atol=1e-5)
    assert np.all(problem.weight[~alive] == 0)


@pytest.mark.parametrize("span", [1, 4])
def test_update_matches_numpy_least_squares(span):
    units = 6
    x = RNG.standard_normal((300, units * span)) + RNG.standard_normal(units * span)
    weight = RNG.standard_normal((units * span, 5))
    problem = _problem(x, weight, span)
    alive, costs = greedy_obs([problem], units, 2)
    rows = np.repeat(alive, span)
    solution, *_ = np.linalg.lstsq(x[:, rows], x @ weight, rcond=None)
    np.testing.assert_allclose(problem.weight[rows], solution, rtol=1e-6, atol=1e-6)
    # The costs add up to the output error (per row, as H is a mean over rows).
    error = ((x[:, rows] @ solution - x @ weight) ** 2).sum() / len(x)
    assert sum(costs) == pytest.approx(error, rel=1e-5)
    # Greedy picks the cheapest first: removing any other pair of units costs at least as much
    # as the pair it removed in its first step would alone.
    single = [((x[:, np.repeat(np.arange(units) != u, span)] @ np.linalg.lstsq(
        x[:, np.repeat(np.arange(units) != u, span)], x @ weight, rcond=None)[0]
        - x @ weight) ** 2).sum() / len(x) for u in range(units)]
    assert costs[0] == pytest.approx(min(single), rel=1e-5)


def _mlp(hidden=16, inputs=6, outputs=5, relu=False, seq=8):
    """x[1,seq,inputs] -> MatMul+Add (hidden) [-> Relu] -> MatMul+Add -> y."""
    w = {"w1": RNG.standard_normal((inputs, hidden)), "b1": RNG.standard_normal(hidden),
         "w2": RNG.standard_normal((hidden, outputs)), "b2": RNG.standard_normal(outputs)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"])]
    last = "hb"
    if relu:
        nodes.append(helper.make_node("Relu", ["hb"], ["hr"]))
        last = "hr"
    nodes += [helper.make_node("MatMul", [last, "w2"], ["o"]),
              helper.make_node("Add", ["o", "b2"], ["y"])]
    return _float_model(nodes, w, "mlp", [1, seq, inputs], [1, seq, outputs])


def _error(original, pruned, shape, samples=8):
    x = RNG.standard_normal((samples, *shape)).astype(np.float32)
    want = np.stack([run_onnx(original, {"x": s})[0] for s in x])
    got = np.stack([run_onnx(pruned, {"x": s})[0] for s in x])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_linear_hidden_layer_pruned_exactly_with_bias_refit():
    # Without a nonlinearity the 16 hidden units are affine in 6 inputs: any 7 of them (with the
    # consumer's bias absorbing the constant) span the rest, so halving them is lossless.
    original = _mlp()
    calib = {"x": RNG.standard_normal((32, 1, 8, 6)).astype(np.float32)}
    pruned = passes.apply(original, "prune-channels:ratio=0.5:criterion=obs:damp=1e-9",
                          calibration=calib)
    assert [list(t.dims) for t in pruned.graph.initializer if t.name.startswith("w2")] == [[8, 5]]
    assert _error(original, pruned, (1, 8, 6)) < 1e-4
    l1 = passes.apply(original, "prune-channels:ratio=0.5:criterion=l1")
    assert _error(original, l1, (1, 8, 6)) > 0.1


def test_conv_channels_pruned_exactly_when_linearly_dependent():
    # 1x1 conv 3 -> 12 channels, no nonlinearity, then a 3x3 conv without padding: the 12
    # channels are affine in 3 inputs, so 4 kept channels (+ refitted bias) reproduce it.
    w = {"w1": RNG.standard_normal((12, 3, 1, 1)), "b1": RNG.standard_normal(12),
         "w2": RNG.standard_normal((4, 12, 3, 3)), "b2": RNG.standard_normal(4)}
    original = _float_model([helper.make_node("Conv", ["x", "w1", "b1"], ["h"]),
                             helper.make_node("Conv", ["h", "w2", "b2"], ["y"])], w, "convs",
                            [1, 3, 7, 7], [1, 4, 5, 5])
    calib = {"x": RNG.standard_normal((16, 1, 3, 7, 7)).astype(np.float32)}
    pruned = passes.apply(original, "prune-channels:ratio=0.67:round_to=1:criterion=obs:"
                          "damp=1e-7", calibration=calib)
    assert [list(t.dims) for t in pruned.graph.initializer if t.name.startswith("w2")] \
        == [[4, 4, 3, 3]]
    # Exact up to the float32 Gram matrix of a rank-deficient input (l1 is off by ~100%).
    assert _error(original, pruned, (1, 3, 7, 7)) < 1e-2
    l1 = passes.apply(original, "prune-channels:ratio=0.67:round_to=1:criterion=l1")
    assert _error(original, l1, (1, 3, 7, 7)) > 0.1


def _two_blocks(width=24, seq=8, relus=(True, True)):
    """x -> [MatMul, Relu, MatMul] -> Tanh -> [MatMul, Relu, MatMul] -> Tanh -> y (two FFN
    blocks; `relus` False replaces a block's Relu by Identity, making its units linear)."""
    w = {}
    nodes, last = [], "x"
    for block in range(2):
        w[f"u{block}"] = RNG.standard_normal((8, width)) / np.sqrt(8)
        w[f"d{block}"] = RNG.standard_normal((width, 8)) / np.sqrt(width)
        act = "Relu" if relus[block] else "Identity"
        nodes += [helper.make_node("MatMul", [last, f"u{block}"], [f"h{block}"]),
                  helper.make_node(act, [f"h{block}"], [f"r{block}"]),
                  helper.make_node("MatMul", [f"r{block}", f"d{block}"], [f"o{block}"]),
                  helper.make_node("Tanh", [f"o{block}"], [f"t{block}"])]
        last = f"t{block}"
    return _float_model(nodes, w, "two", [1, seq, 8], [1, seq, 8], y=last)


def test_sequential_fit_corrects_earlier_errors():
    original = _two_blocks()
    calib = {"x": RNG.standard_normal((64, 1, 8, 8)).astype(np.float32)}
    spec = "prune-channels:ratio=0.5:criterion=obs:samples=64"
    independent = passes.apply(original, spec + ":sequential=false", calibration=calib)
    sequential = passes.apply(original, spec + ":sequential=true", calibration=calib)
    lone, seq = _error(original, independent, (1, 8, 8)), _error(original, sequential, (1, 8, 8))
    assert seq < 0.9 * lone, (seq, lone)


def test_global_allocation_removes_redundant_units_first_and_keeps_the_total():
    # Block 0's hidden units are linear in its 8 inputs (no Relu), so 8 of them carry all it
    # computes; block 1's 32 Relu units do not: the global allocation must prune block 0 harder.
    original = _two_blocks(width=32, relus=(False, True))
    model = ir.load_model(original)
    calib = {"x": RNG.standard_normal((64, 1, 8, 8)).astype(np.float32)}
    report = passes.compress(model, "prune-channels:ratio=0.5:round_to=4:criterion=obs:"
                             "schedule=global:samples=64", calibration=calib)
    groups = report.passes[-1].details["kept_per_group"]
    kept = [g["kept"] for g in groups]
    # Half of all prunable units (2 x 32 hidden + the 8 between the blocks), in steps of 4.
    assert sum(g["size"] for g in groups) == 72 and sum(kept) == 36
    assert all(k % 4 == 0 and k > 0 for k in kept)
    first, second = (g["kept"] for g in groups if g["size"] == 32)
    assert first <= 12 < 20 <= second  # the linear block gives up most of its units
    uniform = passes.apply(original, "prune-channels:ratio=0.5:round_to=4:criterion=obs:"
                           "samples=64", calibration=calib)
    assert _error(original, ir.to_onnx(model), (1, 8, 8)) <= _error(original, uniform,
                                                                     (1, 8, 8)) * 1.05


def _loud_and_quiet(width=32, seq=8):
    """y = FFN_loud(x) + 0.01 * FFN_quiet(x): two alike Relu FFN blocks side by side."""
    w, nodes = {}, []
    for name in ("loud", "quiet"):
        w[f"u_{name}"] = RNG.standard_normal((8, width)) / np.sqrt(8)
        w[f"d_{name}"] = RNG.standard_normal((width, 8)) / np.sqrt(width)
        nodes += [helper.make_node("MatMul", ["x", f"u_{name}"], [f"h_{name}"]),
                  helper.make_node("Relu", [f"h_{name}"], [f"r_{name}"]),
                  helper.make_node("MatMul", [f"r_{name}", f"d_{name}"], [f"o_{name}"])]
    w["scale"] = np.array(0.01)
    nodes += [helper.make_node("Mul", ["o_quiet", "scale"], ["o_small"]),
              helper.make_node("Add", ["o_loud", "o_small"], ["y"])]
    return _float_model(nodes, w, "loud_quiet", [1, seq, 8], [1, seq, 8])


def test_output_scan_allocation_prunes_what_the_output_does_not_see():
    # Each block's own OBS cost curve looks alike; only the model's output shows that the quiet
    # block reaches y at 1/100 of the scale, so schedule=output takes the units from it.
    original = _loud_and_quiet()
    calib = {"x": RNG.standard_normal((64, 1, 8, 8)).astype(np.float32)}
    spec = "prune-channels:ratio=0.5:round_to=4:criterion=obs:samples=64"
    model = ir.load_model(original)
    report = passes.compress(model, spec + ":schedule=output:scan_samples=16", calibration=calib)
    details = report.passes[-1].details
    loud, quiet = (g["kept"] for g in details["kept_per_group"])
    assert loud + quiet == 32 and loud % 4 == 0 and quiet % 4 == 0
    assert quiet <= 4 and loud >= 28
    scans = [g["output_scan"] for g in details["obs"]]
    assert all(s[0] == 0.0 and list(s) == sorted(s) and np.all(np.diff(list(s.values())) >= 0)
               for s in scans)
    pruned = ir.to_onnx(model)
    global_alloc = passes.apply(original, spec + ":schedule=global", calibration=calib)
    assert _error(original, pruned, (1, 8, 8)) < 0.5 * _error(original, global_alloc, (1, 8, 8))
    with pytest.raises(OptionError):
        passes.apply(original, "prune-channels:criterion=l1:schedule=output")
    with pytest.raises(OptionError, match="scan_outputs"):
        passes.apply(original, spec + ":schedule=output:scan_outputs=z", calibration=calib)


def test_output_metric_keeps_the_units_the_output_reads():
    # The FFN's 8 outputs reach y only through a rank-2 projection. Which hidden units to remove
    # then depends on what they write into those 2 directions, which the consumer's own output
    # error cannot see.
    rng = np.random.default_rng(2)
    w = {"w1": rng.standard_normal((8, 32)) / np.sqrt(8), "b1": 0.1 * rng.standard_normal(32),
         "w2": rng.standard_normal((32, 8)) / np.sqrt(32), "b2": np.zeros(8),
         "p": rng.standard_normal((8, 2)) @ rng.standard_normal((2, 8))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["ob"]),
             helper.make_node("MatMul", ["ob", "p"], ["y"])]
    original = _float_model(nodes, w, "projected", [1, 8, 8], [1, 8, 8])
    calib = {"x": RNG.standard_normal((64, 1, 8, 8)).astype(np.float32)}
    spec = "prune-channels:ratio=0.5:round_to=8:criterion=obs:samples=64:scan_samples=16"
    errors = {}
    for option in ("", ":output_metric=true"):
        pruned = passes.apply(original, spec + option, calibration=calib)
        assert [list(t.dims) for t in pruned.graph.initializer if t.name.startswith("w2")] \
            == [[16, 8]]
        errors[option] = _error(original, pruned, (1, 8, 8), samples=16)
    assert errors[":output_metric=true"] < 0.7 * errors[""], errors
    with pytest.raises(OptionError, match="output_metric"):
        passes.apply(original, "prune-channels:criterion=l1:output_metric=true")


def test_obs_rejects_reconstruct_and_unknown_token_mask():
    with pytest.raises(OptionError):
        passes.apply(_mlp(), "prune-channels:criterion=obs:reconstruct=true")
    with pytest.raises(OptionError):
        passes.apply(_mlp(), "prune-channels:criterion=obs:token_mask=nope")


def test_digits_half_macs_with_obs_within_one_point(tmp_path):
    from models import digits
    calib = digits.calibration_npz(tmp_path / "calib.npz")
    model = ir.load_model(digits.MODEL_PATH)
    report = passes.compress(model, "cleanup,prune-channels:target_macs=0.5:criterion=obs",
                             calibration=calib)
    assert report.after["macs"] <= 0.5 * report.before["macs"]
    pruned = digits.evaluate(ir.to_onnx(model).SerializeToString())
    assert digits.evaluate(digits.MODEL_PATH) - pruned <= 1.0


def test_refit_all_also_corrects_layers_that_lose_nothing():
    # Pruning heads changes the FFN's input; refit=all refits the FFN up projection (which
    # loses no unit) to its original output, refit=consumers leaves it as it was.
    from tests.passes.prune.test_heads_and_rules import HIDDEN, S, _attention_ffn_model
    original = _attention_ffn_model()
    calib = {"x": RNG.standard_normal((48, 1, S, HIDDEN)).astype(np.float32)}
    spec = "prune-channels:ratio=0:head_ratio=0.5:criterion=obs:samples=48"
    weights = {}
    for refit in ("consumers", "all"):
        pruned = passes.apply(original, f"{spec}:refit={refit}", calibration=calib)
        weights[refit] = {t.name.split("_")[0]: numpy_helper.to_array(t)
                          for t in pruned.graph.initializer}
    up = numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == "up"))
    np.testing.assert_array_equal(weights["consumers"]["up"], up)
    assert np.abs(weights["all"]["up"] - up).max() > 1e-3
