"""ADMM mask search after SparseGPT: the mask follows the pattern, finds an exactly sparse
solution (near enough) when there is one, and lowers the layer error below SparseGPT + exact
refit."""

import numpy as np
import pytest

from passes.sparsify.admm import admm_mask
from passes.sparsify.patterns import SparsityPattern, block_tile_nonzeros, nm_group_nonzeros
from passes.sparsify.refit import masked_least_squares
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
