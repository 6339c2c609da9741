"""Magnitude, Wanda and SparseGPT on hand-made layers, and the conv im2col view."""

import numpy as np
import pytest

import ir
import passes
from passes.sparsify import sparsity_of
from passes.sparsify.layers import find_targets
from passes.sparsify.patterns import SparsityPattern, nm_group_nonzeros, block_tile_nonzeros, select_mask
from passes.sparsify.schedule import relative_output_error
from passes.sparsify.sparsegpt import sparsegpt_prune
from passes.sparsify.statistics import conv_patches
from tests.passes.sparsify.graphs import conv_net, run
from onnx import TensorProto, helper, numpy_helper


def _single_matmul(weight):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _sparse_weight(model):
    (name, info), = sparsity_of(model).items()
    return model.graph.initializers[name].const, info


@pytest.mark.parametrize("method,pruned_input", [("magnitude", 0), ("wanda", None)])
def test_wanda_weighs_magnitude_by_input_norm(method, pruned_input):
    # Input 0 has tiny weights but a huge activation: magnitude prunes its row of B [K, N];
    # Wanda scores it 0.1 * 100 = 10 > 1 and prunes elsewhere.
    weight = np.ones((4, 3))
    weight[0] = 0.1
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 4)).astype(np.float32)
    calib[:, 0] *= 100
    model = ir.load_model(_single_matmul(weight))
    passes.compress(model, f"sparsify:sparsity=0.25:method={method}:include_first_last=true:"
                           "min_size=0", calibration={"x": calib})
    sparse, info = _sparse_weight(model)
    zeros = sparse == 0
    assert zeros.sum() == 3 and info["density"] == 0.75
    if pruned_input == 0:
        assert zeros[0].all()
    else:
        assert not zeros[0].any()


def _correlated_layer(seed=0, rows=48, cols=64, samples=512):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    x = rng.standard_normal((samples, cols)) @ mixing * rng.uniform(0.2, 3.0, cols)
    weights = rng.standard_normal((rows, cols))
    return weights, x.T @ x / samples


@pytest.mark.parametrize("pattern,check", [
    (SparsityPattern("unstructured"), None),
    (SparsityPattern("n:m", n=2, m=4), "nm"),
    (SparsityPattern("block", (4, 1)), "block"),
    (SparsityPattern("block", (1, 4)), "block"),
])
def test_sparsegpt_beats_magnitude_and_keeps_pattern(pattern, check):
    weights, hessian = _correlated_layer()
    sparsity = 0.5
    magnitude = weights * select_mask(np.abs(weights), pattern, sparsity)
    rebuilt = sparsegpt_prune(weights, hessian, pattern, sparsity)
    assert abs(np.mean(rebuilt == 0) - sparsity) < 0.05
    if check == "nm":
        assert (nm_group_nonzeros(rebuilt, 4) <= 2).all()
    if check == "block":
        tiles = block_tile_nonzeros(rebuilt, pattern.block)
        assert ((tiles == 0) | (tiles == pattern.block[0] * pattern.block[1])).all()
    error_magnitude = relative_output_error(weights, magnitude, hessian)
    error_sparsegpt = relative_output_error(weights, rebuilt, hessian)
    assert error_sparsegpt < 0.8 * error_magnitude


def test_conv_patches_reproduce_conv_outputs():
    # im2col rows x W.T must equal onnxruntime's conv for pads, strides, dilations and groups.
    proto = conv_net()
    model = ir.load_model(proto)
    ir.infer_shapes(model)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    targets = find_targets(model.graph, ["Conv"])
    names = [t.node.input(0).name for t in targets] + [t.node.output.name for t in targets]
    from passes.calibration import CalibrationSet, capture
    captured = capture(model, names, CalibrationSet({"x": x}), limit=1)
    for target in targets:
        activation = captured[target.node.input(0).name][0]
        expected = captured[target.node.output.name][0]  # [1, O, H, W]
        weights = target.matrix()
        out = np.empty((expected.shape[2] * expected.shape[3], weights.shape[0]))
        for rows, patches in zip(target.row_groups(), conv_patches(activation, target)):
            out[:, rows] = patches @ weights[rows].T
        got = out.T.reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_conv_layers_sparsify_and_run(method):
    proto = conv_net()
    model = ir.load_model(proto)
    rng = np.random.default_rng(4)
    calib = rng.standard_normal((16, 4, 8, 8)).astype(np.float32)
    passes.compress(model, f"sparsify:sparsity=0.5:method={method}:pattern=block:block=2x1:"
                           "min_size=0", calibration={"x": calib})
    table = sparsity_of(model)
    # c0 (first) and c3 (last) stay dense; c1 (3x3) and c2 (1x1, grouped) are sparsified
    assert sorted(info["node"] for info in table.values()) == ["c1", "c2"]
    for name, info in table.items():
        view = model.graph.initializers[name].const.reshape(info["view_shape"])
        tiles = block_tile_nonzeros(view, (2, 1))
        assert ((tiles == 0) | (tiles == 2)).all()
        assert abs(info["density"] - 0.5) < 0.1
    out, = run(ir.to_onnx(model), {"x": calib[:1]})
    ref, = run(proto, {"x": calib[:1]})
    assert out.shape == ref.shape
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.8


def _naive_obs(weights, hessian, pattern, sparsity, damp=0.01):
    """SparseGPT written from the OBS formulas with explicit inverses (no Cholesky, no lazy
    batches): column j is pruned/kept, then the error is spread over the columns F = j+1.. with
    [H_F^-1] recomputed from the damped H; masks use the OBS saliency w^2 / [H_F^-1]_jj (F starting at j)."""
    w = weights.astype(np.float64).copy()
    h = hessian + damp * np.mean(np.diag(hessian)) * np.eye(len(hessian))
    cols = w.shape[1]
    inverse_diag = np.array([np.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)])
    keep = np.ones_like(w, dtype=bool)
    if pattern.kind != "n:m":  # one block = whole matrix: mask from the initial weights
        keep = select_mask(w ** 2 / inverse_diag[None, :], pattern, sparsity)
    for j in range(cols):
        if pattern.kind == "n:m" and j % pattern.m == 0:
            group = slice(j, j + pattern.m)
            keep[:, group] = select_mask(w[:, group] ** 2 / inverse_diag[None, group],
                                         pattern, 0.0)
        h_inv = np.linalg.inv(h[j:, j:])
        kept = np.where(keep[:, j], w[:, j], 0.0)
        error = (w[:, j] - kept) / h_inv[0, 0]
        w[:, j:] -= np.outer(error, h_inv[0, :])
        w[:, j] = kept
    return w


@pytest.mark.parametrize("pattern,block_columns", [
    (SparsityPattern("n:m", n=2, m=4), 8),        # lazy batches of 8 must not change 2:4
    (SparsityPattern("unstructured"), 1 << 20),   # one block: mask chosen once, like the naive
])
def test_sparsegpt_matches_naive_obs(pattern, block_columns):
    # [out, in] weights, H over the inputs; the reference Frantar & Alistarh algorithm.
    weights, hessian = _correlated_layer(seed=3, rows=6, cols=16, samples=256)
    fast = sparsegpt_prune(weights, hessian, pattern, 0.5, block_columns=block_columns)
    naive = _naive_obs(weights, hessian, pattern, 0.5)
    np.testing.assert_allclose(fast, naive, rtol=1e-8, atol=1e-10)
