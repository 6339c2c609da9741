"""refit-norms: per-channel refit of LayerNormalization/BatchNormalization affines against the
uncompressed model, checked with onnxruntime on small seeded graphs."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import passes
from passes.calibration import capture
from passes.core import PassContext, PreconditionError
from passes.recover import REFERENCE_KEY, AffineFit, refit_norms

TOKENS, WIDTH, HIDDEN = 6, 8, 16


def post_ln_block(seed=0, mask=False):
    """A post-LN transformer-like block on x[1, 6, 8]:
    h = LN1(x + x W1 + b1); y = LN2(h + Relu(h W2) W3). With `mask`, x is first multiplied by
    an attention_mask[1, 6] input (int64) so the graph reads it."""
    rng = np.random.default_rng(seed)

    def const(name, shape, scale=1.0, offset=0.0):
        return numpy_helper.from_array(
            (offset + scale * rng.standard_normal(shape)).astype(np.float32), name)

    inits = [const("w1", (WIDTH, WIDTH), 0.4), const("b1", (WIDTH,), 0.3),
             const("g1", (WIDTH,), 0.2, 1.0), const("be1", (WIDTH,), 0.2),
             const("w2", (WIDTH, HIDDEN), 0.4), const("w3", (HIDDEN, WIDTH), 0.3),
             const("g2", (WIDTH,), 0.2, 1.0), const("be2", (WIDTH,), 0.2)]
    nodes, inputs, source = [], [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, TOKENS, WIDTH])], "x"
    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                    [1, TOKENS]))
        inits.append(numpy_helper.from_array(np.array([2], np.int64), "last_axis"))
        nodes += [helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT,
                                   name="mask_cast"),
                  helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask_u"],
                                   name="mask_unsqueeze"),
                  helper.make_node("Mul", ["x", "mask_u"], ["xm"], name="mask_mul")]
        source = "xm"
    nodes += [
        helper.make_node("MatMul", [source, "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Add", [source, "a1"], ["r1"], name="residual1"),
        helper.make_node("LayerNormalization", ["r1", "g1", "be1"], ["h"], name="ln1",
                         axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["h", "w2"], ["m2"], name="fc2"),
        helper.make_node("Relu", ["m2"], ["act"], name="relu"),
        helper.make_node("MatMul", ["act", "w3"], ["m3"], name="fc3"),
        helper.make_node("Add", ["h", "m3"], ["r2"], name="residual2"),
        helper.make_node("LayerNormalization", ["r2", "g2", "be2"], ["y"], name="ln2",
                         axis=-1, epsilon=1e-5),
    ]
    graph = helper.make_graph(nodes, "post_ln", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             [1, TOKENS, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def conv_bn(seed=0):
    """x[1, 3, 6, 6] -> Conv(4, 3x3, bias) -> BatchNormalization -> Relu -> y."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(arr.astype(np.float32), name) for name, arr in [
        ("w", rng.standard_normal((4, 3, 3, 3)) * 0.3), ("b", rng.standard_normal(4) * 0.2),
        ("gamma", rng.uniform(0.5, 1.5, 4)), ("beta", rng.standard_normal(4) * 0.2),
        ("mean", rng.standard_normal(4) * 0.2), ("var", rng.uniform(0.5, 2.0, 4))]]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"],
                              ["bn"], name="bn", epsilon=1e-5),
             helper.make_node("Relu", ["bn"], ["y"], name="relu")]
    graph = helper.make_graph(
        nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _samples(shape, count, seed):
    return np.random.default_rng(seed).standard_normal((count, *shape)).astype(np.float32)


def _load(proto):
    return passes.prepare(ir.load_model(proto))


def _prune(model, names, fraction=0.5):
    """Zero the smallest-magnitude `fraction` of each named constant of an IR model in place:
    a compression whose error has the systematic part (shrunk outputs) the refit can fix."""
    for name in names:
        value = model.graph.initializers[name]
        weights = value.const.copy()
        weights[np.abs(weights) < np.quantile(np.abs(weights), fraction)] = 0.0
        value.const = weights


def _outputs(model, feeds, names):
    captured = capture(model, names, passes.calibration.CalibrationSet(feeds))
    return {name: np.concatenate(arrays) for name, arrays in captured.items()}


def _relative_error(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _refit_with_pass(model, reference, calibration, spec="refit-norms:samples=256"):
    ctx = PassContext()
    ctx.artifacts[REFERENCE_KEY] = reference
    return passes.compress(model, spec, calibration=calibration, ctx=ctx)


def test_refit_brings_outputs_closer_to_the_original():
    original = post_ln_block()
    reference, model = _load(original), _load(original)
    _prune(model, ["w1", "w3"])  # compressed weights before each LN
    calibration = {"x": _samples((TOKENS, WIDTH), 256, seed=2)}
    held_out = {"x": _samples((TOKENS, WIDTH), 64, seed=3)}
    want = _outputs(reference, held_out, ["h", "y"])
    before = _outputs(model, held_out, ["h", "y"])
    before_calibration = _outputs(model, calibration, ["h"])["h"]
    report = _refit_with_pass(model, reference, calibration)
    after = _outputs(model, held_out, ["h", "y"])
    # Measured: h 0.257 -> 0.247, y 0.349 -> 0.292 (an affine per channel of an 8-wide LN
    # fixes only part of the error; the second LN also corrects what reaches it).
    for name, factor in (("h", 0.98), ("y", 0.9)):
        assert _relative_error(after[name], want[name]) < \
            factor * _relative_error(before[name], want[name]), name
    layers = report.passes[0].details["layers"]
    assert [layer["node"] for layer in layers] == ["ln1", "ln2"]
    assert all(layer["error_after"] < layer["error_before"] for layer in layers)
    # The error the report states for the first LN before its refit is the one onnxruntime
    # measures on the calibration data for the perturbed model.
    want_calibration = _outputs(reference, calibration, ["h"])["h"]
    assert layers[0]["rows"] == 256 * TOKENS
    assert layers[0]["error_before"] == pytest.approx(
        _relative_error(before_calibration, want_calibration) ** 2, rel=1e-3)


def test_refit_recovers_a_per_channel_affine_perturbation_exactly():
    # Perturbing the LN affines themselves: the LS fit must give the original ones back.
    original = post_ln_block()
    reference, model = _load(original), _load(original)
    rng = np.random.default_rng(4)
    for name in ("g1", "be1", "g2", "be2"):
        value = model.graph.initializers[name]
        value.const = (value.const * rng.uniform(0.5, 1.5, WIDTH) + rng.standard_normal(WIDTH)
                       ).astype(np.float32)
    _refit_with_pass(model, reference, {"x": _samples((TOKENS, WIDTH), 64, seed=5)})
    held_out = {"x": _samples((TOKENS, WIDTH), 16, seed=6)}
    np.testing.assert_allclose(_outputs(model, held_out, ["y"])["y"],
                               _outputs(reference, held_out, ["y"])["y"], atol=2e-5)
    ln2 = model.graph.find_node("ln2")
    np.testing.assert_allclose(ln2.input(1).const, reference.graph.initializers["g2"].const,
                               rtol=1e-4, atol=1e-5)


def test_batchnorm_refit_recovers_a_per_channel_conv_perturbation_exactly():
    # Scaling/shifting conv output channels before BN maps BN's normalized value by a
    # per-channel affine; the refit absorbs it exactly.
    reference, model = _load(conv_bn()), _load(conv_bn())
    rng = np.random.default_rng(7)
    weights, bias = model.graph.initializers["w"], model.graph.initializers["b"]
    factor = rng.uniform(0.5, 1.5, 4)
    weights.const = (weights.const * factor[:, None, None, None]).astype(np.float32)
    bias.const = (bias.const * factor + rng.standard_normal(4)).astype(np.float32)
    details = refit_norms(model, reference,
                          passes.calibration.CalibrationSet({"x": _samples((3, 6, 6), 32, 8)}))
    assert [layer["op"] for layer in details["layers"]] == ["BatchNormalization"]
    held_out = {"x": _samples((3, 6, 6), 8, seed=9)}
    np.testing.assert_allclose(_outputs(model, held_out, ["y"])["y"],
                               _outputs(reference, held_out, ["y"])["y"], atol=2e-5)


def test_mark_then_refit_in_one_pipeline():
    # The spec form: mark before compressing, refit after; the result validates and keeps the
    # model's interface, and is closer to the original than the compressed model alone.
    original = post_ln_block()
    calibration = {"x": _samples((TOKENS, WIDTH), 128, seed=10)}
    held_out = {"x": _samples((TOKENS, WIDTH), 32, seed=11)}
    compress = "sparsify:sparsity=0.6:min_size=1:include_first_last=true"
    plain, refitted = _load(original), _load(original)
    passes.compress(plain, compress, calibration=calibration)
    report = passes.compress(refitted, f"refit-norms:mark=true,{compress},refit-norms",
                             calibration=calibration)
    assert [p.changed for p in report.passes] == [False, True, True]
    ir.check_model(refitted)
    proto = ir.to_onnx(refitted)
    onnx.checker.check_model(proto)
    assert [(v.name, list(v.shape)) for v in refitted.graph.inputs] == [("x", [1, TOKENS, WIDTH])]
    assert [(v.name, list(v.shape)) for v in refitted.graph.outputs] == [
        ("y", [1, TOKENS, WIDTH])]
    want = _outputs(_load(original), held_out, ["y"])["y"]
    assert _relative_error(_outputs(refitted, held_out, ["y"])["y"], want) < \
        0.9 * _relative_error(_outputs(plain, held_out, ["y"])["y"], want)


def test_padding_tokens_are_left_out_of_the_fit():
    original = post_ln_block(mask=True)
    reference, model = _load(original), _load(original)
    _prune(model, ["w1", "w3"])
    mask = np.ones((40, TOKENS), np.int64)
    mask[:, 4:] = 0  # two padding tokens per sample
    calibration = {"x": _samples((TOKENS, WIDTH), 40, seed=12), "attention_mask": mask}
    report = _refit_with_pass(model, reference, calibration)
    assert [layer["rows"] for layer in report.passes[0].details["layers"]] == [160, 160]
    report = _refit_with_pass(_load(original), reference, calibration,
                              "refit-norms:token_mask=none")
    assert [layer["rows"] for layer in report.passes[0].details["layers"]] == [240, 240]


def test_clear_errors_without_calibration_or_reference():
    model = _load(post_ln_block())
    with pytest.raises(PreconditionError, match="calibration"):
        _refit_with_pass(model, _load(post_ln_block()), None)
    with pytest.raises(PreconditionError, match="refit-norms:mark=true"):
        passes.compress(model, "refit-norms", calibration={"x": _samples((TOKENS, WIDTH), 8, 0)})


def test_affine_fit_matches_numpy_least_squares():
    rng = np.random.default_rng(13)
    n = rng.standard_normal((300, 5))
    y = n * rng.uniform(0.5, 2, 5) + rng.standard_normal(5) + 0.1 * rng.standard_normal((300, 5))
    fit = AffineFit(5)
    fit.add(n[:100], y[:100])
    fit.add(n[100:], y[100:])
    g, b = fit.solve(np.ones(5), np.zeros(5))
    for c in range(5):
        design = np.stack([n[:, c], np.ones(300)], axis=1)
        expected = np.linalg.lstsq(design, y[:, c], rcond=None)[0]
        np.testing.assert_allclose([g[c], b[c]], expected, rtol=1e-9)
    residual = ((n * g + b - y) ** 2).sum() / (y ** 2).sum()
    assert fit.error(g, b) == pytest.approx(residual, rel=1e-9)


def test_channels_that_do_not_match_the_reference_keep_their_affine():
    # Channel 0 and 1 follow the reference; channel 2 is another feature (permuted away).
    rng = np.random.default_rng(15)
    n = rng.standard_normal((400, 3))
    y = n * [2.0, -0.5, 1.0] + [0.3, 0.1, 0.0]
    y[:, 2] = rng.standard_normal(400)  # uncorrelated with n[:, 2]
    fit = AffineFit(3)
    fit.add(n, y)
    assert fit.unmatched().tolist() == [False, True, True]  # a negative fit is no match either
    g, b = fit.solve(np.array([1.0, 1.5, 2.5]), np.array([0.0, 0.7, 0.9]))
    np.testing.assert_allclose([g[0], b[0]], [2.0, 0.3], rtol=1e-9)
    assert [g[1], b[1], g[2], b[2]] == [1.5, 0.7, 2.5, 0.9]


def test_linear_refit_recovers_a_per_output_channel_affine_and_keeps_zeros():
    # linear=true: fc1 (MatMul + bias Add) had its output channels scaled and shifted, and half
    # its weights zeroed: the per-channel affine of its output is fitted back; zeros stay zeros.
    original = post_ln_block()
    reference, model = _load(original), _load(original)
    rng = np.random.default_rng(14)
    weight, bias = model.graph.initializers["w1"], model.graph.initializers["b1"]
    factor = rng.uniform(0.5, 1.5, WIDTH)
    weight.const = (weight.const * factor).astype(np.float32)
    bias.const = (bias.const * factor + rng.standard_normal(WIDTH)).astype(np.float32)
    # fc3 is compressed too but has no bias Add: reported as skipped.
    model.graph.initializers["w3"].const = model.graph.initializers["w3"].const * 0.5
    report = _refit_with_pass(model, reference, {"x": _samples((TOKENS, WIDTH), 64, seed=15)},
                              "refit-norms:linear=true")
    details = report.passes[0].details
    assert [layer["node"] for layer in details["layers"]] == ["fc1", "ln1", "ln2"]
    assert any(note.startswith("fc3:") for note in details["skipped"])
    fc1 = model.graph.find_node("fc1")
    np.testing.assert_allclose(fc1.input(1).const, reference.graph.initializers["w1"].const,
                               rtol=1e-4, atol=1e-5)
    held_out = {"x": _samples((TOKENS, WIDTH), 16, seed=16)}
    np.testing.assert_allclose(_outputs(model, held_out, ["a1", "h"])["h"],
                               _outputs(reference, held_out, ["h"])["h"], atol=2e-5)


def test_linear_refit_keeps_the_sparsity_pattern():
    original = post_ln_block()
    reference, model = _load(original), _load(original)
    _prune(model, ["w1"])
    pruned = model.graph.initializers["w1"].const.copy()
    refit_norms(model, reference,
                passes.calibration.CalibrationSet({"x": _samples((TOKENS, WIDTH), 64, 17)}),
                linear=True)
    weights = model.graph.find_node("fc1").input(1).const
    assert np.array_equal(weights == 0, pruned == 0)
    assert np.abs(weights - pruned).max() > 1e-3  # the columns were rescaled


@pytest.mark.slow
def test_minilm_magnitude_sparsified_gets_closer_to_the_dense_model(tmp_path):
    # The whole pipeline on the real model: 50% magnitude sparsity (no reconstruction) leaves
    # affine drift that the refit removes in part. bench/refit_norms.py (512 sentences):
    # 0.769 -> 0.807 (norms) / 0.842 (norms + linear).
    minilm = pytest.importorskip("models.minilm", reason="models.minilm not in this tree")
    dense = onnx.load(str(minilm.model_path(seq_len=32, batch=1)))
    calib = minilm.calibration_npz(tmp_path / "c.npz", n=64, seq_len=32, corpus="prose")
    sparsify = "sparsify:method=magnitude:sparsity=0.5"
    plain = passes.apply(dense, sparsify)
    refitted = passes.apply(dense, f"refit-norms:mark=true,{sparsify},refit-norms:samples=64",
                            calibration=str(calib))
    before = minilm.cosine_to_reference(plain)["cosine_mean"]
    after = minilm.cosine_to_reference(refitted)["cosine_mean"]
    assert after > before + 0.02, (before, after)


def test_linear_refit_leaves_reordered_channels_alone():
    # sparsify:reorder permutes the FFN hidden units: up's output channel j is no longer the
    # reference's channel j. Fitting it to that channel anyway wrecked the model (output error
    # 0.27 -> 0.59 here); unmatched channels keep their affine, and the refit still helps.
    from tests.passes.sparsify.graphs import residual_mlp
    proto = residual_mlp(width=32, hidden=128, blocks=3, tokens=8, up_bias=True)
    rng = np.random.default_rng(0)
    calibration = {"x": rng.standard_normal((64, 1, 8, 32)).astype(np.float32)}
    held_out = {"x": rng.standard_normal((16, 8, 32)).astype(np.float32)}
    sparsify = "sparsify:pattern=nm:nm=2of4:method=sparsegpt:min_size=0:reorder=true"
    plain, refitted = _load(proto), _load(proto)
    passes.compress(plain, sparsify, calibration=calibration)
    report = passes.compress(refitted, f"refit-norms:mark=true,{sparsify},"
                             "refit-norms:linear=true", calibration=calibration)
    unmatched = {layer["node"]: layer["unmatched_channels"]
                 for layer in report.passes[-1].details["layers"]}
    assert all(unmatched[f"up{i}"] > 64 and unmatched[f"down{i}"] == 0 for i in range(3))
    want = _outputs(_load(proto), held_out, ["y"])["y"]
    assert _relative_error(_outputs(refitted, held_out, ["y"])["y"], want) < \
        _relative_error(_outputs(plain, held_out, ["y"])["y"], want)
