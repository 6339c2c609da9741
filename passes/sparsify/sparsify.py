"""sparsify: zero weights of MatMul/Gemm/Conv layers in a pattern a backend can exploit."""

from __future__ import annotations

import numpy as np

from ir import Model, Value, copy_model

from ..block_reconstruction import TunedLayer, reconstruct_blocks
from ..calibration import token_mask_input
from ..core import OptionError, Option, Pass, PassContext, PassResult, register_pass
from ..output_probe import output_probe
from ..output_sensitivity import METRIC_DAMP, layer_output_metrics
from ..staged_capture import StagedCapture
from .admm import admm_mask
from .bias import add_output_shift
from .correction import error_correcting_start, mean_output_shift, paired_output_error
from .layers import SparsifyTarget, boundary_targets, find_targets
from .metadata import measured_density, write_sparsity_property
from .patterns import SparsityPattern, parse_pattern, select_mask
from .permute import reorder_for_nm
from .refit import masked_least_squares, metric_least_squares
from .schedule import (GRID, global_schedule, outlier_schedule, relative_output_error,
                       output_grid, sensitivity_schedule, uniform_schedule)
from .sparsegpt import sparsegpt_prune
from .statistics import InputStatistics, collect_statistics

__all__ = ["Sparsify"]


@register_pass
class Sparsify(Pass):
    """Zero a fraction of the weights of MatMul/Gemm/Conv layers (unstructured, RxC blocks or N:M),
    chosen by magnitude, Wanda (|W| x input norm) or SparseGPT (pruning with second-order
    reconstruction from calibration data, optionally followed by an ADMM mask search); the
    sparsity per layer is uniform, set by one global threshold, or allocated from a scan of each
    layer's own error or of the model's output error. Weights stay dense with zeros; each
    records its pattern and density in the IR and in the model property `compress.sparsity`.

    Patterns are stated on the weight viewed as W[out, in] (MatMul's [K, N] and Gemm's transB=0
    weight are transposed, Conv's OIHW is reshaped to [O, I*kh*kw]): `block=4x1` zeros tiles of 4
    output rows x 1 input column, `nm=2:4` keeps 2 of every 4 consecutive inputs of a row (write
    `nm=2of4` or `nm=2/4` inside a pipeline spec, where `:` separates options). The first and last
    layers (no sparsifiable layer before / after them) are left dense unless
    `include_first_last=true`; `exclude` takes node names, weight names, op types or globs.

    Corrections for the error that reaches later layers: `sequential` takes each layer's inputs
    from the model already sparsified up to it; `error_correction` (SparseGPT) also fits the
    original model's outputs from those inputs (GPTAQ's asymmetric calibration);
    `bias_correction` adds each layer's mean output change back to its bias;
    `residual_correction` makes both aim at the sum a residual Add forms with the layer's output
    (transformer attention-out / FFN-down, ResNet block ends), so that a layer also cancels the
    part of the residual stream's error its input predicts (`passes/sparsify/residual.py`);
    `refit` solves the masked least-squares problem of every row once SparseGPT chose the mask;
    `admm` searches a better mask from there (ADMM on the layer's output error, as in ALPS) and
    then refits; `schedule=owl` gives layers with more outlier Wanda scores less sparsity at the
    same total.

    `reorder` (N:M) first puts the channels layers read in an order where each group of M
    inputs mixes strong and weak weights, so the mask keeps more: whole channel groups (FFN
    units, 1x1 conv inputs) and, inside attention heads, the entries; with calibration data a
    head gets a new orthogonal basis (its output's principal directions, interleaved) when only
    linear ops see its entries. The model computes the same function before the mask
    (`passes/sparsify/permute.py`).

    `output_metric` weighs each layer's output error by what reaches the model's outputs,
    E[J^T J] from gradients of the outputs on `scan_samples` calibration samples
    (`passes/output_sensitivity.py`): `diagonal` weighs the output channels (every method);
    `full` also lets SparseGPT's refit and ADMM put the error into output directions the model
    does not read (with `refit` or `admm`).

    `reconstruct` finally tunes the model block by block (a transformer's attention or FFN up
    to its LayerNorm): the weights and biases of its sparse layers, and of dense ones in the
    same block, with the zeros fixed, so that the block's output matches the original model's
    from what the blocks before it now give. Unlike the one-shot corrections above this is
    iterative (Adam on `reconstruct_samples` calibration samples, each block keeping its best
    epoch on held-out ones; `passes/block_reconstruction.py`), a distillation of each block
    against the original without labels.

    `schedule=sensitivity` scans each layer's own output error; `schedule=output` scans what
    reaches the model's outputs: each layer alone is sparsified (by `method`) at a grid of
    sparsities and the relative change of the graph outputs on `scan_samples` calibration
    samples is measured, then sparsity goes where it costs the least output error per weight.
    """
    name = "sparsify"
    options = {
        "sparsity": Option(float, 0.5, "fraction of weights to zero (N:M fixes it at 1 - N/M)"),
        "pattern": Option(str, "unstructured", "unstructured | block | nm"),
        "block": Option(str, "4x1", "block pattern tile: R output rows x C input columns"),
        "nm": Option(str, "2:4", "N:M pattern: keep N of every M consecutive inputs (2:4, 2of4)"),
        "method": Option(str, "magnitude", "which weights to zero",
                         choices=("magnitude", "wanda", "sparsegpt")),
        "schedule": Option(str, "uniform", "sparsity per layer",
                           choices=("uniform", "global", "sensitivity", "output", "owl")),
        "owl_spread": Option(float, 0.08, "schedule=owl: layer sparsities span target +- this"),
        "exclude": Option(list, [], "node names, weight names, op types or globs to leave dense"),
        "include_first_last": Option(bool, False, "also sparsify the first and last layers"),
        "ops": Option(list, ["MatMul", "Gemm", "Conv"], "op types to sparsify"),
        "kernels": Option(list, [], "Conv kernel shapes to sparsify, e.g. 1x1 (empty: all)"),
        "min_size": Option(int, 128, "leave weights with fewer elements dense"),
        "per_row": Option(bool, False, "unstructured: prune the same fraction of every output row"),
        "samples": Option(int, 64, "calibration samples for wanda / sparsegpt / sensitivity"),
        "scan_samples": Option(int, 64, "schedule=output: calibration samples whose outputs "
                               "are compared"),
        "scan_outputs": Option(list, [], "schedule=output: graph outputs to compare (empty: "
                               "every float output)"),
        "scan_grid": Option(list, [], "schedule=output: the sparsities each layer is measured "
                            "at, e.g. 0.3+0.5+0.7 (empty: target -0.2, +0, +0.1, +0.2, +0.3)"),
        "damp": Option(float, 0.01, "sparsegpt: Hessian dampening, fraction of its mean diagonal"),
        "sequential": Option(bool, False, "wanda/sparsegpt: gather each layer's inputs from the "
                             "model with the layers before it already sparsified"),
        "error_correction": Option(bool, False, "sparsegpt: fit each layer's output to the "
                                   "original model's from the inputs the sparsified layers "
                                   "before it give (GPTAQ); implies sequential"),
        "residual_correction": Option(bool, False, "with error_correction (or sequential "
                                      "bias_correction): a layer whose output is added to a "
                                      "residual stream also fits the error that stream "
                                      "already carries"),
        "bias_correction": Option(bool, False, "add each sparsified layer's mean output change "
                                  "(original minus sparsified, on the calibration tokens) to its "
                                  "bias"),
        "refit": Option(bool, False, "sparsegpt: once the mask is chosen, solve each row's "
                        "masked least-squares problem exactly (slower, lower layer error)"),
        "admm": Option(bool, False, "sparsegpt: search the mask further by ADMM on the layer's "
                       "output error, then refit (slower, lower layer error)"),
        "block_columns": Option(int, 128, "sparsegpt: columns per lazy batch; the unstructured "
                                "mask is chosen per batch"),
        "output_metric": Option(str, "none", "weigh each layer's output error by how it reaches "
                                "the model's outputs (gradients on scan_samples calibration "
                                "samples): diagonal = per output channel; full = per output "
                                "direction (sparsegpt with refit or admm)",
                                choices=("none", "diagonal", "full")),
        "metric_damp": Option(float, METRIC_DAMP, "output_metric=full: x I added to the "
                              "metric (scaled to a mean diagonal of 1), so that output "
                              "directions the scan samples did not reach still cost something"),
        "reorder": Option(bool, False, "N:M: first reorder the channels layers read (whole "
                          "channel groups; inside attention heads the entries, or with data a "
                          "new orthogonal basis), leaving the model's function unchanged, so "
                          "that each group of M inputs mixes strong and weak weights and the "
                          "mask keeps more"),
        "reconstruct": Option(bool, False, "after the masks, tune the MatMul/Gemm weights and "
                              "biases of each block with sparse layers (zeros kept) so that "
                              "the block's output matches the original model's on "
                              "calibration data (gradient steps, block by block: "
                              "passes/block_reconstruction.py)"),
        "reconstruct_samples": Option(int, 1024, "reconstruct: calibration samples, spread "
                                      "over `samples` (the last 64 judge each block's epochs)"),
        "reconstruct_epochs": Option(int, 3, "reconstruct: passes over those samples"),
        "reconstruct_step": Option(float, 0.002, "reconstruct: Adam's step, a fraction of "
                                   "each layer's RMS weight"),
        "token_mask": Option(str, "auto", "graph input whose 0s mark padding tokens to leave out "
                             "of the statistics (auto: an input named attention_mask; none)"),
    }
    requires_static_shapes = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not 0.0 <= self.sparsity < 1.0:
            raise OptionError(f"sparsify: sparsity={self.sparsity} must be in [0, 1)")
        for option in ("error_correction", "refit", "admm"):
            if getattr(self, option) and self.method != "sparsegpt":
                raise OptionError(f"sparsify: {option}=true needs method=sparsegpt")
        if self.residual_correction and not (
                self.error_correction or (self.bias_correction and self.sequential)):
            # Only then are the statistics paired with the original model, which the stream's
            # error is measured against.
            raise OptionError("sparsify: residual_correction=true needs error_correction=true, "
                              "or bias_correction=true with sequential=true")
        if self.reorder and self.method == "magnitude":
            # A magnitude mask does not see the activations that decide which grouping lowers
            # the output error: measured, reordering for it raised the error as often as not.
            raise OptionError("sparsify: reorder=true needs method=wanda or method=sparsegpt")
        if self.metric_damp < 0:
            raise OptionError(f"sparsify: metric_damp={self.metric_damp} must be >= 0")
        if min(self.block_columns, self.scan_samples, self.reconstruct_samples,
               self.reconstruct_epochs) < 1:
            raise OptionError("sparsify: block_columns, scan_samples, reconstruct_samples and "
                              "reconstruct_epochs must be >= 1")
        if not 0.0 < self.reconstruct_step < 1.0:
            raise OptionError(f"sparsify: reconstruct_step={self.reconstruct_step} must be in "
                              "(0, 1)")
        pattern = parse_pattern(self.pattern, self.block, self.nm)
        kernels = {_parse_kernel(k) for k in self.kernels}
        targets, skipped = self._select(model, kernels)
        notes: list[str] = []
        if not targets:
            return PassResult(False, ["sparsify: no layer to sparsify"], {"skipped": skipped})
        self._metrics = {}
        reordered = []
        if self.reorder and pattern.kind != "n:m":
            notes.append(f"sparsify: reorder=true only changes N:M masks; ignored for {pattern}")
        elif self.reorder:
            reordered = self._reorder(model, ctx, pattern, targets, notes)
            # The same layers with their new weights (renamed, so not selected by name again).
            chosen = {id(t.node) for t in targets}
            targets = [t for t in find_targets(model.graph, list(self.ops))
                       if id(t.node) in chosen]

        data_aware = self.method != "magnitude"
        needs_data = data_aware or self.bias_correction
        sequential = needs_data and (self.sequential or self.error_correction)
        # Paired statistics (inputs of this model and of the original on the same tokens) when a
        # correction aims at the original outputs while the inputs already changed.
        reference = copy_model(model) \
            if sequential and (self.error_correction or self.bias_correction) else None
        original = reference if reference is not None or not self.reconstruct \
            else copy_model(model)
        if self.output_metric != "none":
            self._metrics = self._output_metrics(model, ctx, targets)
        stats = self._statistics(model, ctx, targets, full=self.schedule == "sensitivity") \
            if (self.schedule != "uniform" or not sequential) else [None] * len(targets)
        scores = [self._scores(t, s) for t, s in zip(targets, stats)]
        sparsities, scan = self._schedule(model, ctx, pattern, targets, scores, stats, notes)

        layers = []
        # Sequential: each stage (the layers reading one tensor, e.g. Q/K/V) sees the outputs of
        # the layers sparsified before it, so later layers compensate earlier errors.
        stages = _stages(targets) if sequential else [list(range(len(targets)))]
        # A sweep carries each stage's activations over to the next (see `staged_capture`).
        captures = self._captures(model, ctx, reference) if sequential else None
        for stage in ctx.progress(stages, total=len(stages), desc="sparsify"):
            todo = [i for i in stage if pattern.kind == "n:m" or sparsities[i] > 0.0]
            if not todo:
                continue
            if needs_data and (sequential or stats[todo[0]] is None
                               or (self.method == "sparsegpt" and not stats[todo[0]].full)):
                fresh = self._statistics(model, ctx, [targets[i] for i in todo],
                                         full=self.method == "sparsegpt", reference=reference,
                                         captures=captures)
                for i, stat in zip(todo, fresh):
                    stats[i] = stat
                    scores[i] = self._scores(targets[i], stat)
            for i in todo:
                layers.append(self._apply(model, targets[i], pattern, scores[i], stats[i],
                                          sparsities[i]))
            if captures is not None:
                captures[0].invalidate(targets[i].node for i in todo)
        captures = None  # frees the kept activations (GiBs with large calibration sets)
        reconstructed = self._reconstruct(model, ctx, original, notes) \
            if self.reconstruct and layers else None
        model.graph.remove_unused_constants()
        write_sparsity_property(model)

        zeros = sum(layer["size"] * (1 - layer["density"]) for layer in layers)
        total = sum(t.weight.const.size for t in targets)
        covered = sum(layer["size"] for layer in layers)
        notes.insert(0, f"sparsify: {len(layers)} layers, {pattern}, method {self.method}, "
                        f"schedule {self.schedule}: {zeros / max(covered, 1):.1%} zeros in "
                        f"sparsified weights ({zeros / max(total, 1):.1%} of selected layers)")
        details = {"pattern": pattern.describe(), "method": self.method,
                   "schedule": self.schedule, "output_metric": self.output_metric,
                   "layers": layers, "skipped": skipped}
        if reordered:
            details["reordered"] = reordered
        if reconstructed is not None:
            details["reconstruction"] = reconstructed
        if scan is not None:
            details["sensitivity"] = scan["layers"]
            details["sensitivity_grid"] = scan["grid"]
        return PassResult(changed=bool(layers), notes=notes, details=details)

    # -- which layers ----------------------------------------------------------------------------
    def _select(self, model: Model, kernels: set) -> tuple[list[SparsifyTarget], dict]:
        candidates = find_targets(model.graph, list(self.ops))
        first, last = boundary_targets(model.graph, candidates)
        chosen, skipped = [], {}
        for index, target in enumerate(candidates):
            reason = None
            if target.name_matches(list(self.exclude)):
                reason = "excluded"
            elif not self.include_first_last and index in first:
                reason = "first layer"
            elif not self.include_first_last and index in last:
                reason = "last layer"
            elif kernels and target.op_type == "Conv" and target.kernel not in kernels:
                reason = "kernel not selected"
            elif target.weight.const.size < self.min_size:
                reason = f"fewer than min_size={self.min_size} weights"
            elif len(target.weight.uses()) > 1 or target.weight.is_graph_output():
                reason = "weight shared with other readers"
            if reason:
                skipped.setdefault(reason, []).append(target.node.name)
            else:
                chosen.append(target)
        return chosen, skipped

    def _reorder(self, model, ctx, pattern, targets, notes) -> list[dict]:
        """`reorder`: new channel orders (and head bases) before the masks, see `permute`."""
        records = reorder_for_nm(
            model.graph, targets, pattern,
            statistics=lambda chosen, full: self._statistics(model, ctx, chosen, full=full,
                                                            diagonal=not full),
            scores=self._scores, progress=ctx.progress)
        if records:
            before = sum(r["kept_before"] for r in records) / len(records)
            after = sum(r["kept_after"] for r in records) / len(records)
            notes.append(f"sparsify: reordered {len(records)} channel groups for {pattern}; "
                         f"the mask keeps {before:.1%} -> {after:.1%} of their saliency (mean)")
        else:
            notes.append("sparsify: reorder found no channel group whose order matters")
        return records

    # -- data ------------------------------------------------------------------------------------
    def _captures(self, model, ctx, reference) -> tuple[StagedCapture, StagedCapture | None]:
        """Staged captures of the model and of the reference on the same calibration feeds."""
        feeds = ctx.require_calibration(model, samples=self.samples).feeds(model, self.samples)
        return (StagedCapture(model, feeds),
                StagedCapture(reference, feeds) if reference is not None else None)

    def _statistics(self, model, ctx, targets, full: bool, reference=None,
                    diagonal: bool = False, captures=None) -> list[InputStatistics | None]:
        """Input statistics of the targets (`diagonal`: only the input norms, even for
        sparsegpt; none for magnitude without bias correction)."""
        full = not diagonal and (full or self.method == "sparsegpt")
        if self.method == "magnitude" and not full and not self.bias_correction:
            return [None] * len(targets)
        calibration = ctx.require_calibration(model, samples=self.samples)
        return collect_statistics(model, targets, calibration, self.samples, full=full,
                                  seed=ctx.seed, progress=ctx.progress,
                                  row_mask_input=self._token_mask(model),
                                  reference=reference, residual=self.residual_correction,
                                  captures=captures)

    def _token_mask(self, model: Model) -> str | None:
        return token_mask_input(model, self.token_mask, "sparsify")

    def _output_metrics(self, model, ctx, targets) -> dict[str, np.ndarray]:
        """Per target node, the metric of its output error at the model's outputs: E[J^T J]
        over the output channels ([out, out], or its diagonal), see `normalized_metric`."""
        return layer_output_metrics(model, [t.node for t in targets],
                                    ctx.require_calibration(model, samples=self.samples),
                                    self.scan_samples, self._token_mask(model),
                                    list(self.scan_outputs), ctx.seed,
                                    self.output_metric == "full",
                                    f"sparsify: output_metric={self.output_metric}",
                                    damp=self.metric_damp)

    def _row_scale(self, target: SparsifyTarget, rows: int) -> np.ndarray:
        """sqrt of each of the `rows` output rows' weight in the output metric (1 without one)."""
        metric = self._metrics.get(target.node.name)
        if metric is None:
            return np.ones(rows)
        diagonal = np.diag(metric) if metric.ndim == 2 else metric
        return np.sqrt(np.maximum(diagonal, 1e-3))

    def _scores(self, target: SparsifyTarget, stat: InputStatistics | None) -> np.ndarray:
        """Importance of each weight of the [out, in] view (SparseGPT's schedule uses Wanda's)."""
        magnitude = np.abs(target.matrix())
        magnitude *= self._row_scale(target, len(magnitude))[:, None]
        if self.method == "magnitude" or stat is None:
            return magnitude
        for group, rows in enumerate(target.row_groups()):
            magnitude[rows] *= stat.column_norms(group)[None, :]
        return magnitude

    def _schedule(self, model, ctx, pattern, targets, scores, stats, notes):
        if pattern.kind == "n:m":
            if self.schedule != "uniform" or self.sparsity != self.options["sparsity"].default:
                notes.append(f"sparsify: {pattern} fixes every layer's density at "
                             f"{pattern.fixed_density:.3g}; sparsity and schedule are ignored")
            return [1.0 - pattern.fixed_density] * len(targets), None
        sizes = [t.weight.const.size for t in targets]
        if self.schedule == "uniform":
            return uniform_schedule(sizes, self.sparsity), None
        if self.schedule == "global":
            return global_schedule(scores, self.sparsity), None
        if self.schedule == "owl":
            return outlier_schedule(scores, sizes, self.sparsity, self.owl_spread), None

        if self.schedule == "output":
            calibration = ctx.require_calibration(model, samples=self.samples)
            probe = output_probe(model, [t.weight for t in targets], calibration,
                                 self.scan_samples, self._token_mask(model),
                                 list(self.scan_outputs), "sparsify")

            def error_at(layer: int, sparsity: float) -> float:
                target = targets[layer]
                pruned = self._prune(target, pattern, scores[layer], stats[layer], sparsity,
                                     corrections=False)
                return probe.error({target.weight.name: target.from_matrix(pruned)})
            grid = self._scan_grid()
        else:
            def error_at(layer: int, sparsity: float) -> float:
                target, stat = targets[layer], stats[layer]
                weights = target.matrix()
                pruned = weights * self._mask(target, pattern, scores[layer], sparsity)
                return _layer_error(target, stat, weights, pruned)
            grid = GRID

        progress = ctx.progress(range(len(targets)), total=len(targets),
                                desc=f"sparsify: {self.schedule} scan")
        sparsities, table = sensitivity_schedule(sizes, self.sparsity, error_at, grid, progress)
        scan = {t.node.name: {"errors": [float(f"{e:.4g}") for e in row], "sparsity": s}
                for t, row, s in zip(targets, table, sparsities)}
        return sparsities, {"grid": list(grid), "layers": scan}

    def _scan_grid(self) -> tuple[float, ...]:
        if not self.scan_grid:
            return output_grid(self.sparsity)
        try:
            points = sorted({0.0, *(float(p) for p in self.scan_grid)})
        except ValueError:
            points = [-1.0]
        if not all(0.0 <= p < 1.0 for p in points):
            raise OptionError(f"sparsify: scan_grid={'+'.join(self.scan_grid)} must list "
                              "sparsities in [0, 1), e.g. 0.3+0.5+0.7")
        return tuple(points)

    def _reconstruct(self, model, ctx, original, notes) -> list[dict]:
        """`reconstruct`: tune the sparse MatMul/Gemm layers (zeros fixed), and the dense ones
        that share a block with them, block by block against the original model
        (`block_reconstruction`)."""
        layers = []
        for target in find_targets(model.graph, ["MatMul", "Gemm"]):
            weight = target.weight
            if len(weight.uses()) > 1 or weight.is_graph_output() \
                    or weight.const.dtype.kind != "f":
                continue
            keep = weight.const != 0 if "sparsity" in weight.meta else None
            layers.append(TunedLayer(target.node, weight, _bias_of(target), keep))
        if not any(layer.keep is not None for layer in layers):
            notes.append("sparsify: reconstruct=true found no sparse MatMul/Gemm layer to tune "
                         "(Conv weights have no gradient rule); skipped")
            return []
        calibration = ctx.require_calibration(model, samples=self.samples)
        feeds = calibration.feeds(model, self.samples)
        if len(feeds) > self.reconstruct_samples:  # spread over the whole calibration set
            chosen = np.linspace(0, len(feeds) - 1, self.reconstruct_samples).round()
            feeds = [feeds[int(i)] for i in chosen]
        records = reconstruct_blocks(model, original, feeds, layers,
                                     epochs=self.reconstruct_epochs, step=self.reconstruct_step,
                                     row_mask_input=self._token_mask(model), seed=ctx.seed,
                                     progress=ctx.progress)
        tuned = [r for r in records if "held_out_error" in r]
        start = sum(r["held_out_error"][0] for r in tuned)
        end = sum(r["held_out_error"][1] for r in tuned)
        notes.append(f"sparsify: reconstructed {len(tuned)} blocks on {len(feeds)} samples: "
                     f"held-out block error {start:.4g} -> {end:.4g} (sum over blocks)")
        notes.extend(f"sparsify: block ending at {r['output']} not reconstructed: {r['skipped']}"
                     for r in records if "skipped" in r)
        return records

    # -- rewrite ---------------------------------------------------------------------------------
    def _mask(self, target, pattern: SparsityPattern, score: np.ndarray, sparsity: float):
        keep = np.ones(score.shape, dtype=bool)
        for rows in target.row_groups():
            keep[rows] = select_mask(score[rows], pattern, sparsity, per_row=self.per_row)
        return keep

    def _prune(self, target: SparsifyTarget, pattern, score, stat, sparsity,
               corrections: bool = True) -> np.ndarray:
        """The [out, in] weight view with `sparsity` of it zeroed by the method (SparseGPT also
        updates the rest; `corrections` adds error_correction / refit / admm when they are on)."""
        weights = target.matrix()
        if self.method != "sparsegpt":
            return weights * self._mask(target, pattern, score, sparsity)
        pruned = weights.copy()
        # An output metric's diagonal scales the rows (SparseGPT and the row-wise refit then see
        # the output-weighted error); a full metric also enters ADMM and the final refit.
        scale = self._row_scale(target, len(weights))[:, None]
        metric = self._metrics.get(target.node.name)
        full = metric is not None and metric.ndim == 2
        for group, rows in enumerate(target.row_groups()):
            start, hessian = weights[rows], stat.hessian(group)
            if corrections and self.error_correction:
                start = error_correcting_start(
                    start, hessian, stat.cross(group), self.damp,
                    residual_cross=stat.residual_cross(target.node.name, group))
            pruned[rows] = sparsegpt_prune(start * scale[rows], hessian, pattern, sparsity,
                                           damp=self.damp, block_columns=self.block_columns)
            if not (corrections and (self.refit or self.admm)):
                pruned[rows] /= scale[rows]
                continue
            keep = pruned[rows] != 0
            refit = masked_least_squares(start, hessian, keep, self.damp)
            if self.admm:
                # The row-wise refit is the same for scaled rows; ADMM's projection is not.
                keep = admm_mask(start, hessian, pattern, sparsity, refit, self.damp,
                                 self.per_row, metric=metric[rows][:, rows]) if full else \
                    admm_mask(start * scale[rows], hessian, pattern, sparsity,
                              refit * scale[rows], self.damp, self.per_row)
                refit = masked_least_squares(start, hessian, keep, self.damp)
            if full:
                refit = metric_least_squares(start, hessian, metric[rows][:, rows], keep,
                                             self.damp, start=refit)
            pruned[rows] = refit
        return pruned

    def _apply(self, model, target: SparsifyTarget, pattern, score, stat, sparsity) -> dict:
        weights = target.matrix()
        pruned = self._prune(target, pattern, score, stat, sparsity)
        shifted = None
        if self.bias_correction:
            shift = np.concatenate([
                mean_output_shift(weights[rows], pruned[rows], stat.mean(group),
                                  stat.reference_mean(group),
                                  stat.residual_mean(target.node.name, group))
                for group, rows in enumerate(target.row_groups())])
            shifted = add_output_shift(model.graph, target, shift)
        stored = target.from_matrix(pruned)
        old = target.weight
        new = model.graph.add_constant(f"{old.name}_sparse", stored)
        density = measured_density(stored)
        new.meta = dict(old.meta)
        new.meta["sparsity"] = {
            **pattern.describe(), "density": round(density, 6),
            "sparsity": round(1 - density, 6), "layout": "out_in", "view": target.layout,
            "view_shape": list(weights.shape), "transposed": target.transposed,
            "method": self.method, "node": target.node.name,
        }
        target.node.set_input(1, new)
        record = {"node": target.node.name, "weight": new.name, "shape": list(stored.shape),
                  "size": int(stored.size), "target": round(float(sparsity), 4),
                  "density": round(density, 6)}
        if shifted is not None:
            record["bias_correction"] = shifted
        if stat is not None and stat.full:
            record["output_error"] = round(_layer_error(target, stat, weights, pruned), 6)
        return record


def _stages(targets: list[SparsifyTarget]) -> list[list[int]]:
    """Target indices in topological order, consecutive readers of one tensor grouped."""
    stages: list[list[int]] = []
    for index, target in enumerate(targets):
        if stages and targets[stages[-1][0]].node.input(0) is target.node.input(0):
            stages[-1].append(index)
        else:
            stages.append([index])
    return stages


def _layer_error(target: SparsifyTarget, stat: InputStatistics, weights, pruned) -> float:
    """Relative output error of the whole layer over its row groups (before any bias
    correction); with paired statistics, relative to the original model's output."""
    if stat.paired:
        num = den = 0.0
        for group, rows in enumerate(target.row_groups()):
            w, h_ref = weights[rows], stat.reference_hessian(group)
            share = float(((w @ h_ref) * w).sum())
            num += share * paired_output_error(w, pruned[rows], stat.hessian(group),
                                               stat.cross(group), h_ref)
            den += share
        return num / max(den, 1e-30)
    if len(target.row_groups()) == 1:
        return relative_output_error(weights, pruned, stat.hessian(0))
    num = den = 0.0
    for group, rows in enumerate(target.row_groups()):
        h = stat.hessian(group)
        delta = weights[rows] - pruned[rows]
        num += float(((delta @ h) * delta).sum())
        den += float(((weights[rows] @ h) * weights[rows]).sum())
    return num / max(den, 1e-30)


def _bias_of(target: SparsifyTarget) -> Value | None:
    """The float constant a layer adds to its output (Gemm's C, or the sole Add after a
    MatMul) when nothing else reads it."""
    if target.op_type == "Gemm":
        bias = target.node.input(2) if len(target.node.inputs) > 2 else None
    else:
        found = target.node.output.sole_add()
        bias = found[0].input(found[1]) if found is not None else None
    if bias is None or not bias.is_constant or bias.const.dtype.kind != "f" \
            or len(bias.uses()) > 1 or bias.is_graph_output():
        return None
    return bias


def _parse_kernel(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise OptionError(f"sparsify: kernels entry {text!r} must look like 1x1 or 3x3")
    return dims
