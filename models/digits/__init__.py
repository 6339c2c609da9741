"""The digits model: a small residual CNN trained on scikit-learn's real handwritten digits.

`MODEL_PATH` is the committed ONNX model (input `input` [1,1,8,8] float32, output `logits`
[1,10]); `evaluate` gives top-1 accuracy on the held-back test split; `calibration_npz` writes
calibration samples in the CLI's --calib format. `train.py` reproduces the model (needs torch).
"""

from pathlib import Path

from .data import calibration_npz, load_splits
from .evaluate import evaluate, predict

MODEL_PATH = Path(__file__).with_name("digits_resnet.onnx")

__all__ = ["MODEL_PATH", "evaluate", "predict", "load_splits", "calibration_npz"]
