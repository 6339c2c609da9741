"""Top-1 accuracy of a digits model (the original or any compressed version) with onnxruntime.

    python -m models.digits.evaluate MODEL.onnx        # prints top1=<percent>
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .data import load_splits

__all__ = ["evaluate", "predict"]


def _model_bytes(model) -> bytes:
    """A path, serialized bytes or an onnx.ModelProto, as bytes for onnxruntime."""
    if isinstance(model, (str, Path)):
        return Path(model).read_bytes()
    if isinstance(model, bytes):
        return model
    return model.SerializeToString()


def predict(model, x: np.ndarray) -> np.ndarray:
    """Logits for samples x [N, 1, 8, 8]. The shipped model has a static batch of 1 but a
    compressed one may have any batch, so the batch is read from the session: a symbolic batch
    runs all samples at once, a static batch B runs chunks of B (the last one zero-padded, its
    padding rows dropped from the result)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3  # hide onnxruntime's optimizer warnings on rewritten graphs
    session = ort.InferenceSession(_model_bytes(model), options,
                                   providers=["CPUExecutionProvider"])
    meta = session.get_inputs()[0]
    batch = meta.shape[0] if isinstance(meta.shape[0], int) else len(x)
    outputs = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), *x.shape[1:]), x.dtype)])
        outputs.append(session.run(None, {meta.name: chunk})[0][:len(x) - start])
    return np.concatenate(outputs)


def evaluate(model, split: str = "test") -> float:
    """Top-1 accuracy in percent of `model` (path, bytes or ModelProto) on the test (default),
    calib or train split."""
    splits = load_splits()
    data = {"test": (splits.x_test, splits.y_test), "calib": (splits.x_calib, splits.y_calib),
            "train": (splits.x_train, splits.y_train)}
    if split not in data:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(data)}")
    x, y = data[split]
    return float((predict(model, x).argmax(axis=1) == y).mean() * 100)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m models.digits.evaluate MODEL.onnx")
    print(f"top1={evaluate(sys.argv[1]):.2f}")
