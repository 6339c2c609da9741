"""criterion=obs: choose the units to remove by the output error they cause, and update the
remaining weights of their consumer layers to absorb it, layer by layer (no retraining).

For each prunable group, in graph order of its consumer layers (see `consumers`):
1. X = the consumers' input on calibration data in the model *as pruned so far* (`sequential`)
   or in the original model; X_ref = the same input in the original model. Padding tokens (0 in
   the token mask input) are left out: they never reach a pooled output, and in short sentences
   padded to a long sequence they would be most of the rows.
2. The target is the original consumer's output T = X_ref W_ref (+ bias). A damped least-squares
   start V = argmin ||X V - T||^2 + lam ||V - W||^2 lets this layer correct the error that
   earlier pruned layers left in X (with X = X_ref it is W itself).
3. Structured OBS (`obs.greedy_obs`) removes units one at a time from V, cheapest first, moving
   the remaining rows (and the bias) optimally after each removal.
Weights are written in place with the removed rows zero, which is exactly the pruned model's
function, so the next group's statistics see the pruning so far; the caller then slices the
channels out physically.

`allocate_removals` (schedule=global) decides how many units each group loses: every group's
greedy OBS removal curve is measured on the original model, its cost normalized by the energy of
the consumers' output (plus the residual stream it is added to, if any: the sum a normalization
layer then sees), and removals go where the normalized marginal cost is lowest, while the
total per kind (attention heads / other channels) matches the requested ratios.
`output_scan_removals` (schedule=output) allocates the same way from measured costs instead:
the change of the model's outputs when one group alone is pruned (`passes.output_probe`).
"""

from __future__ import annotations

import numpy as np

from ir import Model

from ..core import PassContext
from ..output_probe import OutputProbe
from ..staged_capture import StagedCapture
from .consumers import Consumer, group_consumers, linear_consumer, output_rows, token_rows
from .groups import ChannelGroup
from .obs import ConsumerProblem, damped_inverse, greedy_obs, least_squares_start, refit_rows

__all__ = ["obs_consumers", "capture_rows", "allocate_removals", "output_scan_removals",
           "obs_prune", "refit_candidates"]

# Rows kept per calibration feed and consumer at most (a conv layer on a large image has many
# im2col patches; a seeded subsample, the same for the pruned and the original model, is enough).
MAX_ROWS_PER_FEED = 4096
RESIDUAL = "|residual"  # key suffix of a consumer's residual rows in capture_rows' result
# Removal counts measured per group by the output scan (evenly spread up to the group's limit).
SCAN_LEVELS = 8


def obs_consumers(groups: list[ChannelGroup]) -> dict[int, list[Consumer]]:
    """{group index: its consumers} for the groups whose every consumer is supported."""
    plans = {}
    for group in groups:
        consumers = group_consumers(group)
        if consumers:
            plans[group.index] = consumers
    return plans


def capture_rows(model: Model, consumers: list[Consumer], calibration, samples: int,
                 mask_name: str | None, seed: int = 0) -> dict[str, np.ndarray]:
    """{consumer node name: design rows [rows, K] float32} over the calibration feeds, and
    {name + RESIDUAL: rows [rows, N]} of each consumer's residual partner (when it has one)."""
    names = sorted({c.node.input(0).name for c in consumers}
                   | {c.residual.name for c in consumers if c.residual is not None})
    feeds = calibration.feeds(model, samples)
    # Only what `names` need runs: an early layer's input costs a fraction of a full run, and
    # pruning captures once per group.
    captured = StagedCapture(model, feeds, keep=False).capture(names)
    rows: dict[str, list[np.ndarray]] = {}
    for index, (feed, values) in enumerate(zip(feeds, captured)):
        mask = token_rows(feed, mask_name)
        for consumer in consumers:
            parts = {consumer.node.name: consumer.rows(values[consumer.node.input(0).name], mask)}
            if consumer.residual is not None:
                parts[consumer.node.name + RESIDUAL] = output_rows(
                    values[consumer.residual.name], mask, consumer.node.op_type == "Conv")
            for name, x in parts.items():
                if len(x) > MAX_ROWS_PER_FEED:  # the same pick for a layer and its residual
                    pick = np.random.default_rng([seed, index]).choice(
                        len(x), MAX_ROWS_PER_FEED, replace=False)
                    x = x[np.sort(pick)]
                rows.setdefault(name, []).append(np.asarray(x, dtype=np.float32))
    return {name: np.concatenate(parts) for name, parts in rows.items() if parts}


def _augment(x: np.ndarray, bias: bool) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1), np.float32)]) if bias else x


def _moments(x: np.ndarray, x_ref: np.ndarray, bias: bool) -> tuple[np.ndarray, np.ndarray]:
    """H = E[x x^T] and C = E[x x_ref^T] (products in float32 BLAS, stored in float64)."""
    x, x_ref = _augment(x, bias), _augment(x_ref, bias)
    count = max(len(x), 1)
    hessian = (x.T @ x).astype(np.float64) / count
    cross = hessian if x_ref is x else (x.T @ x_ref).astype(np.float64) / count
    return hessian, cross


def _output_energy(weight: np.ndarray, hessian: np.ndarray, x: np.ndarray,
                   residual: np.ndarray | None, bias: bool) -> float:
    """E||y||^2 of the consumer's output y = x W (+ b), or of y + r when the output is added to
    a residual stream r: an error matters relative to what the next normalization sees."""
    energy = float(np.einsum("kn,kj,jn->", weight, hessian, weight))
    if residual is not None:
        count = max(len(x), 1)
        cross = (_augment(x, bias).T @ residual).astype(np.float64) / count
        energy += 2 * float((weight * cross).sum()) + float((residual.astype(np.float64) ** 2
                                                             ).sum()) / count
    return energy


def _removal_levels(group: ChannelGroup, step: int, limit: int) -> list[int]:
    """Allowed numbers of removed units: kept counts stay multiples of `step` and >= step."""
    if group.size <= step:
        return [0]
    return [r for r in range(0, min(limit, group.size - step) + 1)
            if r == 0 or (group.size - r) % step == 0]


def allocate_removals(groups: list[ChannelGroup], plans: dict[int, list[Consumer]],
                      rows: dict[str, np.ndarray], totals: dict[str, int], steps: dict[int, int],
                      damp: float, progress=None, metrics: dict | None = None
                      ) -> tuple[dict[int, int], dict[int, float]]:
    """Removed units per group (schedule=global with criterion=obs) and the normalized OBS
    cost of that choice per group.

    `totals` is the number of units to remove per group kind ("heads", "channels"); `steps`
    the rounding unit of each group's kept count; `metrics` the output metric per consumer node
    name (see `obs`). Curves run on copies: nothing is modified."""
    limit_fraction = _limit_fractions(groups, totals)
    curves: dict[int, np.ndarray] = {}
    wrapped = progress(groups, total=len(groups), desc="prune-channels: obs curves") \
        if progress else groups
    for group in wrapped:
        if group.index not in plans or group.kind not in totals:
            continue
        problems, energy = [], 0.0
        for consumer in plans[group.index]:
            x = rows[consumer.node.name]
            hessian, _ = _moments(x, x, consumer.has_bias)
            weight = consumer.matrix()
            energy += _output_energy(weight, hessian, x, rows.get(consumer.node.name + RESIDUAL),
                                     consumer.has_bias)
            metric = (metrics or {}).get(consumer.node.name)
            problems.append(ConsumerProblem(weight, damped_inverse(hessian, damp)[0],
                                            consumer.span, metric))
        limit = int(np.ceil(group.size * limit_fraction[group.kind]))
        _, costs = greedy_obs(problems, group.size, min(limit, group.size - 1))
        curves[group.index] = np.concatenate([[0.0], np.cumsum(costs)]) / (energy + 1e-30)
    removed = _allocate(groups, curves, totals, steps)
    cost = {index: float(curves[index][removed[index]]) for index in curves}
    return removed, cost


def _limit_fractions(groups: list[ChannelGroup], totals: dict[str, int]) -> dict[str, float]:
    """The most of one group a curve is measured for: twice the kind's average share + 10%."""
    return {kind: min(0.95, 2.0 * total / max(1, sum(g.size for g in groups if g.kind == kind))
                      + 0.1) for kind, total in totals.items()}


def output_scan_removals(groups: list[ChannelGroup], plans: dict[int, list[Consumer]],
                         rows: dict[str, np.ndarray], totals: dict[str, int],
                         steps: dict[int, int], damp: float, probe: OutputProbe,
                         progress=None, metrics: dict | None = None
                         ) -> tuple[dict[int, int], dict[int, dict]]:
    """Removed units per group (schedule=output with criterion=obs), from the error each group's
    pruning alone causes at the model's outputs.

    Each group is pruned by greedy OBS on the original model's statistics, its consumers
    refitted, at up to SCAN_LEVELS removal counts, and `probe` measures the outputs; the
    consumers are restored after each trial. The costs between measured counts are
    interpolated, so the allocation keeps the exact per-kind totals. Returns the removals and,
    per group, the measured {removed units: output error}."""
    limit_fraction = _limit_fractions(groups, totals)
    curves: dict[int, np.ndarray] = {}
    measured: dict[int, dict] = {}
    wrapped = progress(groups, total=len(groups), desc="prune-channels: output scan") \
        if progress else groups
    for group in wrapped:
        if group.index not in plans or group.kind not in totals:
            continue
        consumers = plans[group.index]
        original = {c.node.name: c.matrix() for c in consumers}
        systems = _fit_systems(consumers, rows, rows, original, damp, residual=False)
        problems = [ConsumerProblem(start.copy(), inverse, c.span,
                                    (metrics or {}).get(c.node.name))
                    for c, (_, _, _, start, inverse) in zip(consumers, systems)]
        limit = min(int(np.ceil(group.size * limit_fraction[group.kind])), group.size - 1)
        allowed = [r for r in _removal_levels(group, steps[group.index], limit) if r > 0]
        # SCAN_LEVELS counts evenly spread up to the limit (0 itself costs nothing).
        spread = np.linspace(-1, len(allowed) - 1, SCAN_LEVELS + 1)[1:].round()
        picks = np.unique(np.clip(spread, 0, None).astype(int)) if allowed else []
        alive, done, errors = np.ones(group.size, dtype=bool), 0, {0: 0.0}
        for level in (allowed[i] for i in picks):
            alive, _ = greedy_obs(problems, group.size, level - done, alive)
            done = level
            for consumer, (hessian, cross_target, current, _, _) in zip(consumers, systems):
                keep_rows = np.ones(len(current), dtype=bool)
                keep_rows[:group.size * consumer.span] = np.repeat(alive, consumer.span)
                consumer.write(refit_rows(hessian, cross_target, current, keep_rows, damp))
            errors[level] = probe.error()
            for consumer in consumers:
                consumer.write(original[consumer.node.name])
        counts = np.array(sorted(errors))
        values = np.maximum.accumulate([errors[c] for c in counts])  # scan noise: monotone
        curves[group.index] = np.interp(np.arange(counts[-1] + 1), counts, values)
        measured[group.index] = {int(c): float(v) for c, v in zip(counts, values)}
    return _allocate(groups, curves, totals, steps), measured


def _allocate(groups: list[ChannelGroup], curves: dict[int, np.ndarray], totals: dict[str, int],
              steps: dict[int, int]) -> dict[int, int]:
    """Removed units per group: removals go where curve (cost by removed count) rises least per
    unit, one allowed level at a time, until each kind's total is reached."""
    removed = {index: 0 for index in curves}
    for kind, total in totals.items():
        members = [g for g in groups if g.index in curves and g.kind == kind]
        levels = {g.index: _removal_levels(g, steps[g.index], len(curves[g.index]) - 1)
                  for g in members}
        done = 0
        while True:
            best, best_cost = None, np.inf
            for group in members:
                options = [r for r in levels[group.index] if r > removed[group.index]]
                if not options:
                    continue
                nxt = options[0]
                curve = curves[group.index]
                marginal = (curve[nxt] - curve[removed[group.index]]) / (nxt - removed[group.index])
                # Stop before overshooting the total by more than half a step.
                if done + (nxt - removed[group.index]) - total > (nxt - removed[group.index]) / 2:
                    continue
                if marginal < best_cost:
                    best, best_cost = group.index, marginal
            if best is None:
                break
            options = [r for r in levels[best] if r > removed[best]]
            done += options[0] - removed[best]
            removed[best] = options[0]
    return removed


def _fit_systems(consumers: list[Consumer], rows, reference_rows, original, damp: float,
                 residual: bool) -> list[tuple]:
    """Per consumer: (H, X^T T, current weight, least-squares start, damped Hinv)."""
    systems = []
    for consumer in consumers:
        x, x_ref = rows[consumer.node.name], reference_rows[consumer.node.name]
        hessian, cross = _moments(x, x_ref, consumer.has_bias)
        cross_target, current = cross @ original[consumer.node.name], consumer.matrix()
        key = consumer.node.name + RESIDUAL
        if residual and rows is not reference_rows and key in rows:
            # Also absorb the drift of the residual stream this output is added to: the
            # target becomes what the original's Add produced minus the current residual.
            drift = reference_rows[key] - rows[key]
            cross_target = cross_target + (_augment(x, consumer.has_bias).T @ drift
                                           ).astype(np.float64) / max(len(x), 1)
        start, inverse = least_squares_start(hessian, cross_target, current, damp)
        systems.append((hessian, cross_target, current, start, inverse))
    return systems


def refit_candidates(model: Model, plans: dict[int, list[Consumer]]) -> list[list[Consumer]]:
    """The other linear layers (refit=all), grouped by the tensor they read (Q/K/V share one
    capture): every supported MatMul/Gemm/Conv that is not a consumer of a planned group."""
    taken = {id(c.node) for plan in plans.values() for c in plan}
    by_input: dict[str, list[Consumer]] = {}
    for node in model.graph.nodes:
        if id(node) in taken:
            continue
        consumer = linear_consumer(node)
        if consumer is not None:
            by_input.setdefault(node.input(0).name, []).append(consumer)
    return list(by_input.values())


def obs_prune(model: Model, groups: list[ChannelGroup], plans: dict[int, list[Consumer]],
              removals: dict[int, int], reference_rows: dict[str, np.ndarray], ctx: PassContext,
              samples: int, damp: float, sequential: bool, mask_name: str | None,
              residual: bool = False, extra: list[list[Consumer]] | None = None,
              metrics: dict | None = None) -> tuple[dict[int, np.ndarray], dict]:
    """Prune every planned group by its removal count (in graph order), writing the OBS-updated
    weights in place; returns the kept units per group and a per-group report. `extra` layers
    (sequential only) are refitted to their original outputs without pruning, in graph order
    among the groups, once something before them has changed; `metrics` weighs each consumer's
    output error (see `obs`)."""
    positions = {id(node): i for i, node in enumerate(model.graph.nodes)}
    by_index = {g.index: g for g in groups}
    steps = [(min(positions[id(c.node)] for c in plans[i]), i, plans[i]) for i in plans]
    if sequential:
        steps += [(min(positions[id(c.node)] for c in layer), None, layer)
                  for layer in (extra or [])]
    steps.sort(key=lambda step: step[0])
    original = {c.node.name: c.matrix() for _, _, layer in steps for c in layer}
    calibration = ctx.require_calibration(model)
    kept, report, changed = {}, {}, False
    for _, index, consumers in ctx.progress(steps, total=len(steps), desc="prune-channels: obs"):
        remove = removals.get(index, 0) if index is not None else 0
        if remove <= 0 and not (sequential and changed):
            continue
        rows = capture_rows(model, consumers, calibration, samples, mask_name, ctx.seed) \
            if sequential and changed else reference_rows
        systems = _fit_systems(consumers, rows, reference_rows, original, damp, residual)
        if index is None:  # a layer that loses nothing: just the least-squares correction
            for consumer, (_, _, _, start, _) in zip(consumers, systems):
                consumer.write(start)
            continue
        group = by_index[index]
        problems = [ConsumerProblem(start, inverse, c.span, (metrics or {}).get(c.node.name))
                    for c, (_, _, _, start, inverse) in zip(consumers, systems)]
        energy = sum(float(np.einsum("kn,kj,jn->", start, hessian, start))
                     for hessian, _, _, start, _ in systems)
        alive, costs = greedy_obs(problems, group.size, remove)
        for consumer, (hessian, cross_target, current, _, _) in zip(consumers, systems):
            keep_rows = np.ones(len(current), dtype=bool)
            keep_rows[:group.size * consumer.span] = np.repeat(alive, consumer.span)
            consumer.write(refit_rows(hessian, cross_target, current, keep_rows, damp))
        changed = True
        if remove > 0:
            kept[index] = np.flatnonzero(alive)
        report[index] = {"consumers": [c.node.name for c in consumers],
                         "kept": int(alive.sum()), "size": group.size,
                         "relative_cost": float(sum(costs) / (energy + 1e-30))}
    return kept, report
