"""Calibration methods on distributions whose good clipping range is known."""

import numpy as np
import pytest

from passes.quantize.ranges import METHODS, activation_range

N = 100_000


def _gaussian_with_outliers(seed=0):
    """N(0, 1) plus a few huge outliers (0.005% of the values), as seen after a bad input."""
    x = np.random.default_rng(seed).standard_normal(N)
    x[:5] = 40.0
    return x


def _qdq_mse(x, lo, hi):
    """Mean squared uint8 quantize-dequantize error over range [lo, hi] (numpy reference)."""
    scale = (hi - lo) / 255.0
    zero = np.round(-lo / scale)
    q = np.clip(np.rint(x / scale) + zero, 0, 255)
    return float(np.mean(((q - zero) * scale - x) ** 2))


def test_minmax_keeps_outliers():
    lo, hi = activation_range(_gaussian_with_outliers(), "minmax")
    assert hi == 40.0 and lo < -3.5


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_percentile_and_entropy_clip_rare_outliers(method):
    lo, hi = activation_range(_gaussian_with_outliers(), method)
    # The bulk of N(0,1) lies within +-4.5 sigma; 40 is clipped away.
    assert 3.0 < hi < 6.0 and -6.0 < lo < -3.0


def test_percentile_matches_numpy():
    x = _gaussian_with_outliers()
    lo, hi = activation_range(x, "percentile", percentile=99.9)
    assert lo == pytest.approx(np.percentile(x, 0.1)) and hi == pytest.approx(np.percentile(x, 99.9))
    lo_s, hi_s = activation_range(x, "percentile", symmetric=True, percentile=99.9)
    assert hi_s == -lo_s == pytest.approx(np.percentile(np.abs(x), 99.9))


def test_mse_clips_heavy_tails_to_the_known_optimum():
    # For a Laplace(b=1) distribution the 8-bit symmetric MSE-optimal clip is ~9.89 b (Banner et
    # al., 2019), below the ~12 b max of 100k samples.
    x = np.random.default_rng(1).laplace(size=N)
    lo, hi = activation_range(x, "mse", symmetric=True)
    assert hi == -lo
    assert 8.5 < hi < 11.0 < np.abs(x).max()


def test_mse_range_has_lower_error_than_minmax_with_outliers():
    x = np.random.default_rng(2).laplace(size=N)
    mse_range = activation_range(x, "mse")
    minmax_range = activation_range(x, "minmax")
    assert _qdq_mse(x, *mse_range) < _qdq_mse(x, *minmax_range)


@pytest.mark.parametrize("method", METHODS)
def test_uniform_data_is_not_clipped(method):
    # No outliers: every method keeps (nearly) the whole range.
    x = np.random.default_rng(3).uniform(-1.0, 1.0, N)
    lo, hi = activation_range(x, method)
    assert lo < -0.95 and hi > 0.95


@pytest.mark.parametrize("method", METHODS)
def test_ranges_contain_zero_and_are_symmetric_when_asked(method):
    x = np.random.default_rng(4).uniform(1.0, 3.0, N)        # all positive, away from 0
    lo, hi = activation_range(x, method)
    assert lo == 0.0 and hi > 2.5
    lo_s, hi_s = activation_range(x - 5.0, method, symmetric=True)
    assert hi_s == -lo_s and hi_s > 3.5


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown calibration method"):
        activation_range(np.ones(4), "median")


def test_entropy_ignores_the_zero_spike_of_relu_outputs():
    # Post-ReLU data: half exact zeros. Zeros are exact at any threshold, so they must not pull
    # the threshold down: the result equals the one on the nonzero values alone.
    rng = np.random.default_rng(5)
    positive = np.abs(rng.standard_normal(N // 2))
    relu = np.concatenate([np.zeros(N // 2), positive])
    assert activation_range(relu, "entropy") == activation_range(positive, "entropy")
    assert activation_range(relu, "entropy")[1] > 3.0
