"""ADMM mask search after SparseGPT: the mask follows the pattern, finds an exactly sparse
solution (near enough) when there is one, and lowers the layer error below SparseGPT + exact
refit."""

import numpy as np
import pytest

from passes.sparsify.admm import admm_mask
from passes.sparsify.patterns import SparsityPattern, block_tile_nonzeros, nm_group_nonzeros
from passes.sparsify.refit import masked_least_squares, metric_least_squares
from passes.sparsify.schedule import relative_output_error
from passes.sparsify.sparsegpt import sparsegpt_prune

PATTERNS = {"unstructured": SparsityPattern("unstructured"),
            "2:4": SparsityPattern("n:m", n=2, m=4),
            "4x1": SparsityPattern("block", block=(4, 1))}


def _layer(seed=0, rows=32, cols=48, samples=600):
    """Weights and the Hessian of strongly correlated inputs (where greedy choices go wrong)."""
    rng = np.random.default_rng(seed)
    mixing = np.eye(cols) + 0.6 * rng.standard_normal((cols, cols))
    x = rng.standard_normal((samples, cols)) @ mixing
    return rng.standard_normal((rows, cols)), x.T @ x / samples


@pytest.mark.parametrize("name", list(PATTERNS))
def test_admm_beats_sparsegpt_with_refit_and_keeps_the_pattern(name):
    pattern = PATTERNS[name]
    errors = {"sparsegpt+refit": [], "admm": []}
    for seed in range(3):
        weights, hessian = _layer(seed)
        start = sparsegpt_prune(weights, hessian, pattern, 0.5)
        refit = masked_least_squares(weights, hessian, start != 0)
        keep = admm_mask(weights, hessian, pattern, 0.5, refit)
        if pattern.kind == "n:m":
            assert (nm_group_nonzeros(keep, 4) == 2).all()
        elif pattern.kind == "block":
            assert set(np.unique(block_tile_nonzeros(keep, (4, 1)))) <= {0, 4}
            assert keep.mean() == pytest.approx(0.5, abs=0.02)
        else:
            assert keep.sum() == keep.size // 2
        solved = masked_least_squares(weights, hessian, keep)
        errors["sparsegpt+refit"].append(relative_output_error(weights, refit, hessian))
        errors["admm"].append(relative_output_error(weights, solved, hessian))
    assert np.mean(errors["admm"]) < 0.95 * np.mean(errors["sparsegpt+refit"]), errors


def test_admm_finds_an_exactly_sparse_layer():
    # The weights are 50% sparse already; a start with the wrong half must move to their support.
    weights, hessian = _layer(seed=5)
    support = np.random.default_rng(1).random(weights.shape) < 0.5
    weights = weights * support
    wrong = np.where(support, 0.0, 1.0)
    sparsity = 1 - support.mean()
    keep = admm_mask(weights, hessian, PATTERNS["unstructured"], sparsity, wrong)
    assert keep.sum() == support.sum()
    before = relative_output_error(weights, masked_least_squares(weights, hessian, wrong != 0),
                                   hessian)
    after = relative_output_error(weights, masked_least_squares(weights, hessian, keep), hessian)
    assert before > 0.3 and after < 1e-3, (before, after)


def _metric(seed, rows, rank):
    """A dampened low-rank output metric: the model only sees `rank` directions of the output."""
    rng = np.random.default_rng(seed + 100)
    basis = rng.standard_normal((rows, rank))
    metric = basis @ basis.T / rank
    return metric / np.mean(np.diag(metric)) + 0.1 * np.eye(rows)


def _metric_error(weights, pruned, hessian, metric):
    delta = weights - pruned
    return float(np.trace(metric @ delta @ hessian @ delta.T))


def test_metric_least_squares_is_the_exact_masked_solution():
    weights, hessian = _layer(0, rows=6, cols=8)
    metric = _metric(0, 6, 2)
    keep = np.random.default_rng(1).random(weights.shape) < 0.5
    solved = metric_least_squares(weights, hessian, metric, keep, damp=0.0)
    # Dense reference: vec(V) over the kept entries, objective vec(D)^T (H kron M) vec(D).
    kron = np.kron(hessian, metric)  # column-major vec: index = col * rows + row
    kept = np.flatnonzero(keep.T.ravel())
    goal = (kron @ weights.T.ravel())[kept]
    exact = np.zeros(weights.size)
    exact[kept] = np.linalg.solve(kron[np.ix_(kept, kept)], goal)
    exact = exact.reshape(weights.T.shape).T
    # Conjugate gradients stop at a small residual: the objective is the exact one's.
    assert _metric_error(weights, solved, hessian, metric) == pytest.approx(
        _metric_error(weights, exact, hessian, metric), rel=1e-6)
    np.testing.assert_allclose(solved, exact, rtol=0.05, atol=1e-3)
    assert not solved[~keep].any()
    # With the identity metric it is the row-wise refit.
    np.testing.assert_allclose(metric_least_squares(weights, hessian, np.eye(6), keep),
                               masked_least_squares(weights, hessian, keep), rtol=1e-3,
                               atol=1e-4)


@pytest.mark.parametrize("name", ["unstructured", "2:4"])
def test_admm_with_output_metric_lowers_the_metric_error(name):
    pattern = PATTERNS[name]
    plain, weighted = [], []
    for seed in range(3):
        weights, hessian = _layer(seed)
        metric = _metric(seed, len(weights), 4)
        start = masked_least_squares(weights, hessian,
                                     sparsegpt_prune(weights, hessian, pattern, 0.5) != 0)
        keep = admm_mask(weights, hessian, pattern, 0.5, start)
        plain.append(_metric_error(weights, metric_least_squares(weights, hessian, metric, keep),
                                   hessian, metric))
        keep = admm_mask(weights, hessian, pattern, 0.5, start, metric=metric)
        if pattern.kind == "n:m":
            assert (nm_group_nonzeros(keep, 4) == 2).all()
        else:
            assert keep.mean() == pytest.approx(0.5, abs=0.01)
        weighted.append(_metric_error(weights, metric_least_squares(weights, hessian, metric,
                                                                    keep), hessian, metric))
    # The metric-aware mask puts the error where the output does not look.
    assert np.mean(weighted) < 0.8 * np.mean(plain), (plain, weighted)
    # The identity metric is the plain search.
    weights, hessian = _layer(0)
    start = masked_least_squares(weights, hessian,
                                 sparsegpt_prune(weights, hessian, pattern, 0.5) != 0)
    np.testing.assert_array_equal(admm_mask(weights, hessian, pattern, 0.5, start),
                                  admm_mask(weights, hessian, pattern, 0.5, start,
                                            metric=np.eye(len(weights))))
