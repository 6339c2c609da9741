"""Top-1 accuracy of a digits model (original or compressed) with onnxruntime.

    python -m models.digits.evaluate MODEL.onnx        # prints top1=<percent>
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .data import load_splits

__all__ = ["evaluate", "predict"]


def predict(model, x: np.ndarray) -> np.ndarray:
    """Logits for samples x[N,1,8,8], batched to whatever static batch the model takes."""
    import onnxruntime as ort
    data = Path(model).read_bytes() if isinstance(model, (str, Path)) else model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    meta = session.get_inputs()[0]
    batch = meta.shape[0] if isinstance(meta.shape[0], int) else len(x)
    outputs = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        if len(chunk) < batch:  # pad the last batch to the static size, drop the padding after
            chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), *x.shape[1:]), x.dtype)])
        outputs.append(session.run(None, {meta.name: chunk})[0][:len(x) - start])
    return np.concatenate(outputs)


def evaluate(model, split: str = "test") -> float:
    """Top-1 accuracy in percent on the test (default), calib or train split."""
    splits = load_splits()
    x, y = {"test": (splits.x_test, splits.y_test), "calib": (splits.x_calib, splits.y_calib),
            "train": (splits.x_train, splits.y_train)}[split]
    return float((predict(model, x).argmax(axis=1) == y).mean() * 100)


if __name__ == "__main__":
    print(f"top1={evaluate(sys.argv[1]):.2f}")
