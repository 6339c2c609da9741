"""Sensitivity-driven mixed precision: keep the layers whose quantization hurts the outputs most
in float until the whole model's output fidelity on calibration data meets a budget.

Fidelity is measured without labels, against the float model on the calibration feeds:

    drop = 100 * (1 - mean cosine similarity of every graph output, per feed and batch item)

in points (0 = identical outputs). A layer's sensitivity is the drop when only that layer is
quantized. Layers are then returned to float most-sensitive first until the fully quantized rest
meets `max_drop` (greedy; each step is one measured trial model).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ir import Model, load_model, to_onnx

from ..calibration import make_session
from .apply import apply_qdq
from .qparams import QuantParams
from .targets import QuantTarget, find_targets

__all__ = ["output_drop", "choose_float_layers"]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64) if a.ndim > 1 else a.reshape(1, -1)
    b = b.reshape(b.shape[0], -1).astype(np.float64) if b.ndim > 1 else b.reshape(1, -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    return np.where(norms > 0, dots / np.maximum(norms, 1e-30),
                    np.where(np.all(a == b, axis=1), 1.0, 0.0))


def output_drop(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    """100 * (1 - mean cosine) over feeds, outputs and batch items."""
    cosines = [_cosines(r, c) for ref, cand in zip(reference, candidate)
               for r, c in zip(ref, cand) if np.issubdtype(np.asarray(r).dtype, np.floating)]
    return float(100.0 * (1.0 - np.mean(np.concatenate(cosines)))) if cosines else 0.0


def _run(proto, feeds) -> list[list[np.ndarray]]:
    session = make_session(proto)
    return [session.run(None, feed) for feed in feeds]


def choose_float_layers(model: Model, targets: list[QuantTarget],
                        activation: dict[str, QuantParams], feeds: list[dict],
                        max_drop: float, per_channel: bool, outputs: bool = False,
                        progress: Callable = lambda items, **_: items):
    """Layer names to keep in float, the final measured drop, and a per-layer report."""
    base = to_onnx(model)
    reference = _run(base, feeds)

    def trial_drop(quantized: set[str]) -> float:
        trial = load_model(base)
        chosen = [t for t in find_targets(trial, sorted({t.node.op_type for t in targets}), [])[0]
                  if t.name in quantized]
        apply_qdq(trial, chosen, activation, per_channel, outputs)
        return output_drop(reference, _run(to_onnx(trial), feeds))

    names = [t.name for t in targets]
    sensitivity = {name: trial_drop({name}) for name in progress(names, total=len(names),
                                                                 desc="quantize: sensitivity")}
    order = sorted(names, key=lambda n: sensitivity[n], reverse=True)
    kept_float: list[str] = []
    drop = trial_drop(set(names))
    first_drop = drop
    while drop > max_drop and len(kept_float) < len(order):
        kept_float.append(order[len(kept_float)])
        drop = trial_drop(set(names) - set(kept_float))
    report = [{"node": name, "sensitivity_drop": round(sensitivity[name], 6),
               "precision": "float" if name in kept_float else "int8"} for name in names]
    return kept_float, {"all_int8_drop": first_drop, "final_drop": drop}, report
