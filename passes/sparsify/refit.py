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

With an output metric M (`metric_least_squares`) the error is tr((V - W)(H + lam I)(V - W)^T M):
M couples the rows, so all kept weights form one problem, solved by conjugate gradients.
"""

from __future__ import annotations

import numpy as np

__all__ = ["masked_least_squares", "metric_least_squares"]


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


CG_TOLERANCE = 1e-10   # stop when the residual's squared norm falls below this x the goal's
CG_ITERATIONS = 1000


def metric_least_squares(weights: np.ndarray, hessian: np.ndarray, metric: np.ndarray,
                         keep: np.ndarray, damp: float = 0.01,
                         start: np.ndarray | None = None) -> np.ndarray:
    """As `masked_least_squares`, with the output error weighed by `metric` M ([out, out],
    positive definite): min tr((V - W)(H + lam I)(V - W)^T M) under `keep`. M couples the rows,
    so this is one problem over all kept weights, solved by conjugate gradients (Jacobi-
    preconditioned, from `start`, e.g. the row-wise answer): its operator X -> keep * (M X H)
    costs two matrix products per iteration."""
    w = np.asarray(weights, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    metric = np.asarray(metric, dtype=np.float64)
    mask = np.asarray(keep, dtype=np.float64)
    goal = mask * (metric @ w @ h)
    solution = mask * (w if start is None else np.asarray(start, dtype=np.float64))
    residual = goal - mask * (metric @ solution @ h)
    inverse_diagonal = mask / (np.diag(metric)[:, None] * np.diag(h)[None, :])
    preconditioned = inverse_diagonal * residual
    direction = preconditioned.copy()
    product = float((residual * preconditioned).sum())
    threshold = CG_TOLERANCE * float((goal * goal).sum())
    for _ in range(CG_ITERATIONS):
        if float((residual * residual).sum()) <= threshold:
            break
        applied = mask * (metric @ direction @ h)
        step = product / float((direction * applied).sum())
        solution += step * direction
        residual -= step * applied
        preconditioned = inverse_diagonal * residual
        new_product = float((residual * preconditioned).sum())
        direction = preconditioned + (new_product / product) * direction
        product = new_product
    return solution
