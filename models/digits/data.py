"""The digits dataset splits shared by training, calibration and evaluation (no torch needed).

scikit-learn's digits: 1,797 real 8x8 handwritten digits, pixel values 0..16, 10 classes. The test
split (20%, stratified, random_state=0) is never trained on; the calibration split is 128 training
samples after a seeded shuffle, used by post-training passes (pruning, sparsity, quantization).
Inputs are scaled to [0, 1] and shaped [N, 1, 8, 8] (NCHW), float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["Splits", "load_splits", "calibration_npz", "INPUT_NAME", "CALIBRATION_SAMPLES"]

INPUT_NAME = "input"
CALIBRATION_SAMPLES = 128
_SEED = 0


class Splits(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    y_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_splits() -> Splits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=_SEED, stratify=y)
    order = np.random.default_rng(_SEED).permutation(len(x_train))[:CALIBRATION_SAMPLES]
    return Splits(x_train, y_train, x_train[order], y_train[order], x_test, y_test)


def calibration_npz(path, n: int = CALIBRATION_SAMPLES) -> Path:
    """Write the first `n` calibration samples as the CLI's --calib file (key = input name)."""
    splits = load_splits()
    path = Path(path)
    np.savez(path, **{INPUT_NAME: splits.x_calib[:n]})
    return path
