"""The digits model: a small residual CNN trained on scikit-learn's real handwritten digits.

`MODEL_PATH` is the committed ONNX model (input `input` [1,1,8,8] float32, output `logits`
[1,10]); `evaluate` gives top-1 accuracy on the held-back test split; `load_splits` returns the
train/calib/test splits; `calibration_npz` writes calibration samples in the CLI's --calib
format. `train.py` reproduces the model (needs torch, which nothing else here imports).
"""

import warnings
from pathlib import Path

from .data import calibration_npz, load_splits
from .evaluate import evaluate, predict

# Importing `evaluate` here (so `models.digits.evaluate` is the function, whatever gets imported
# later) makes `python -m models.digits.evaluate` warn that the module is already loaded. Running
# it again as __main__ is harmless here (it only defines functions), so silence exactly that.
warnings.filterwarnings("ignore", category=RuntimeWarning,
                        message="'models.digits.evaluate' found in sys.modules")

MODEL_PATH = Path(__file__).resolve().with_name("digits_resnet.onnx")

__all__ = ["MODEL_PATH", "evaluate", "predict", "load_splits", "calibration_npz"]
