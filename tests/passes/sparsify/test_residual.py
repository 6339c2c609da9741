"""Residual-aware error correction: finding the stream a layer adds to, the statistics of its
error, the corrected least-squares start, and the pass end to end."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import passes
from ir.shape_inference import infer_shapes
from passes.calibration import CalibrationSet, capture
from passes.sparsify.correction import error_correcting_start, mean_output_shift
from passes.sparsify.layers import find_targets
from passes.sparsify.residual import residual_partner
from passes.sparsify.statistics import collect_statistics, residual_rows
from tests.passes.sparsify.graphs import residual_mlp


def _targets(proto, ops=("MatMul",)):
    model = ir.load_model(proto)
    infer_shapes(model)
    return model, {t.node.name: t for t in find_targets(model.graph, list(ops))}


def test_partner_is_the_stream_after_the_bias_add():
    _, targets = _targets(residual_mlp(blocks=2))
    assert residual_partner(targets["down0"]).name == "s0"
    assert residual_partner(targets["down1"]).name == "s1"
    for name in ("fc_in", "up0", "up1", "fc_out"):  # Relu, graph output: no residual Add
        assert residual_partner(targets[name]) is None, name


def _conv_block(residual_shape=(1, 4, 6, 6)):
    """x -> Conv 3x3 (pads 1) -> Add(r) -> y, r a second graph input of `residual_shape`: the
    conv output's shape (a residual stream) or one that only broadcasts against it."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Add", ["c", "r"], ["y"], name="res")]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
                         helper.make_tensor_value_info("r", TensorProto.FLOAT, residual_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_conv_partner_and_rows_follow_the_patch_order():
    _, targets = _targets(_conv_block(), ops=("Conv",))
    conv = targets["conv"]
    assert residual_partner(conv).name == "r"
    r = np.arange(1 * 4 * 6 * 6, dtype=np.float32).reshape(1, 4, 6, 6)
    rows, = residual_rows(r, conv)
    assert rows.shape == (36, 4)
    np.testing.assert_array_equal(rows[7], r[0, :, 1, 1])  # position (1, 1) = row 1 * 6 + 1


def test_broadcast_add_is_not_a_residual_stream():
    _, targets = _targets(_conv_block(residual_shape=(1, 4, 1, 1)), ops=("Conv",))
    assert residual_partner(targets["conv"]) is None


def test_residual_start_solves_the_sum_least_squares():
    # min_V E||V x + r - (W x_ref + r_ref)||^2 + lam ||V - W||^2, by lstsq on stacked rows.
    rng = np.random.default_rng(1)
    n, k, m = 500, 12, 6
    x_ref = rng.standard_normal((n, k))
    x = x_ref + 0.3 * rng.standard_normal((n, k))
    d = x @ rng.standard_normal((k, m)) * 0.2 + 0.1 * rng.standard_normal((n, m))  # r_ref - r
    weights = rng.standard_normal((m, k))
    damp = 0.02
    h = x.T @ x / n
    lam = damp * np.mean(np.diag(h))
    design = np.vstack([x, np.sqrt(lam * n) * np.eye(k)])
    goal = np.vstack([x_ref @ weights.T + d, np.sqrt(lam * n) * weights.T])
    expected = np.linalg.lstsq(design, goal, rcond=None)[0].T
    got = error_correcting_start(weights, h, x.T @ x_ref / n, damp, residual_cross=d.T @ x / n)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
    plain = error_correcting_start(weights, h, x.T @ x_ref / n, damp)
    error = {name: np.linalg.norm(x @ v.T - (x_ref @ weights.T + d))
             for name, v in (("residual", got), ("plain", plain))}
    assert error["residual"] < 0.9 * error["plain"], error
    # The bias shift adds the stream's mean error.
    shift = mean_output_shift(weights, got, x.mean(0), x_ref.mean(0), d.mean(0))
    np.testing.assert_allclose(shift, weights @ x_ref.mean(0) - got @ x.mean(0) + d.mean(0))


def test_statistics_hold_the_streams_error_against_the_reference():
    proto = residual_mlp(blocks=2)
    reference = ir.load_model(proto)
    model, targets = _targets(proto)
    # The "sparsified" model differs in its first layer: its stream now carries an error.
    fc_in = targets["fc_in"]
    fc_in.weight.const = fc_in.weight.const * np.float32(0.8)
    rng = np.random.default_rng(2)
    calib = CalibrationSet({"x": rng.standard_normal((6, 1, 8, 32)).astype(np.float32)})
    chosen = [targets["up0"], targets["down0"], targets["down1"]]
    stats = collect_statistics(model, chosen, calib, 6, full=True, reference=reference,
                               residual=True)
    assert stats[0].residual_cross("up0") is None  # up0 adds to no stream
    values = ["a0", "s0", "a1", "s1"]
    ours, theirs = capture(model, values, calib), capture(reference, values, calib)
    for stat, layer, x_name, stream in ((stats[1], "down0", "a0", "s0"),
                                        (stats[2], "down1", "a1", "s1")):
        x = np.concatenate(ours[x_name]).reshape(-1, 64).astype(np.float64)
        d = (np.concatenate(theirs[stream]) - np.concatenate(ours[stream])).reshape(-1, 32)
        np.testing.assert_allclose(stat.residual_cross(layer), d.T @ x / len(x),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stat.residual_mean(layer), d.mean(0), rtol=1e-4, atol=1e-6)
        assert np.abs(stat.residual_cross(layer)).max() > 1e-3  # the error is really there


def test_residual_correction_lowers_the_error_of_every_residual_sum():
    # What the correction minimizes: the error of stream + layer output (before each
    # LayerNorm) against the dense model's, here on held-out inputs. down0's stream comes from
    # the dense first layer (no error to cancel); r1..r3 follow sparsified blocks.
    proto = residual_mlp(width=32, hidden=128, blocks=4, tokens=8)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((96, 1, 8, 32)).astype(np.float32)
    held = CalibrationSet({"x": rng.standard_normal((16, 8, 32)).astype(np.float32)})
    sums = ["r1", "r2", "r3"]
    dense = capture(ir.load_model(proto), sums, held)
    errors = {}
    base = "sparsify:pattern=nm:nm=2of4:method=sparsegpt:min_size=0:error_correction=true"
    for label, extra in (("plain", ""), ("residual", ":residual_correction=true")):
        model = ir.load_model(proto)
        report = passes.compress(model, base + extra, calibration={"x": calib})
        assert all(layer["density"] == 0.5 for layer in report.passes[0].details["layers"])
        got = capture(model, sums, held)
        errors[label] = np.array([
            np.linalg.norm(np.concatenate(got[name]) - np.concatenate(dense[name]))
            / np.linalg.norm(np.concatenate(dense[name])) for name in sums])
    assert (errors["residual"] < 0.99 * errors["plain"]).all(), errors


@pytest.mark.parametrize("spec,message", [
    ("sparsify:method=sparsegpt:residual_correction=true", "residual_correction"),
    ("sparsify:method=sparsegpt:bias_correction=true:residual_correction=true",
     "residual_correction"),
    ("sparsify:method=sparsegpt:output_metric=full:metric_damp=-1", "metric_damp"),
])
def test_bad_options_are_refused(spec, message):
    with pytest.raises(passes.core.OptionError, match=message):
        passes.apply(residual_mlp(), spec,
                     calibration={"x": np.zeros((2, 1, 8, 32), np.float32)})


def test_metric_damp_reaches_the_output_metric():
    # The output metric's dampening changes what ADMM and the refit trade off, so the weights.
    proto = residual_mlp(blocks=2)
    calib = np.random.default_rng(3).standard_normal((16, 1, 8, 32)).astype(np.float32)
    spec = ("sparsify:pattern=nm:nm=2of4:method=sparsegpt:min_size=0:refit=true:"
            "output_metric=full:scan_samples=8")
    weights = {}
    for damp in (0.0, 10.0):
        model = ir.load_model(proto)
        passes.compress(model, f"{spec}:metric_damp={damp}", calibration={"x": calib})
        node = model.graph.find_node("down0")
        weights[damp] = np.array(node.input(1).const)
    assert np.abs(weights[0.0] - weights[10.0]).max() > 1e-4
