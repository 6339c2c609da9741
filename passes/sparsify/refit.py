"""Exact reconstruction of a pruned layer for a fixed mask: masked least squares, row by row.

SparseGPT decides the mask and updates the weights in one left-to-right sweep: the error of
pruning column j only flows into the columns right of j, so the kept weights of earlier columns
never see the later decisions. Once the mask is fixed, the best weights are the solution of

    min_V  (V - W) (H + lam I) (V - W)^T   with V = 0 outside the mask,

independently for every output row: on the kept inputs S of a row, (H + lam I)_SS v_S =
((H + lam I) w)_S. `W` is the weights to reconstruct (the dense weights, or GPTAQ's error-
correcting start, see `correction`), H = E[x x^T], lam = damp * mean(diag H) as in SparseGPT.
Rows sharing the same kept set (block patterns) are solved together. The cost is one dense solve
of the kept size per row: O(rows * kept^3), a few seconds for a 384 x 1536 layer at 50%.
"""

from __future__ import annotations

import numpy as np

__all__ = ["masked_least_squares"]


def masked_least_squares(weights: np.ndarray, hessian: np.ndarray, keep: np.ndarray,
                         damp: float = 0.01) -> np.ndarray:
    """[out, in] weights that minimize the dampened H-norm distance to `weights` under `keep`."""
    w = np.asarray(weights, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0  # as in SparseGPT: an input that never fires carries no information
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    goal = w @ h  # row q: ((H + lam I) w_q)^T, symmetric H
    refit = np.zeros_like(w)
    keep = np.asarray(keep, dtype=bool)
    patterns: dict[bytes, list[int]] = {}
    for row in range(len(w)):
        patterns.setdefault(np.packbits(keep[row]).tobytes(), []).append(row)
    for rows in patterns.values():
        kept = np.flatnonzero(keep[rows[0]])
        if len(kept):
            refit[np.ix_(rows, kept)] = np.linalg.solve(h[np.ix_(kept, kept)],
                                                       goal[np.ix_(rows, kept)].T).T
    return refit
