"""Calibration: pick the float range [lo, hi] an activation tensor is quantized over.

Every method reads the calibration values of one tensor (a flat float array):

    minmax      the observed min and max (keeps outliers, so the step can be coarse)
    percentile  the `percentile`-th and (100 - percentile)-th percentiles (clips rare outliers);
                symmetric: the `percentile`-th percentile of |x|
    entropy     TensorRT's KL-divergence threshold on the histogram of |x| (exact zeros left
                out): the clipping threshold whose quantized distribution loses the least
                information
    mse         the clipping range minimizing the mean squared quantize-dequantize error,
                evaluated on a 2048-bin histogram (bin centers weighted by their counts)

`symmetric` says the range will be stored as int8 symmetric ([-T, T]); otherwise as uint8
asymmetric. The range returned always contains 0 so that zero (padding, ReLU's floor) is exactly
representable.
"""

from __future__ import annotations

import numpy as np

__all__ = ["METHODS", "activation_range", "HIST_BINS"]

METHODS = ("minmax", "percentile", "entropy", "mse")
HIST_BINS = 2048


def activation_range(samples: np.ndarray, method: str, symmetric: bool = False,
                     percentile: float = 99.99) -> tuple[float, float]:
    """[lo, hi] for one activation tensor, by calibration `method` (see module doc)."""
    values = np.asarray(samples, np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 0.0
    lo, hi = float(values.min()), float(values.max())
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
    if method == "minmax" or lo == hi:
        pass
    elif method == "percentile":
        if symmetric:
            t = float(np.percentile(np.abs(values), percentile))
            lo, hi = max(lo, -t), min(hi, t)
        else:
            lo = float(np.percentile(values, 100.0 - percentile))
            hi = float(np.percentile(values, percentile))
    elif method == "entropy":
        # 256 levels when the tensor is nonnegative (post-ReLU) and stored as uint8, else 128
        # levels per sign, as TensorRT does for int8.
        # Exact zeros (ReLU's floor, padding) are left out of the histogram: they are exact at
        # any threshold, and their spike otherwise dominates both distributions so that KL
        # barely sees the clipped tail (digits, post-ReLU: top-1 98.1 with them, 99.4 without,
        # = float; and the chosen cut jumped with the search stride).
        levels = 256 if (not symmetric and lo >= 0) else 128
        magnitudes = np.abs(values)
        t = _kl_threshold(magnitudes[magnitudes > 0], levels)
        lo, hi = max(lo, -t), min(hi, t)
    else:
        lo, hi = _mse_range(values, lo, hi, symmetric)
    if symmetric:
        bound = max(abs(lo), abs(hi))
        return -bound, bound
    return min(lo, 0.0), max(hi, 0.0)


# -- entropy (KL divergence, TensorRT's method) ---------------------------------------------------
def _kl_threshold(magnitudes: np.ndarray, levels: int, bins: int = HIST_BINS,
                  stride: int = 4) -> float:
    """The |x| threshold whose `levels`-bin quantized histogram is closest (KL) to the original.

    For each candidate cut i (in bins): P = hist[:i] with the clipped tail added to its last bin;
    Q = hist[:i] merged into `levels` groups and spread back uniformly over each group's nonzero
    bins. The threshold is the cut minimizing KL(P || Q). Cuts are tried every `stride` bins.
    """
    amax = float(magnitudes.max()) if magnitudes.size else 0.0
    if amax == 0.0:
        return 0.0
    hist, edges = np.histogram(magnitudes, bins=bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    best_kl, best_cut = np.inf, bins
    for cut in range(levels, bins + 1, stride):
        p = hist[:cut].copy()
        p[-1] += hist[cut:].sum()
        nonzero = hist[:cut] != 0
        group = (np.arange(cut) * levels) // cut          # the quantized level each bin joins
        group_sum = np.bincount(group, weights=hist[:cut], minlength=levels)
        group_nonzero = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, group_sum[group] / np.maximum(group_nonzero[group], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best_cut = kl, cut
    return float(edges[best_cut])


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    if q.sum() == 0:
        return np.inf
    p, q = _smooth(p / p.sum()), _smooth(q / q.sum())
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _smooth(dist: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Give empty bins a small mass `eps`, taken from the others (MXNet / onnxruntime do the
    same): without it a bin of P that Q leaves empty, e.g. an isolated outlier clipped into the
    last bin, makes KL infinite for every cut and the method falls back to the full range."""
    zero = dist == 0
    n_zero, n_nonzero = int(zero.sum()), int((~zero).sum())
    if n_zero == 0 or n_nonzero == 0:
        return dist
    taken = eps * n_zero / n_nonzero
    return np.where(zero, eps, dist - taken).clip(min=eps * 1e-3)


# -- mse --------------------------------------------------------------------------------------------
def _grid_error(centers: np.ndarray, weights: np.ndarray, lo: float, hi: float,
                symmetric: bool) -> float:
    """Squared quantize-dequantize error of the histogram under range [lo, hi]."""
    if symmetric:
        scale, zero, qmin, qmax = max(abs(lo), abs(hi)) / 127.0, 0.0, -127, 127
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / 255.0
        zero, qmin, qmax = float(np.clip(np.round(-lo / scale), 0, 255)) if scale else 0.0, 0, 255
    if scale <= 0:
        return float(np.sum(weights * centers ** 2))
    q = np.clip(np.rint(centers / scale) + zero, qmin, qmax)
    return float(np.sum(weights * ((q - zero) * scale - centers) ** 2))


def _mse_range(values: np.ndarray, lo: float, hi: float, symmetric: bool,
               steps: int = 64) -> tuple[float, float]:
    """Search shrink factors of the observed range for the least quantize-dequantize MSE
    (one factor for symmetric or nonnegative tensors, one per side otherwise)."""
    hist, edges = np.histogram(values, bins=HIST_BINS, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    keep = hist > 0
    centers, weights = centers[keep], hist[keep].astype(np.float64)
    factors = np.linspace(1.0 / steps, 1.0, steps)
    if symmetric:
        bound = max(abs(lo), abs(hi))
        candidates = [(-bound * f, bound * f) for f in factors]
    elif lo >= 0:
        candidates = [(0.0, hi * f) for f in factors]
    elif hi <= 0:
        candidates = [(lo * f, 0.0) for f in factors]
    else:
        coarse = factors[::2]
        candidates = [(lo * a, hi * b) for a in coarse for b in coarse]
    errors = [_grid_error(centers, weights, c_lo, c_hi, symmetric) for c_lo, c_hi in candidates]
    return candidates[int(np.argmin(errors))]
