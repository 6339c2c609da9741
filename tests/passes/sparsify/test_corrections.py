"""Error-correcting targets (GPTAQ) and bias correction: the math against numpy, the graph edits
against onnxruntime."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import passes
from passes.calibration import CalibrationSet
from passes.sparsify.correction import (error_correcting_start, mean_output_shift,
                                        paired_output_error)
from passes.sparsify.layers import find_targets
from passes.sparsify.patterns import SparsityPattern
from passes.sparsify.sparsegpt import sparsegpt_prune
from passes.sparsify.statistics import collect_statistics
from tests.passes.sparsify.graphs import conv_net, mlp, run


def _inputs(seed=0, rows=400, cols=24):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) @ (np.eye(cols) + 0.3 * rng.standard_normal((cols, cols)))
    return rng, x


def test_error_correcting_start_is_identity_when_inputs_match():
    rng, x = _inputs()
    weights = rng.standard_normal((10, x.shape[1]))
    h = x.T @ x / len(x)
    start = error_correcting_start(weights, h, h, damp=0.01)
    np.testing.assert_allclose(start, weights, rtol=1e-10, atol=1e-12)
    pattern = SparsityPattern("unstructured")
    np.testing.assert_allclose(sparsegpt_prune(start, h, pattern, 0.5),
                               sparsegpt_prune(weights, h, pattern, 0.5), rtol=1e-9, atol=1e-12)


def test_error_correcting_start_solves_the_ridge_problem():
    # min_V E||V x~ - W x||^2 + lam ||V - W||^2, solved by lstsq on stacked rows.
    rng, x = _inputs(seed=1)
    shifted = x + 0.3 * rng.standard_normal(x.shape) + 0.5  # the sparse model's inputs
    weights = rng.standard_normal((7, x.shape[1]))
    n, damp = len(x), 0.05
    h = shifted.T @ shifted / n
    lam = damp * np.mean(np.diag(h))
    design = np.vstack([shifted, np.sqrt(lam * n) * np.eye(x.shape[1])])
    goal = np.vstack([x @ weights.T, np.sqrt(lam * n) * weights.T])
    expected = np.linalg.lstsq(design, goal, rcond=None)[0].T
    got = error_correcting_start(weights, h, shifted.T @ x / n, damp)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
    # ... and it reconstructs the original outputs better than the unchanged weights do.
    assert (np.linalg.norm(shifted @ got.T - x @ weights.T)
            < 0.8 * np.linalg.norm(shifted @ weights.T - x @ weights.T))


def test_mean_shift_zeroes_the_mean_output_error():
    rng, x = _inputs(seed=2)
    shifted = x + np.linspace(-1, 1, x.shape[1])  # a known shift of the inputs
    weights = rng.standard_normal((5, x.shape[1]))
    pruned = weights * (rng.random(weights.shape) > 0.5)
    shift = mean_output_shift(weights, pruned, shifted.mean(0), x.mean(0))
    error = (shifted @ pruned.T + shift) - x @ weights.T
    np.testing.assert_allclose(error.mean(0), 0.0, atol=1e-12)
    assert np.abs((shifted @ pruned.T - x @ weights.T).mean(0)).max() > 0.1  # it was not zero


def test_paired_output_error_matches_direct_computation():
    rng, x = _inputs(seed=3)
    shifted = x + 0.2 * rng.standard_normal(x.shape)
    weights = rng.standard_normal((6, x.shape[1]))
    pruned = weights * (rng.random(weights.shape) > 0.5)
    n = len(x)
    got = paired_output_error(weights, pruned, shifted.T @ shifted / n, shifted.T @ x / n,
                              x.T @ x / n)
    expected = (np.linalg.norm(shifted @ pruned.T - x @ weights.T) ** 2
                / np.linalg.norm(x @ weights.T) ** 2)
    assert got == pytest.approx(expected, rel=1e-9)


def test_paired_statistics_of_a_model_with_itself_have_cross_equal_hessian():
    model = ir.load_model(mlp())
    rng = np.random.default_rng(0)
    calib = CalibrationSet({"x": rng.standard_normal((8, 1, 4, 16)).astype(np.float32)})
    targets = find_targets(model.graph, ["MatMul"])
    stats = collect_statistics(model, targets, calib, 8, full=True,
                               reference=ir.load_model(mlp()))
    for stat in stats:
        assert stat.paired and stat.rows == 32
        np.testing.assert_allclose(stat.cross(), stat.hessian(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stat.reference_mean(), stat.mean(), rtol=1e-6, atol=1e-7)


def _linear_with_bias(gemm: bool, bias: bool, tokens=6, k=16, n=12, seed=0):
    """x[tokens, k] -> MatMul (+ Add bias) or Gemm(transB=1, C) -> y."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((n, k) if gemm else (k, n))
                                     .astype(np.float32), "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"))
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "w"] + (["b"] if bias else []), ["y"],
                                  transB=1, beta=0.5, name="fc")]
    elif bias:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
                 helper.make_node("Add", ["m", "b"], ["y"], name="fc_add")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("graph,where", [
    (_linear_with_bias(gemm=False, bias=True), "bias add"),
    (_linear_with_bias(gemm=False, bias=False), "new add"),
    (_linear_with_bias(gemm=True, bias=True), "gemm C"),
    (_linear_with_bias(gemm=True, bias=False), "new gemm C"),
])
@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_bias_correction_keeps_the_mean_output(graph, where, method):
    # The input has a large mean, so pruning alone moves the mean output a lot.
    rng = np.random.default_rng(1)
    calib = (rng.standard_normal((32, 6, 16)) + 2.0).astype(np.float32)
    dense = np.stack([run(graph, {"x": c})[0] for c in calib])
    spec = f"sparsify:sparsity=0.5:method={method}:include_first_last=true:min_size=0"
    plain = passes.apply(graph, spec, calibration={"x": calib})
    corrected = ir.load_model(graph)
    report = passes.compress(corrected, spec + ":bias_correction=true", calibration={"x": calib})
    record, = report.passes[0].details["layers"]
    assert record["bias_correction"] == where
    outputs = {name: np.stack([run(model, {"x": c})[0] for c in calib])
               for name, model in (("plain", plain), ("corrected", ir.to_onnx(corrected)))}
    mean_error = {name: np.abs((out - dense).mean(axis=(0, 1))).max()
                  for name, out in outputs.items()}
    assert mean_error["corrected"] < 1e-4 < 0.1 < mean_error["plain"], mean_error


def test_bias_correction_on_convs_with_and_without_bias():
    proto = conv_net()
    rng = np.random.default_rng(2)
    calib = (rng.standard_normal((8, 1, 4, 8, 8)) + 1.0).astype(np.float32)
    spec = "sparsify:sparsity=0.5:method=magnitude:min_size=0:include_first_last=true:" \
           "ops=Conv:exclude=c1+c2+c3:bias_correction=true"
    # Only c0 (no bias in conv_net) is sparsified: its output mean per channel must match.
    model = ir.load_model(proto)
    passes.compress(model, spec, calibration={"x": calib})
    node = model.graph.find_node("c0")
    assert node.input(2) is not None and node.input(2).is_constant
    from passes.calibration import capture
    dense = capture(ir.load_model(proto), ["c0_out"], CalibrationSet({"x": calib[:, 0]}))
    sparse = capture(model, ["c0_out"], CalibrationSet({"x": calib[:, 0]}))
    dense_mean = np.concatenate(dense["c0_out"]).mean(axis=(0, 2, 3))
    sparse_mean = np.concatenate(sparse["c0_out"]).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(sparse_mean, dense_mean, atol=1e-4)


def test_error_correction_reconstructs_a_deep_stack_better_than_sequential():
    proto = mlp(widths=(16, 64, 64, 64, 64, 8), tokens=8)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 1, 8, 16)).astype(np.float32)
    dense = np.concatenate([run(proto, {"x": c})[0] for c in calib[:16]])
    errors = {}
    for option in ("sequential", "error_correction"):
        out = passes.apply(proto,
                           f"sparsify:sparsity=0.6:method=sparsegpt:min_size=0:{option}=true",
                           calibration={"x": calib})
        got = np.concatenate([run(out, {"x": c})[0] for c in calib[:16]])
        errors[option] = np.linalg.norm(got - dense) / np.linalg.norm(dense)
    assert errors["error_correction"] < 0.85 * errors["sequential"], errors


def test_error_correction_needs_sparsegpt():
    with pytest.raises(passes.core.OptionError, match="error_correction"):
        passes.apply(mlp(), "sparsify:method=wanda:error_correction=true",
                     calibration={"x": np.zeros((2, 1, 4, 16), np.float32)})


@pytest.mark.parametrize("pattern", [SparsityPattern("unstructured"),
                                     SparsityPattern("n:m", n=2, m=4),
                                     SparsityPattern("block", (4, 1))])
def test_refit_solves_each_rows_masked_least_squares(pattern):
    from passes.sparsify.refit import masked_least_squares
    from passes.sparsify.schedule import relative_output_error
    rng, x = _inputs(seed=4, cols=32)
    weights = rng.standard_normal((8, x.shape[1]))
    h = x.T @ x / len(x)
    pruned = sparsegpt_prune(weights, h, pattern, 0.5)
    keep = pruned != 0
    refit = masked_least_squares(weights, h, keep, damp=0.0)
    assert (refit[~keep] == 0).all()
    for row in range(len(weights)):  # the row's least squares on the kept inputs, by lstsq
        kept = keep[row]
        expected = np.linalg.lstsq(x[:, kept], x @ weights[row], rcond=None)[0]
        np.testing.assert_allclose(refit[row, kept], expected, rtol=1e-7, atol=1e-9)
    assert (relative_output_error(weights, refit, h)
            < 0.95 * relative_output_error(weights, pruned, h))


def test_owl_gives_outlier_rich_layers_less_sparsity_at_the_same_total():
    from passes.sparsify.schedule import outlier_ratio, outlier_schedule
    rng = np.random.default_rng(5)
    scores = [np.abs(rng.standard_normal((32, 64))) for _ in range(3)]
    scores[1][:4, :8] *= 50  # layer 1: many outliers; layer 2: a few
    scores[2][0, :8] *= 50
    sizes = [s.size for s in scores]
    sparsities = outlier_schedule(scores, sizes, 0.5, spread=0.08)
    ratios = [outlier_ratio(s) for s in scores]
    assert ratios[1] > ratios[2] > ratios[0]
    assert sparsities[1] < sparsities[2] < sparsities[0]
    assert sparsities[0] - sparsities[1] == pytest.approx(0.16)
    assert np.dot(sparsities, sizes) / sum(sizes) == pytest.approx(0.5, abs=1e-9)


def test_owl_schedule_in_the_pass_keeps_the_total_sparsity():
    proto = mlp(widths=(16, 64, 64, 64, 64, 8), tokens=8)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, 1, 8, 16)).astype(np.float32)
    model = ir.load_model(proto)
    report = passes.compress(model, "sparsify:sparsity=0.5:method=wanda:schedule=owl:min_size=0",
                             calibration={"x": calib})
    layers = report.passes[0].details["layers"]
    zeros = sum(layer["size"] * (1 - layer["density"]) for layer in layers)
    assert zeros / sum(layer["size"] for layer in layers) == pytest.approx(0.5, abs=0.01)
    assert len({layer["target"] for layer in layers}) > 1
