"""A better mask for a pruned layer by ADMM (as in ALPS, Meng et al. 2024), started from
SparseGPT's answer.

SparseGPT picks the mask in one greedy left-to-right sweep, and `refit` only re-solves the
weights for that mask. ADMM searches the mask itself. With H = E[x x^T] (+ the usual dampening)
and W0 the weights to reconstruct, it solves

    min_W  (W - W0) H (W - W0)^T   subject to W following the pattern

by splitting W (smooth part) from D (pattern part) and alternating, with penalty rho:

    W <- (W0 H + rho (D - V)) (H + rho I)^-1     a ridge solve, via one eigendecomposition of H
    D <- projection of W + V onto the pattern    largest magnitudes: unstructured, blocks, N:M
    V <- V + W - D                               the scaled dual variable

rho starts small (the mask moves freely toward what the layer's output needs) and grows
geometrically, which forces W and D together until the mask settles. The caller then solves the
weights exactly on the final mask (`refit.masked_least_squares`). On MiniLM's layers at 50% and
at 2:4 this lowers the layer's output error by a further 15-30% over SparseGPT + refit.

With an output metric M ([out, out], `output_sensitivity`: how much each direction of the layer's
output moves the model's outputs) the objective becomes tr((W - W0) H (W - W0)^T M). Its ridge
step stays closed-form in the eigenbases of M (U, m) and H (Q, h): with A = U^T W Q,
A_ij = (m_i h_j A0_ij + rho Z_ij) / (m_i h_j + rho).
"""

from __future__ import annotations

import numpy as np

from .patterns import SparsityPattern, select_mask

__all__ = ["admm_mask"]

RHO_START = 0.1     # first penalty, x mean(diag H)
RHO_GROWTH = 1.3    # penalty growth factor ...
GROW_EVERY = 3      # ... every this many iterations
MAX_ITERATIONS = 300
SETTLED = 10        # iterations without a mask change (once rho >= mean(diag H)) to stop early


def admm_mask(weights: np.ndarray, hessian: np.ndarray, pattern: SparsityPattern,
              sparsity: float, start: np.ndarray, damp: float = 0.01, per_row: bool = False,
              iterations: int = MAX_ITERATIONS, metric: np.ndarray | None = None) -> np.ndarray:
    """Keep-mask [out, in] for `weights` under `pattern` (`per_row`: the same fraction of every
    row, as `select_mask`), searched from `start`, a pruned matrix that follows the pattern;
    `metric` ([out, out], positive definite) weighs the output error (default: identity)."""
    w0 = np.array(weights, dtype=np.float64, copy=True)
    h = np.array(hessian, dtype=np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w0[:, dead] = 0.0  # an input that never fires: its weights are free to go (as in SparseGPT)
    scale = float(np.mean(np.diag(h)))
    h[np.diag_indices_from(h)] += damp * scale
    eigenvalues, basis = np.linalg.eigh(h)
    if metric is None:
        out_values, out_basis = np.ones(len(w0)), None
    else:
        out_values, out_basis = np.linalg.eigh(np.asarray(metric, dtype=np.float64))
    rotated_goal = _rotate(w0, out_basis, basis)  # A0 = U^T W0 Q
    coefficients = out_values[:, None] * eigenvalues[None, :]
    # The penalty is measured against the typical output direction's weight: a metric that
    # ignores most directions has most of its eigenvalues far below its mean.
    scale *= float(np.median(out_values))
    rho = RHO_START * scale
    pruned = np.array(start, dtype=np.float64, copy=True)
    keep = pruned != 0
    dual = np.zeros_like(w0)
    unchanged = 0
    for iteration in range(iterations):
        rotated = (coefficients * rotated_goal + rho * _rotate(pruned - dual, out_basis, basis)) \
            / (coefficients + rho)
        smooth = _unrotate(rotated, out_basis, basis)
        shifted = smooth + dual
        # Largest squares = the Euclidean projection (block scores are sums over the tile).
        new_keep = select_mask(shifted * shifted, pattern, sparsity, per_row=per_row)
        unchanged = unchanged + 1 if np.array_equal(new_keep, keep) else 0
        keep = new_keep
        pruned = shifted * keep
        dual = shifted - pruned
        if iteration % GROW_EVERY == GROW_EVERY - 1:
            rho *= RHO_GROWTH
        if unchanged >= SETTLED and rho >= scale:
            break
    return keep


def _rotate(matrix: np.ndarray, out_basis: np.ndarray | None, in_basis: np.ndarray) -> np.ndarray:
    rotated = matrix @ in_basis
    return rotated if out_basis is None else out_basis.T @ rotated


def _unrotate(matrix: np.ndarray, out_basis: np.ndarray | None, in_basis: np.ndarray) -> np.ndarray:
    restored = matrix @ in_basis.T
    return restored if out_basis is None else out_basis @ restored
