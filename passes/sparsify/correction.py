"""Corrections for the error that layers sparsified earlier pass on to later ones.

When layers are sparsified one after the other (`sequential`), layer l no longer sees the input
rows x_ref of the original model but rows x from the already sparsified layers before it. Plain
sequential SparseGPT reconstructs W x (its own dense output on the new inputs); the error the
earlier layers made stays. Two corrections aim at the original output W x_ref instead:

- `error_correcting_start` (the "asymmetric calibration" of GPTAQ, Li et al. 2025): the dense
  weights that best map the new inputs to the original outputs,

      W* = argmin_V E||V x - W x_ref||^2 + lam ||V - W||^2 = W (C^T + lam I) (H + lam I)^-1,

  with H = E[x x^T], C = E[x x_ref^T] and lam = damp * mean(diag H). Since
  E||V x - W x_ref||^2 + lam||V - W||^2 = ||V - W*||^2_(H + lam I) + const, running SparseGPT
  from W* with the same dampened H minimizes the whole objective. When x = x_ref, C = H and
  W* = W exactly, so the correction changes nothing on a layer whose inputs are unchanged.
  Where the layer's output is added to a residual stream that already carries an error
  d = r_ref - r (`residual`), the target becomes W x_ref + d, and W* gains D (H + lam I)^-1 with
  D = E[d x^T]: the part of the stream's error that the layer's input predicts is cancelled.
- `mean_output_shift`: after pruning, the mean output moved by E[W x_ref] - E[W' x] =
  W mu_ref - W' mu; adding it to the layer's bias makes the mean output error zero on the
  calibration tokens (the bias-correction step of post-training compression).
"""

from __future__ import annotations

import numpy as np

__all__ = ["error_correcting_start", "mean_output_shift", "paired_output_error"]


def error_correcting_start(weights: np.ndarray, hessian: np.ndarray, cross: np.ndarray,
                           damp: float, residual_cross: np.ndarray | None = None) -> np.ndarray:
    """(W (C^T + lam I) + D)(H + lam I)^-1 for W [out, in], H = E[x x^T], C = E[x x_ref^T]
    ([in, in]) and D = E[d x^T] ([out, in], the residual stream's error; zero when None)."""
    h = np.array(hessian, dtype=np.float64, copy=True)
    lam = damp * float(np.mean(np.diag(h)))
    if lam <= 0:  # an all-zero input: nothing to fit, keep the weights
        return np.array(weights, dtype=np.float64, copy=True)
    h[np.diag_indices_from(h)] += lam
    rhs = np.array(cross, dtype=np.float64).T.copy()  # C^T = E[x_ref x^T]
    rhs[np.diag_indices_from(rhs)] += lam
    # W* = (W rhs + D) h^-1  <=>  h W*^T = rhs^T W^T + D^T  (h symmetric): one solve.
    target = rhs.T @ np.asarray(weights, dtype=np.float64).T
    if residual_cross is not None:
        target += np.asarray(residual_cross, dtype=np.float64).T
    return np.linalg.solve(h, target).T


def mean_output_shift(weights: np.ndarray, pruned: np.ndarray, mean: np.ndarray,
                      reference_mean: np.ndarray,
                      residual_mean: np.ndarray | None = None) -> np.ndarray:
    """E[W x_ref] - E[W' x] (+ E[d], the residual stream's mean error) per output row: what to
    add to the bias of the pruned layer."""
    shift = np.asarray(weights) @ reference_mean - np.asarray(pruned) @ mean
    return shift if residual_mean is None else shift + residual_mean


def paired_output_error(weights: np.ndarray, pruned: np.ndarray, hessian: np.ndarray,
                        cross: np.ndarray, reference_hessian: np.ndarray) -> float:
    """E||W' x - W x_ref||^2 / E||W x_ref||^2 from the paired second moments."""
    w, p = np.asarray(weights), np.asarray(pruned)
    base = float(((w @ reference_hessian) * w).sum())
    error = (float(((p @ hessian) * p).sum()) - 2.0 * float(((p @ cross) * w).sum()) + base)
    return max(error, 0.0) / max(base, 1e-30)
