"""Sparsity patterns and mask selection on a weight viewed as a 2-D matrix W[out, in].

Orientation (the same for every pattern, every method and the metadata the backends read):
- Every weight is viewed as ``W[out, in]``: rows are output channels/features, columns are the
  inputs that one output reads (see `passes.sparsify.layers` for how each op's weight is viewed).
- ``block RxC``: the zeros come in tiles of R consecutive output rows x C consecutive input
  columns, aligned at multiples of R and C. ``4x1`` = 4 output rows sharing one input column
  (what a kernel that vectorizes over outputs wants), ``1x4`` = 4 consecutive inputs of one row.
  When the shape is not a multiple of the block, the last row/column of tiles is partial; a
  partial tile is kept or dropped whole, like the others.
- ``N:M``: in every M consecutive inputs of one output row (aligned at multiples of M) at most N
  weights are nonzero — NVIDIA's 2:4. A trailing partial group of r < M inputs keeps min(N, r),
  i.e. it behaves as if padded with zeros to M.
- ``unstructured``: any element may be zero.

`select_mask(scores, pattern, sparsity)` keeps the highest-scoring elements / tiles / group
members; scores are "importance" (|W| for magnitude, |W|·||x|| for Wanda, OBS saliency for
SparseGPT). Tiles compete by their *mean* score, so a partial edge tile is judged per weight like a
full one, and the count of pruned weights is as close to the target as whole tiles allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core import OptionError

__all__ = ["SparsityPattern", "parse_pattern", "select_mask", "nm_group_nonzeros",
           "block_tile_nonzeros"]


@dataclass(frozen=True)
class SparsityPattern:
    """kind: 'unstructured' | 'block' | 'n:m'; block = (R, C) rows x columns; n, m for N:M."""
    kind: str
    block: tuple[int, int] = (1, 1)
    n: int = 0
    m: int = 0

    @property
    def fixed_density(self) -> float | None:
        """N:M fixes the density at N/M whatever sparsity was asked for."""
        return self.n / self.m if self.kind == "n:m" else None

    @property
    def column_multiple(self) -> int:
        """Column alignment a column-wise algorithm (SparseGPT) must respect."""
        return self.m if self.kind == "n:m" else self.block[1]

    def describe(self) -> dict:
        info = {"pattern": self.kind}
        if self.kind == "block":
            info["block"] = list(self.block)
        if self.kind == "n:m":
            info["n"], info["m"] = self.n, self.m
        return info

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block {self.block[0]}x{self.block[1]}"
        if self.kind == "n:m":
            return f"{self.n}:{self.m}"
        return "unstructured"


def _parse_ints(text: str, separators: str, what: str) -> tuple[int, int]:
    for sep in separators:
        if sep in text:
            left, _, right = text.partition(sep)
            try:
                a, b = int(left), int(right)
            except ValueError:
                break
            if a >= 1 and b >= 1:
                return a, b
            break
    raise OptionError(f"sparsify: {what}={text!r} must look like "
                      f"{'4x1' if what == 'block' else '2:4 (or 2/4, 2of4 in a spec string)'}")


def parse_pattern(pattern: str, block: str = "4x1", nm: str = "2:4") -> SparsityPattern:
    """The pattern named by the pass options.

    `nm` accepts ``2:4`` and, because ``:`` separates options in a pipeline spec, also ``2/4``
    and ``2of4``; `pattern` may itself be ``unstructured``, ``block``, ``nm``/``n:m``, a block
    shape (``4x1``) or an N:M ratio (``2of4``).
    """
    kind = pattern.strip().lower()
    if kind in ("nm", "n:m", "n/m"):
        n, m = _parse_ints(nm.strip().lower(), (":", "/", "of"), "nm")
        kind = "n:m"
    elif kind == "block":
        r, c = _parse_ints(block.strip().lower(), "x", "block")
        return SparsityPattern("block", (r, c)) if (r, c) != (1, 1) else SparsityPattern("unstructured")
    elif kind == "unstructured":
        return SparsityPattern("unstructured")
    elif "x" in kind:
        return parse_pattern("block", block=kind)
    elif any(sep in kind for sep in (":", "/", "of")):
        return parse_pattern("nm", nm=kind)
    else:
        raise OptionError(f"sparsify: pattern={pattern!r} is not one of unstructured, block, nm")
    if n > m:
        raise OptionError(f"sparsify: nm={nm!r} keeps more than it groups (N must be <= M)")
    return SparsityPattern("n:m", n=n, m=m)


def select_mask(scores: np.ndarray, pattern: SparsityPattern, sparsity: float,
                per_row: bool = False) -> np.ndarray:
    """Boolean keep-mask of `scores`' shape [out, in] following `pattern`.

    `sparsity` is the fraction of weights to zero (ignored by N:M, whose density is fixed).
    `per_row=True` (unstructured only) prunes the same fraction of every output row, the
    comparison group that Wanda uses.
    """
    if scores.ndim != 2:
        raise ValueError(f"select_mask needs a 2-D score matrix, got shape {scores.shape}")
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0)
    if pattern.kind == "n:m":
        return _nm_mask(scores, pattern.n, pattern.m)
    if pattern.kind == "block":
        return _block_mask(scores, pattern.block, sparsity)
    if per_row:
        return np.stack([_unstructured_mask(row[None, :], sparsity)[0] for row in scores]) \
            if len(scores) else np.ones_like(scores, dtype=bool)
    return _unstructured_mask(scores, sparsity)


def _unstructured_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    prune = int(round(sparsity * scores.size))
    keep = np.ones(scores.size, dtype=bool)
    # A stable sort so that ties (e.g. equal magnitudes) are broken the same way every run.
    keep[np.argsort(scores.ravel(), kind="stable")[:prune]] = False
    return keep.reshape(scores.shape)


def _block_mask(scores: np.ndarray, block: tuple[int, int], sparsity: float) -> np.ndarray:
    rows, cols = scores.shape
    r, c = block
    tiles_r, tiles_c = math.ceil(rows / r), math.ceil(cols / c)
    padded = np.full((tiles_r * r, tiles_c * c), np.nan)
    padded[:rows, :cols] = scores
    tiles = padded.reshape(tiles_r, r, tiles_c, c)
    sizes = (~np.isnan(tiles)).sum(axis=(1, 3)).ravel()
    means = (np.nansum(tiles, axis=(1, 3)).ravel() / sizes)
    order = np.argsort(means, kind="stable")
    pruned_after = np.concatenate([[0], np.cumsum(sizes[order])])
    target = sparsity * scores.size
    count = int(np.argmin(np.abs(pruned_after - target)))  # whole tiles closest to the target
    tile_keep = np.ones(tiles_r * tiles_c, dtype=bool)
    tile_keep[order[:count]] = False
    tile_keep = tile_keep.reshape(tiles_r, tiles_c)
    return np.repeat(np.repeat(tile_keep, r, axis=0), c, axis=1)[:rows, :cols]


def _nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    rows, cols = scores.shape
    pad = (-cols) % m
    # Padding scores -inf ranks the virtual zeros last, so a partial group keeps min(n, r).
    grouped = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf).reshape(rows, -1, m)
    top = np.argsort(-grouped, axis=2, kind="stable")[..., :n]
    keep = np.zeros(grouped.shape, dtype=bool)
    np.put_along_axis(keep, top, True, axis=2)
    return keep.reshape(rows, -1)[:, :cols]


def nm_group_nonzeros(matrix: np.ndarray, m: int) -> np.ndarray:
    """Nonzero count of every group of M consecutive inputs per row, shape [rows, groups]
    (a trailing partial group counts its real inputs only)."""
    nonzero = np.asarray(matrix) != 0
    rows, cols = nonzero.shape
    pad = (-cols) % m
    return np.pad(nonzero, ((0, 0), (0, pad))).reshape(rows, -1, m).sum(axis=2)


def block_tile_nonzeros(matrix: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Nonzero count of every R x C tile (partial edge tiles included), shape [tiles_r, tiles_c]."""
    rows, cols = matrix.shape
    r, c = block
    tiles_r, tiles_c = math.ceil(rows / r), math.ceil(cols / c)
    padded = np.zeros((tiles_r * r, tiles_c * c), dtype=bool)
    padded[:rows, :cols] = np.asarray(matrix) != 0
    return padded.reshape(tiles_r, r, tiles_c, c).sum(axis=(1, 3))
