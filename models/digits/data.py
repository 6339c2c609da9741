"""The digits dataset splits shared by training, calibration and evaluation (no torch needed).

scikit-learn's digits: 1,797 real 8x8 handwritten digits, pixel values 0..16, 10 classes.
- test: 20% (360 images), `train_test_split(test_size=0.2, random_state=0, stratify=y)`; never
  trained on, and the split every accuracy in the project is reported on.
- train: the other 80% (1,437 images).
- calib: 128 training images taken after a seeded shuffle, for post-training passes (pruning,
  sparsity, quantization) that need activations. It is a subset of train, so no pass tunes on
  test data.
Inputs are scaled to [0, 1] (x / 16) and shaped [N, 1, 8, 8] (NCHW), float32; labels int64.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["Splits", "load_splits", "calibration_npz", "INPUT_NAME", "CALIBRATION_SAMPLES"]

INPUT_NAME = "input"  # the model's graph input, and so the key of the --calib file
CALIBRATION_SAMPLES = 128
_SEED = 0


class Splits(NamedTuple):
    """x arrays are float32 [N, 1, 8, 8] in [0, 1]; y arrays are int64 class ids [N]."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    y_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_splits() -> Splits:
    """The train/calib/test splits exactly as `train.py` used them (deterministic)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=_SEED, stratify=y)
    # A seeded shuffle rather than the first rows, so calibration is not biased by row order.
    order = np.random.default_rng(_SEED).permutation(len(x_train))[:CALIBRATION_SAMPLES]
    return Splits(x_train, y_train, x_train[order], y_train[order], x_test, y_test)


def calibration_npz(path, n: int = CALIBRATION_SAMPLES) -> Path:
    """Write the first `n` calibration samples as the CLI's --calib file: one array keyed by the
    graph input name, samples on the first axis ([n, 1, 8, 8] float32). Returns the path."""
    if not 0 < n <= CALIBRATION_SAMPLES:
        raise ValueError(f"n must be in 1..{CALIBRATION_SAMPLES}, got {n}")
    path = Path(path)
    np.savez(path, **{INPUT_NAME: load_splits().x_calib[:n]})
    return path
