"""Per-group pruning ratios from a sensitivity scan (schedule=sensitivity).

Each prunable group is pruned alone, at the probe ratio, on a copy of the model; the relative
change of the model's outputs on calibration data is that group's sensitivity. Ratios are then
spread inversely to sensitivity (weight_g ~ 1 / sqrt(sensitivity_g)), normalized so that the
channel-weighted mean ratio equals the requested one: layers that barely notice lose more.
"""

from __future__ import annotations

import numpy as np

from ir import Model, copy_model, infer_shapes, to_onnx

from ..calibration import make_session
from ..core import PassContext
from .apply import remove_channels
from .groups import ChannelGroup, analyze_groups

__all__ = ["sensitivity_weights"]


def _run(model: Model, feeds) -> np.ndarray:
    session = make_session(to_onnx(model))
    return np.concatenate([np.ravel(r) for f in feeds for r in session.run(None, f)])


def sensitivity_weights(model: Model, prunable: list[ChannelGroup], scores: dict,
                        probe_ratio: float, ctx: PassContext, samples: int = 16) -> dict:
    """{group index: multiplier of the ratio}, channel-weighted mean 1."""
    feeds = ctx.require_calibration(model).feeds(model, samples)
    reference = _run(model, feeds).astype(np.float64)
    sensitivity = {}
    for group in ctx.progress(prunable, total=len(prunable), desc="prune-channels: sensitivity"):
        trial = copy_model(model)
        infer_shapes(trial)
        trial_groups = analyze_groups(trial.graph)  # deterministic: same indices as `prunable`
        keep = max(1, int(round(group.size * (1 - probe_ratio))))
        kept = {group.index: np.sort(np.argsort(-scores[group.index], kind="stable")[:keep])}
        remove_channels(trial.graph, trial_groups, kept)
        infer_shapes(trial)
        moved = _run(trial, feeds).astype(np.float64)
        sensitivity[group.index] = float(np.linalg.norm(moved - reference)
                                         / (np.linalg.norm(reference) + 1e-12)) + 1e-6
    raw = {i: 1.0 / np.sqrt(s) for i, s in sensitivity.items()}
    sizes = {g.index: g.size for g in prunable}
    mean = sum(raw[i] * sizes[i] for i in raw) / max(1, sum(sizes[i] for i in raw))
    return {i: w / mean for i, w in raw.items()}
