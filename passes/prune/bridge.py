"""Linear bridges for removed blocks (prune-layers bridge=linear).

Removing a block y = B(x) maps its output to its input (y := x). A bridge keeps a cheap affine
correction instead, y := x + x D + c, with D [F, F] and c [F] fitted by ridge least squares on
calibration tokens so that it reproduces what the original block produced (the ridge pulls D
toward zero, i.e. toward plain removal). Blocks are bridged in graph order and each fit uses the
block's input in the model bridged so far, so a bridge also absorbs the error of the bridges
before it. It costs F*F MACs per token (a transformer layer of hidden size F with a 4F FFN costs
about 12*F*F plus attention). Activations must be tokens [batch, seq, F] or rows [batch, F]
(NCHW feature maps are refused: a map over their last axis would mix positions); padding
tokens (0 in the token mask input) are left out.
"""

from __future__ import annotations

import numpy as np

from ir import Graph, Model, Value

from ..calibration import capture_session, real_token_rows
from ..core import OptionError

__all__ = ["fit_bridge", "insert_bridge", "bridge_rows"]


def bridge_rows(model: Model, names: list[str], calibration, samples: int,
                mask_name: str | None) -> dict[str, np.ndarray]:
    """{value name: rows [tokens, F] float32} of real tokens over the calibration feeds."""
    session = capture_session(model, names)
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feed in calibration.feeds(model, samples):
        mask = np.asarray(feed[mask_name]) != 0 if mask_name in feed else None
        for name, value in zip(names, session.run(names, feed)):
            value = real_token_rows(value, mask)
            rows[name].append(value.reshape(-1, value.shape[-1]).astype(np.float32))
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def fit_bridge(x: np.ndarray, y: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """D, c minimizing ||x + x D + c - y||^2 + lam ||D||^2, lam = damp * mean(diag x^T x)."""
    count = max(len(x), 1)
    design = np.hstack([x, np.ones((len(x), 1), np.float32)])
    gram = (design.T @ design).astype(np.float64) / count
    strength = damp * float(np.diag(gram)[:-1].mean()) + 1e-12
    ridge = np.full(len(gram), strength)
    ridge[-1] = 1e-12  # the offset c is not pulled toward zero
    rhs = (design.T @ (y - x)).astype(np.float64) / count
    solution = np.linalg.solve(gram + np.diag(ridge), rhs)
    return solution[:-1], solution[-1]


def insert_bridge(graph: Graph, source: Value, update: np.ndarray, offset: np.ndarray,
                  name: str) -> Value:
    """Nodes computing source + source @ update + offset; returns their output value."""
    if source.shape is None or len(source.shape) not in (2, 3) or source.shape[-1] != len(update):
        raise OptionError("prune-layers: bridge=linear needs [batch, features] or [batch, seq, "
                          f"features] activations; {source.name} has shape {source.shape}")
    dtype = source.dtype or np.float32
    matmul = graph.add_node("MatMul", [source, graph.add_constant(name + "/bridge_weight",
                                                                  update.astype(dtype))],
                            name=name + "/bridge_matmul")
    shifted = graph.add_node("Add", [matmul.output, graph.add_constant(
        name + "/bridge_bias", offset.astype(dtype))], name=name + "/bridge_add")
    summed = graph.add_node("Add", [shifted.output, source], name=name + "/bridge_residual")
    for node in (matmul, shifted, summed):
        node.output.dtype, node.output.shape = dtype, source.shape
    return summed.output
