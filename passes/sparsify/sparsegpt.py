"""SparseGPT-style one-shot pruning with reconstruction (Frantar & Alistarh, 2023), in numpy.

For a layer W[out, in] with input second moment H = E[x x^T] (see `statistics`), the columns are
visited left to right. Pruning weight w_qj (or keeping it) leaves an error that the Optimal Brain
Surgeon update spreads over the columns not yet visited:

    err_q = (w_q - kept_q) / [H^-1]_jj,      W[:, j+1:] -= err_q [H^-1]_{j, j+1:}

with H^-1 in its upper Cholesky form so that each step uses the inverse Hessian restricted to the
remaining columns. Updates are applied lazily, a block of columns at a time (the "lazy batch"),
and the mask is chosen per block from the OBS saliency w^2 / d_j^2, d_j the diagonal of that
Cholesky factor (d_j^2 = [H_F^-1]_jj, F = the columns from j on):
- unstructured and block RxC: at the start of each column block (aligned to C), the requested
  fraction of the block's weights / tiles with the lowest saliency is pruned;
- N:M: at the start of each group of M columns, each row keeps its N most salient weights.

Dampening adds `damp` x mean(diag H) to the diagonal (1% as in the paper) so that H is
invertible even for dead or correlated inputs. Everything is float64.
"""

from __future__ import annotations

import numpy as np

from .patterns import SparsityPattern, select_mask

__all__ = ["sparsegpt_prune", "saliency"]


def saliency(weights: np.ndarray, hinv_diag: np.ndarray) -> np.ndarray:
    """OBS saliency of pruning each weight: w^2 / d_j^2, d = diagonal of the inverse Cholesky."""
    return weights ** 2 / hinv_diag[None, :] ** 2


def _inverse_cholesky(hessian: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor of (H + damp*mean(diag)*I)^-1, and the mask of dead columns."""
    h = np.array(hessian, dtype=np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    diag = np.diag(h)
    h[np.diag_indices_from(h)] += damp * float(np.mean(diag))
    for _ in range(8):
        try:
            inverse = np.linalg.inv(h)
            upper = np.linalg.cholesky(inverse).T
            return upper, dead
        except np.linalg.LinAlgError:
            # Nearly singular: more dampening until the factorization succeeds.
            h[np.diag_indices_from(h)] += damp * float(np.mean(diag)) * 10
    raise np.linalg.LinAlgError("Hessian is not positive definite even after dampening")


def sparsegpt_prune(weights: np.ndarray, hessian: np.ndarray, pattern: SparsityPattern,
                    sparsity: float, damp: float = 0.01, block_columns: int = 128) -> np.ndarray:
    """The pruned and reconstructed [out, in] matrix (float64); zeros follow `pattern`."""
    w = np.array(weights, dtype=np.float64, copy=True)
    rows, cols = w.shape
    hinv, dead = _inverse_cholesky(hessian, damp)
    w[:, dead] = 0.0
    align = pattern.column_multiple
    block_columns = max(align, (block_columns // align) * align)
    for start in range(0, cols, block_columns):
        stop = min(start + block_columns, cols)
        block = w[:, start:stop].copy()
        errors = np.zeros_like(block)
        hinv_block = hinv[start:stop, start:stop]
        diag = np.diag(hinv_block)
        keep = np.ones_like(block, dtype=bool)
        if pattern.kind != "n:m":
            keep = select_mask(saliency(block, diag), pattern, sparsity)
        for j in range(stop - start):
            if pattern.kind == "n:m" and j % pattern.m == 0:
                group = slice(j, min(j + pattern.m, stop - start))
                keep[:, group] = select_mask(saliency(block[:, group], diag[group]), pattern, 0.0)
            column = block[:, j]
            kept = np.where(keep[:, j], column, 0.0)
            error = (column - kept) / diag[j]
            block[:, j:] -= np.outer(error, hinv_block[j, j:])
            block[:, j] = kept
            errors[:, j] = error
        w[:, start:stop] = block
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return w
