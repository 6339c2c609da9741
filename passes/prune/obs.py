"""Structured Optimal Brain Surgeon: which units to remove from a layer, and how to update the
weights that remain so that the layer's output changes least (ZipLM, Kurtic et al. 2023;
SparseGPT's update, applied to whole rows instead of single weights).

A consumer layer is viewed as W [K inputs, N outputs] (MatMul layout) with input statistics
H = X^T X over calibration rows X [rows, K]. A *unit* (an FFN hidden unit, an attention head, a
conv channel) owns `span` consecutive input rows of W: unit u owns rows S_u = [u*span, (u+1)*span).
Rows past `units * span` (e.g. a bias row fed by a constant-1 column) are never removed.

With Hinv = (H + damp*mean(diag H)*I)^-1, removing the rows S (setting W_S = 0) while letting
every other row move costs, in summed squared output error,

    cost(S) = trace(W_S^T [Hinv_SS]^-1 W_S),

and the optimal move of the remaining rows is W <- W - Hinv[:, S] [Hinv_SS]^-1 W_S. Units are
removed greedily one at a time; after each removal Hinv is updated to the inverse of H with S
removed (Hinv <- Hinv - Hinv[:, S] [Hinv_SS]^-1 Hinv[S, :]), so later costs account for the
compensation already made. The weights of the final choice are then solved once more directly
on the kept rows (`refit_rows`): the same optimum in exact arithmetic, but free of the rounding
that a long chain of Hinv downdates accumulates when H is nearly singular. Several consumers
reading the same units (a residual-coupled conv channel feeds several layers) are handled
together: a unit's cost is the sum over consumers.

With an output metric M ([N, N], how each direction of the consumer's output reaches the model's
outputs, `passes.output_sensitivity`) the error is trace(dW^T H dW M) and a removal costs
trace(W_S^T [Hinv_SS]^-1 W_S M). The update of the remaining rows is the same: M weighs the
output columns alike for every input row, so the best compensation does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ConsumerProblem", "damped_inverse", "greedy_obs", "least_squares_start",
           "refit_rows"]


@dataclass
class ConsumerProblem:
    """One consumer layer of the units: its weight [K, N] and damped inverse Hessian [K, K].

    `span` is how many rows of `weight` each unit owns in this consumer (a head owns head-size
    rows of the output projection, a conv channel kh*kw rows of the im2col weight); `metric`
    ([N, N] or None for the identity) weighs the output error."""
    weight: np.ndarray
    hessian_inverse: np.ndarray
    span: int = 1
    metric: np.ndarray | None = None

    def _weighted(self, rows: np.ndarray) -> np.ndarray:
        """rows @ M (the rows themselves without a metric)."""
        return rows if self.metric is None else rows @ self.metric

    def rows(self, unit: int) -> np.ndarray:
        return np.arange(unit * self.span, (unit + 1) * self.span)

    def unit_costs(self, units: int) -> np.ndarray:
        """cost of removing each unit alone (from the current weight and Hinv), shape [units]."""
        if self.span == 1:
            diag = np.diag(self.hessian_inverse)[:units]
            rows = self.weight[:units]
            return (self._weighted(rows) * rows).sum(axis=1) / np.maximum(diag, 1e-300)
        index = np.arange(units * self.span).reshape(units, self.span)
        blocks = self.hessian_inverse[index[:, :, None], index[:, None, :]]  # [U, s, s]
        rows = self.weight[index]  # [U, s, N]
        # Removed units have a zero block: give them a harmless identity (their cost is masked).
        dead = np.abs(blocks).reshape(units, -1).max(axis=1) <= 1e-300
        blocks[dead] = np.eye(self.span)
        return (self._weighted(rows) * np.linalg.solve(blocks, rows)).sum(axis=(1, 2))

    def remove(self, unit: int) -> float:
        """Remove one unit with the OBS update; returns its cost."""
        rows = self.rows(unit)
        block = self.hessian_inverse[np.ix_(rows, rows)]
        column = self.hessian_inverse[:, rows]                     # [K, s]
        solved_weight = np.linalg.solve(block, self.weight[rows])  # [s, N]
        cost = float((self._weighted(self.weight[rows]) * solved_weight).sum())
        self.weight -= column @ solved_weight
        self.hessian_inverse -= column @ np.linalg.solve(block, column.T)
        self.weight[rows] = 0.0  # exactly zero (the update makes it zero up to rounding)
        self.hessian_inverse[rows, :] = 0.0
        self.hessian_inverse[:, rows] = 0.0
        return cost


def damped_inverse(hessian: np.ndarray, damp: float) -> tuple[np.ndarray, float]:
    """(H + damp*mean(diag H)*I)^-1 and the added strength; dead inputs (zero rows) get 1."""
    hessian = np.array(hessian, dtype=np.float64)
    diag = np.diag(hessian).copy()
    strength = damp * float(diag.mean()) + 1e-12
    dead = diag <= 0
    hessian[dead, dead] = 1.0
    hessian[np.diag_indices_from(hessian)] += strength
    return np.linalg.inv(hessian), strength


def least_squares_start(hessian: np.ndarray, cross_target: np.ndarray, weight: np.ndarray,
                        damp: float) -> tuple[np.ndarray, np.ndarray]:
    """The dense weight that best maps this layer's actual inputs to its target outputs, before
    any unit is removed, and the damped Hinv to prune it with.

    Minimizes ||X V - T||^2 + lam ||V - W||^2 (lam = damp * mean(diag H)): `cross_target` is
    X^T T. The ridge pulls toward the current weight W, not toward zero, so directions the
    calibration data do not excite keep their trained values. When the inputs are the ones the
    target was computed from (T = X W), the solution is W itself.
    """
    inverse, strength = damped_inverse(hessian, damp)
    start = inverse @ (cross_target + strength * weight)
    return start, inverse


def refit_rows(hessian: np.ndarray, cross_target: np.ndarray, weight: np.ndarray,
               keep_rows: np.ndarray, damp: float) -> np.ndarray:
    """min ||X V - T||^2 + lam ||V - W||^2 with the rows outside `keep_rows` fixed at zero
    (lam as in `damped_inverse`, from the whole H); returns V [K, N] with those rows zero."""
    hessian = np.asarray(hessian, dtype=np.float64)
    strength = damp * float(np.diag(hessian).mean()) + 1e-12
    kept = np.flatnonzero(keep_rows)
    system = hessian[np.ix_(kept, kept)] + strength * np.eye(len(kept))
    solution = np.zeros_like(weight, dtype=np.float64)
    solution[kept] = np.linalg.solve(system, cross_target[kept] + strength * weight[kept])
    return solution


def greedy_obs(problems: list[ConsumerProblem], units: int, remove: int,
               alive: np.ndarray | None = None) -> tuple[np.ndarray, list[float]]:
    """Remove `remove` units one at a time, cheapest first (summed over `problems`), updating
    every problem's weight and Hinv in place. Returns the kept-unit mask and the cost of each
    removal in order (their running sum is the total added output error)."""
    alive = np.ones(units, dtype=bool) if alive is None else alive.copy()
    costs = []
    for _ in range(min(remove, int(alive.sum()) - 1)):
        total = sum(p.unit_costs(units) for p in problems)
        total = np.where(alive, total, np.inf)
        unit = int(np.argmin(total))
        costs.append(sum(p.remove(unit) for p in problems))
        alive[unit] = False
    return alive, costs
