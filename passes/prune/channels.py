"""prune-channels and show-groups: structured channel pruning over dependency groups."""

from __future__ import annotations

import numpy as np

from ir import Model, copy_model, graph_cost, infer_shapes

from ..calibration import capture, token_mask_input
from ..core import Option, Pass, PassContext, PassResult, register_pass
from ..output_probe import output_probe
from ..output_sensitivity import layer_output_metrics
from .apply import remove_channels
from .groups import ChannelGroup, analyze_groups
from .compensate import apply_mean_shifts, mean_shifts
from .layerwise import (allocate_removals, capture_rows, obs_consumers, obs_prune,
                        output_scan_removals, refit_candidates)
from .reconstruct import reconstruct_consumers
from .sensitivity import sensitivity_weights

__all__ = ["PruneChannels", "ShowGroups", "channel_importance", "kept_counts"]

CRITERIA = ("l1", "l2", "bn_scale", "mean_abs_act", "apoz", "obs")


def _weight_norms(group: ChannelGroup, order: int) -> np.ndarray:
    """Per-channel norm of every source weight slice, each normalized to mean 1, summed."""
    total = np.zeros(group.size)
    for action in group.sources:
        weight = np.moveaxis(action.value.const.astype(np.float64), action.axis, 0)
        flat = np.abs(weight.reshape(group.size, -1))
        norms = flat.sum(1) if order == 1 else np.sqrt((flat ** 2).sum(1))
        total += norms / (norms.mean() + 1e-12)
    return total


def _bn_scale(group: ChannelGroup) -> np.ndarray | None:
    scales = [np.abs(a.value.const.astype(np.float64)) for a in group.actions
              if a.node is not None and a.node.op_type == "BatchNormalization"
              and a.node.input(1) is a.value]
    if not scales:
        return None
    return sum(s / (s.mean() + 1e-12) for s in scales)


def _activation_stats(model: Model, groups: list[ChannelGroup], ctx: PassContext,
                      criterion: str, samples: int) -> dict[int, np.ndarray]:
    """Data-aware scores measured where the channels are consumed (the input of each sink
    layer: after BN/ReLU/GELU, which is what the next layer actually sees).

    mean_abs_act: mean |x_c| times the L2 norm of the sink weight slice that reads channel c,
    i.e. the expected size of the channel's contribution to the next layer's output (a
    structured form of Wanda's |W|*|x|). apoz: 1 - the fraction of zeros of x_c (Average
    Percentage of Zeros, for ReLU networks). Scores of several sinks are normalized and summed.
    """
    sinks = [(group, action) for group in groups for action in group.actions
             if action.role == "sink" and action.node is not None]
    if not sinks:
        return {}
    calibration = ctx.require_calibration(model)
    names = sorted({action.node.input(0).name for _, action in sinks})
    captured = capture(model, names, calibration, limit=samples)
    stats: dict[int, np.ndarray] = {}
    for group, action in sinks:
        node = action.node
        axis = 1 if node.op_type in ("Conv", "ConvTranspose", "Gemm") else -1
        # A unit may own a span of the axis (an attention head owns head-size columns, a
        # flattened channel owns H*W features): split the axis into [units, span].
        data = np.concatenate([np.moveaxis(a, axis, 0).reshape(group.size, -1)
                               for a in captured[node.input(0).name]], axis=1)
        if criterion == "apoz":
            score = 1.0 - (data == 0).mean(axis=1)  # more zeros -> less important
        else:
            weight = np.moveaxis(action.value.const.astype(np.float64), action.axis, 0)
            score = np.abs(data).mean(axis=1) * np.sqrt(
                (weight.reshape(group.size, -1) ** 2).sum(axis=1))
        score = score / (score.mean() + 1e-12)
        stats[group.index] = stats.get(group.index, 0) + score
    return stats


def channel_importance(model: Model, groups: list[ChannelGroup], criterion: str,
                       ctx: PassContext, samples: int = 64) -> dict[int, np.ndarray]:
    """Importance of each channel of each prunable group (higher = keep)."""
    if criterion == "obs":  # scores only for groups OBS cannot handle (see PruneChannels)
        criterion = "l1"
    if criterion in ("mean_abs_act", "apoz"):
        stats = _activation_stats(model, groups, ctx, criterion, samples)
        return {g.index: stats.get(g.index, _weight_norms(g, 1)) for g in groups}
    scores = {}
    for group in groups:
        score = _bn_scale(group) if criterion == "bn_scale" else None
        scores[group.index] = score if score is not None else _weight_norms(
            group, 2 if criterion == "l2" else 1)
    return scores


def _round_kept(size: int, kept: float, round_to: int) -> int:
    """Kept count rounded to a multiple of round_to, never zero, never above size."""
    if size <= round_to:
        return size
    rounded = int(round(kept / round_to)) * round_to
    return int(min(size, max(round_to, rounded)))


def _round_unit(group: ChannelGroup, round_to: int) -> int:
    """Rounding step in units: a head owns unit_span channels, so kept heads x head size stays a
    multiple of round_to with a much smaller step in heads (1 for 32-wide heads)."""
    return max(1, round_to // np.gcd(round_to, group.unit_span))


def kept_counts(groups: list[ChannelGroup], scores: dict[int, np.ndarray], ratio: float,
                schedule: str, round_to: int, head_ratio: float | None = None,
                weights: dict[int, float] | None = None) -> dict[int, int]:
    """How many channels each group keeps: the same fraction everywhere (uniform), one
    threshold over normalized importance across groups (global), or per-group fractions from a
    sensitivity scan (`weights` multiply the ratio per group). Attention-head groups use
    `head_ratio` when it is given."""
    counts = {}
    heads = [g for g in groups if g.kind == "heads"] if head_ratio is not None else []
    for group in heads:
        counts[group.index] = _round_kept(group.size, group.size * (1 - head_ratio),
                                          _round_unit(group, round_to))
    rest = [g for g in groups if g.index not in counts]
    if schedule == "global" and rest:
        normalized = {g.index: scores[g.index] / (scores[g.index].mean() + 1e-12) for g in rest}
        threshold = np.quantile(np.concatenate(list(normalized.values())), ratio)
        for group in rest:
            counts[group.index] = _round_kept(
                group.size, float((normalized[group.index] > threshold).sum()),
                _round_unit(group, round_to))
        return counts
    for group in rest:
        group_ratio = min(0.95, ratio * weights.get(group.index, 1.0)) if weights else ratio
        counts[group.index] = _round_kept(group.size, group.size * (1 - group_ratio),
                                          _round_unit(group, round_to))
    return counts


@register_pass
class PruneChannels(Pass):
    """Remove the least important channels of every prunable channel group (a group is the set
    of tensor dims that must shrink together: producer weights, BatchNorm/bias parameters,
    residual partners, consumer weights), making tensors, weights and MACs physically smaller.

    Attention heads are one group per layer, pruned a whole head at a time across Q/K/V, the head
    Reshapes and the output projection (`head_ratio`); FFN hidden units are ordinary groups.
    `schedule` spreads the ratio uniformly, globally (one importance ranking across groups) or
    by a sensitivity scan. Groups the dependency analysis cannot prove safe are left whole and
    reported. Kept counts are rounded to a multiple of `round_to` and never reach zero. `target_macs` searches the ratio
    that keeps at most that fraction of MACs. `reconstruct` refits each consumer layer by least
    squares on calibration activations so its output matches the original model's; `compensate`
    only moves the removed channels' mean contribution into the consumer's bias (cheap).

    `criterion=obs` (structured Optimal Brain Surgeon, as in ZipLM) removes, layer by layer in
    graph order, the units whose removal changes the consumer layers' outputs least on
    calibration tokens (padding left out, `token_mask`), and moves the remaining consumer weights
    and bias to absorb the change (damped least squares, `damp`). With `sequential` each layer's
    statistics come from the model pruned so far and its target is the original model's output,
    so later layers correct earlier errors; `target=residual` also absorbs the drift of the
    residual stream a consumer's output is added to, and `refit=all` refits every other linear
    layer (Q/K/V, FFN up) to its original output too. With `schedule=global` each group's share
    comes from its OBS cost curve (normalized by the energy of what the next normalization sees)
    while the totals per kind (heads, other channels) stay at `head_ratio` / `ratio` (so
    `target_macs` is then met in channels, not exactly in MACs); `schedule=output` allocates the
    same totals from the change of the model's outputs when each group alone is OBS-pruned at a
    few amounts (on `scan_samples` calibration samples). Groups whose consumers are not
    MatMul/Gemm/Conv fall back to l1.
    """
    name = "prune-channels"
    requires_static_shapes = True
    options = {
        "ratio": Option(float, 0.3, "fraction of channels removed per group (uniform) or overall"),
        "target_macs": Option(float, 0.0, "fraction of MACs to keep (overrides ratio when > 0)"),
        "criterion": Option(str, "l1", "channel importance", choices=CRITERIA),
        "schedule": Option(str, "uniform", "how ratios spread over groups",
                           choices=("uniform", "global", "sensitivity", "output")),
        "head_ratio": Option(float, -1.0, "fraction of attention heads removed (default: ratio)"),
        "round_to": Option(int, 8, "kept channel counts are multiples of this"),
        "reconstruct": Option(bool, False, "least-squares refit of consumer layers"),
        "compensate": Option(bool, False, "fold the calibration mean of removed channels into "
                             "the consumer's bias"),
        "samples": Option(int, 64, "calibration samples for data-aware steps"),
        "scan_samples": Option(int, 64, "schedule=output: calibration samples whose outputs "
                               "are compared"),
        "scan_outputs": Option(list, [], "schedule=output: graph outputs to compare (empty: "
                               "every float output)"),
        "sequential": Option(bool, True, "criterion=obs: statistics from the model pruned so "
                             "far, fitted to the original outputs"),
        "target": Option(str, "output", "criterion=obs, sequential: fit the consumers' own "
                         "output (output) or also absorb the drift of the residual stream it "
                         "is added to (residual)", choices=("output", "residual")),
        "refit": Option(str, "consumers", "criterion=obs, sequential: refit only the consumers "
                        "of pruned groups, or also every other linear layer after the first "
                        "pruned one (all; more calibration runs)", choices=("consumers", "all")),
        "damp": Option(float, 0.01, "criterion=obs: ridge strength relative to the mean "
                       "diagonal of the input Hessian"),
        "output_metric": Option(bool, False, "criterion=obs: weigh each consumer's output error "
                                "by how its directions reach the model's outputs (gradients on "
                                "scan_samples calibration samples)"),
        "token_mask": Option(str, "auto", "criterion=obs: graph input whose 0s mark padding "
                             "tokens to leave out (auto: attention_mask if present; none)"),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not 0 <= self.ratio < 1 or not 0 <= self.target_macs <= 1 or self.round_to < 1:
            from ..core import OptionError
            raise OptionError("prune-channels: need 0 <= ratio < 1, 0 <= target_macs <= 1, "
                              "round_to >= 1")
        if self.criterion == "obs" and (self.reconstruct or self.compensate or self.damp < 0):
            from ..core import OptionError
            raise OptionError("prune-channels: criterion=obs already refits the consumers; "
                              "drop reconstruct/compensate (and keep damp >= 0)")
        if (self.schedule == "output" or self.output_metric) and (
                self.criterion != "obs" or self.scan_samples < 1):
            from ..core import OptionError
            raise OptionError("prune-channels: schedule=output and output_metric need "
                              "criterion=obs and scan_samples >= 1")
        groups = analyze_groups(model.graph)
        prunable = [g for g in groups if g.prunable]
        frozen = [g for g in groups if not g.prunable and g.sources]
        scores = channel_importance(model, prunable, self.criterion, ctx, self.samples)
        reference = copy_model(model) if self.reconstruct else None
        macs_before = graph_cost(model.graph).macs
        self._weights = None
        if self.schedule == "sensitivity" and prunable:
            probe = self.ratio if self.ratio > 0 else 0.5
            self._weights = sensitivity_weights(model, prunable, scores, probe, ctx)
        ratio = self._ratio_for_target(model, prunable, scores, macs_before)
        counts = kept_counts(prunable, scores, ratio, self.schedule, self.round_to,
                             self._head_ratio(), self._weights)
        obs_report = None
        if self.criterion == "obs":
            counts, obs_kept, obs_report = self._obs(model, prunable, counts, ratio, ctx)
        kept = {g.index: np.sort(np.argsort(-scores[g.index], kind="stable")[:counts[g.index]])
                for g in prunable if counts[g.index] < g.size}
        if obs_report is not None:
            kept = {i: k for i, k in kept.items() if i not in obs_report["planned"]}
            kept.update(obs_kept)
        shifts = mean_shifts(model, groups, kept, ctx, self.samples) if self.compensate else {}
        removed = remove_channels(model.graph, groups, kept)
        compensated = apply_mean_shifts(model.graph, shifts)
        infer_shapes(model)
        details = {"compensated": compensated, "ratio": ratio, "channels_removed": removed,
                   "groups_pruned": len(kept), "groups_prunable": len(prunable),
                   "frozen_groups": [{"channels": g.size, "reasons": sorted(set(g.frozen))[:3],
                                      "members": g.describe()["members"][:4]} for g in frozen]}
        notes = [f"pruned {len(kept)} of {len(prunable)} prunable groups "
                 f"({removed} channels); {len(frozen)} groups frozen"]
        if obs_report is not None:
            details["obs"] = obs_report["groups"]
        details["kept_per_group"] = [{"group": g.index, "kind": g.kind, "size": g.size,
                                      "kept": int(len(kept[g.index])) if g.index in kept
                                      else g.size} for g in prunable]
        if reference is not None and removed:
            details["reconstructed"] = reconstruct_consumers(model, reference, groups, kept, ctx,
                                                             self.samples)
        return PassResult(changed=bool(removed), notes=notes, details=details)

    def _obs(self, model: Model, prunable, counts, ratio, ctx):
        """criterion=obs: per-group removal counts (uniform/sensitivity counts, or the OBS
        allocation for schedule=global), then layer-wise OBS pruning with weight updates."""
        plans = obs_consumers(prunable)
        mask_name = self._token_mask(model)
        extra = refit_candidates(model, plans) if self.refit == "all" and self.sequential else []
        consumers = [c for plan in [*plans.values(), *extra] for c in plan]
        reference_rows = capture_rows(model, consumers, ctx.require_calibration(model),
                                      self.samples, mask_name, ctx.seed) if consumers else {}
        planned = [g for g in prunable if g.index in plans]
        removals = {g.index: g.size - counts[g.index] for g in planned}
        metrics = self._output_metrics(model, ctx, plans, mask_name) if self.output_metric \
            else None
        measured = None
        if self.schedule in ("global", "output") and planned:
            head_ratio = self._head_ratio()
            totals: dict[str, int] = {}
            for group in planned:
                share = head_ratio if group.kind == "heads" and head_ratio is not None else ratio
                totals[group.kind] = totals.get(group.kind, 0) + group.size * share
            totals = {kind: int(round(total)) for kind, total in totals.items()}
            steps = {g.index: _round_unit(g, self.round_to) for g in planned}
            if self.schedule == "output":
                probed = [v for plan in plans.values() for c in plan
                          for v in (c.weight, c.bias) if v is not None]
                probe = output_probe(model, probed, ctx.require_calibration(model),
                                     self.scan_samples, mask_name, list(self.scan_outputs),
                                     "prune-channels")
                removals, measured = output_scan_removals(planned, plans, reference_rows, totals,
                                                          steps, self.damp, probe, ctx.progress,
                                                          metrics)
            else:
                removals, _ = allocate_removals(planned, plans, reference_rows, totals, steps,
                                                self.damp, ctx.progress, metrics)
            counts = {**counts, **{i: next(g.size for g in planned if g.index == i) - r
                                   for i, r in removals.items()}}
        kept, report = obs_prune(model, planned, plans, removals, reference_rows, ctx,
                                 self.samples, self.damp, self.sequential, mask_name,
                                 self.target == "residual", extra, metrics)
        if measured is not None:
            for index, errors in measured.items():
                if index in report:
                    report[index]["output_scan"] = errors
        return counts, kept, {"planned": set(plans), "groups": list(report.values())}

    def _output_metrics(self, model, ctx, plans, mask_name) -> dict[str, np.ndarray]:
        """Per consumer node, E[J^T J] over its output channels (`normalized_metric`)."""
        nodes = [c.node for plan in plans.values() for c in plan]
        return layer_output_metrics(model, nodes, ctx.require_calibration(model),
                                    self.scan_samples, mask_name, list(self.scan_outputs),
                                    ctx.seed, True, "prune-channels: output_metric=true")

    def _token_mask(self, model: Model) -> str | None:
        return token_mask_input(model, self.token_mask, "prune-channels")

    def _head_ratio(self) -> float | None:
        return self.head_ratio if self.head_ratio >= 0 else None

    def _ratio_for_target(self, model, prunable, scores, macs_before) -> float:
        """Bisection on the ratio until the pruned model keeps <= target_macs of the MACs."""
        if not self.target_macs or not prunable:
            return self.ratio
        low, high = 0.0, 0.95
        for _ in range(12):
            middle = (low + high) / 2
            trial = copy_model(model)
            infer_shapes(trial)
            trial_groups = analyze_groups(trial.graph)
            trial_prunable = {g.index: g for g in trial_groups if g.prunable}
            counts = kept_counts(list(trial_prunable.values()), scores, middle, self.schedule,
                                 self.round_to, self._head_ratio(), self._weights)
            kept = {i: np.arange(counts[i]) for i, g in trial_prunable.items()
                    if counts[i] < g.size}
            remove_channels(trial.graph, trial_groups, kept)
            infer_shapes(trial)
            if graph_cost(trial.graph).macs <= self.target_macs * macs_before:
                high = middle
            else:
                low = middle
        return high


@register_pass
class ShowGroups(Pass):
    """Print the channel groups found by the dependency analysis: members, channel count,
    whether each is prunable or frozen and why. Changes nothing."""
    name = "show-groups"
    requires_static_shapes = True
    options = {"all": Option(bool, False, "also list groups without weights (pure activations)")}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        groups = [g for g in analyze_groups(model.graph) if self.all or g.sources]
        lines = []
        for group in groups:
            info = group.describe()
            state = "prunable" if info["prunable"] else "frozen: " + "; ".join(info["frozen"][:2])
            if info["derived"]:
                state = "follows its Concat inputs"
            if info.get("entries_reorderable"):
                state += f"; {info['head_size']} entries per head, reorderable (sparsify reorder)"
            lines.append(f"group {info['group']}: {info['channels']} channels, {state}; "
                         f"{', '.join(info['members'][:6])}")
        print("\n".join(lines))
        return PassResult(changed=False, details={"groups": [g.describe() for g in groups]})
