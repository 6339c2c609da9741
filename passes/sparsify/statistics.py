"""Input statistics of each layer from calibration data: H = E[x x^T] over the layer's columns.

For a layer viewed as W[out, in] (see `layers`), x is one "input row" of the matrix product:
a token's features for MatMul, a row of A for Gemm, an im2col patch for Conv. Then
- Wanda's column norm is sqrt(diag(H)) (up to a constant factor that does not change rankings);
- SparseGPT's Hessian of the layer-wise squared error is H;
- the output error of a weight change dW is trace(dW H dW^T) (used by the sensitivity scan).

Activations come from one onnxruntime run per calibration feed of the nodes that the layer inputs
need (`passes.staged_capture`, which in a sequential sweep also starts from what the previous
stage computed), folded into the statistics feed by feed so that the model runs once over the
data and memory stays bounded; layers reading the same tensor the same way (Q/K/V projections)
share one statistic.
"""

from __future__ import annotations

import math
from itertools import repeat

import numpy as np

from ir import Model

from ..calibration import CalibrationSet
from ..staged_capture import StagedCapture
from .layers import SparsifyTarget
from .residual import residual_partner

__all__ = ["InputStatistics", "collect_statistics", "conv_patches", "layer_rows",
           "residual_rows"]

# Rows of x used per calibration feed at most (conv layers on large images have many patches;
# a seeded subsample of positions estimates H as well).
MAX_ROWS_PER_FEED = 4096
# Bytes of rows x gathered per statistic before one x^T x product (bounds memory, keeps BLAS busy).
ROW_BUFFER_BYTES = 32 * 2**20


class InputStatistics:
    """Per row group (conv groups; one group otherwise): H = mean x x^T, or only its diagonal,
    and the mean row E[x].

    Paired statistics (`paired=True`) also fold in the rows x_ref that the *reference* model
    (the original, dense one) feeds the same layer on the same tokens, while x comes from the
    model being sparsified: the cross moment E[x x_ref^T], E[x_ref x_ref^T] and E[x_ref]. They
    let a layer reconstruct the reference output W x_ref from its actual input x (see
    `correction`). For a layer whose output is added to a residual stream r (see `residual`),
    `track_residual` also folds in E[d x^T] and E[d] for d = r_ref - r, the error the stream
    already carries on the same tokens.
    """

    def __init__(self, groups: int, columns: int, full: bool, paired: bool = False):
        self.full = full or paired
        self.paired = paired
        square = (columns, columns) if self.full else columns
        self.sums = [np.zeros(square) for _ in range(groups)]
        self.row_sums = [np.zeros(columns) for _ in range(groups)]
        self.cross_sums = [np.zeros((columns, columns)) for _ in range(groups)] if paired else None
        self.reference_sums = [np.zeros((columns, columns)) for _ in range(groups)] \
            if paired else None
        self.reference_row_sums = [np.zeros(columns) for _ in range(groups)] if paired else None
        # Per layer reading this input (node name): per group, sum d x^T [out, in] and sum d.
        self.residual_sums: dict[str, list[np.ndarray]] = {}
        self.residual_row_sums: dict[str, list[np.ndarray]] = {}
        self.rows = 0

    def track_residual(self, layer: str, outputs_per_group: int) -> None:
        """Also collect the residual error statistics of `layer` (rows given to `add`)."""
        columns = len(self.row_sums[0])
        groups = len(self.row_sums)
        self.residual_sums[layer] = [np.zeros((outputs_per_group, columns))
                                     for _ in range(groups)]
        self.residual_row_sums[layer] = [np.zeros(outputs_per_group) for _ in range(groups)]

    def add(self, per_group_rows: list[np.ndarray],
            reference_rows: list[np.ndarray] | None = None,
            residual_errors: dict[str, list[np.ndarray]] | None = None) -> None:
        """Fold in rows x [rows, columns] (and, when paired, the reference rows of the same
        tokens; for tracked layers, the residual error rows d [rows, out] of the same tokens).
        The products run in float32 (a few thousand rows per call, so rounding stays ~1e-6
        relative, far below SparseGPT's 1% dampening) and are summed in float64."""
        if self.paired and reference_rows is None:
            raise ValueError("paired statistics need the reference rows too")
        for index, x in enumerate(per_group_rows):
            x = np.ascontiguousarray(x, dtype=np.float32)
            self.sums[index] += x.T @ x if self.full else np.einsum("ij,ij->j", x, x)
            self.row_sums[index] += x.sum(axis=0, dtype=np.float64)
            if self.paired:
                ref = np.ascontiguousarray(reference_rows[index], dtype=np.float32)
                self.cross_sums[index] += x.T @ ref
                self.reference_sums[index] += ref.T @ ref
                self.reference_row_sums[index] += ref.sum(axis=0, dtype=np.float64)
            for layer, errors in (residual_errors or {}).items():
                d = np.ascontiguousarray(errors[index], dtype=np.float32)
                self.residual_sums[layer][index] += d.T @ x
                self.residual_row_sums[layer][index] += d.sum(axis=0, dtype=np.float64)
        self.rows += len(per_group_rows[0])

    def _mean(self, sums: np.ndarray) -> np.ndarray:
        return sums / max(self.rows, 1)

    def hessian(self, group: int = 0) -> np.ndarray:
        """E[x x^T] of row group `group` ([in, in]); needs full statistics."""
        if not self.full:
            raise ValueError("only the diagonal was collected")
        return self._mean(self.sums[group])

    def mean(self, group: int = 0) -> np.ndarray:
        """E[x] over the rows ([in])."""
        return self._mean(self.row_sums[group])

    def cross(self, group: int = 0) -> np.ndarray:
        """E[x x_ref^T] ([in, in]); equals `hessian` when the inputs match the reference."""
        return self._mean(self.cross_sums[group]) if self.paired else self.hessian(group)

    def reference_hessian(self, group: int = 0) -> np.ndarray:
        """E[x_ref x_ref^T] ([in, in])."""
        return self._mean(self.reference_sums[group]) if self.paired else self.hessian(group)

    def reference_mean(self, group: int = 0) -> np.ndarray:
        """E[x_ref] ([in]); equals `mean` when unpaired."""
        return self._mean(self.reference_row_sums[group]) if self.paired else self.mean(group)

    def residual_cross(self, layer: str, group: int = 0) -> np.ndarray | None:
        """E[d x^T] ([out, in]) for a tracked layer, d its residual stream's error; else None."""
        sums = self.residual_sums.get(layer)
        return None if sums is None else self._mean(sums[group])

    def residual_mean(self, layer: str, group: int = 0) -> np.ndarray | None:
        """E[d] ([out]) for a tracked layer; else None."""
        sums = self.residual_row_sums.get(layer)
        return None if sums is None else self._mean(sums[group])

    def column_norms(self, group: int = 0) -> np.ndarray:
        """sqrt(E[x_j^2]) per input column: Wanda's activation norm (scaled by 1/sqrt(rows))."""
        total = self.sums[group]
        diag = np.diag(total) if self.full else total
        return np.sqrt(np.maximum(diag, 0.0) / max(self.rows, 1))


def _conv_geometry(target: SparsifyTarget, spatial: tuple[int, ...]):
    node, kernel = target.node, target.kernel
    dims = len(kernel)
    strides = list(node.attr("strides", [1] * dims))
    dilations = list(node.attr("dilations", [1] * dims))
    pads = list(node.attr("pads", [0] * (2 * dims)))
    auto_pad = node.attr("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * dims)
        for axis in range(dims):
            effective = (kernel[axis] - 1) * dilations[axis] + 1
            out = math.ceil(spatial[axis] / strides[axis])
            total = max((out - 1) * strides[axis] + effective - spatial[axis], 0)
            small, large = total // 2, total - total // 2
            pads[axis], pads[axis + dims] = ((small, large) if auto_pad == "SAME_UPPER"
                                             else (large, small))
    elif auto_pad == "VALID":
        pads = [0] * (2 * dims)
    return strides, dilations, pads


def conv_patches(x: np.ndarray, target: SparsifyTarget) -> list[np.ndarray]:
    """im2col of a conv input x [N, C, *spatial]: per group, rows = output positions,
    columns = (input channel of the group, kernel offsets...), matching W.reshape(O, -1)."""
    kernel = target.kernel
    dims = len(kernel)
    strides, dilations, pads = _conv_geometry(target, x.shape[2:])
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[a], pads[a + dims]) for a in range(dims)])
    effective = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    windows = np.lib.stride_tricks.sliding_window_view(x, effective, axis=tuple(range(2, 2 + dims)))
    # windows: [N, C, *positions, *effective]; keep strided positions and dilated taps.
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    windows = windows[index]
    batch, channels = windows.shape[:2]
    positions = windows.shape[2:2 + dims]
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    rows = windows.transpose(order).reshape(batch * int(np.prod(positions)), channels, -1)
    per_group = channels // target.groups
    return [rows[:, g * per_group:(g + 1) * per_group, :].reshape(len(rows), -1)
            for g in range(target.groups)]


def layer_rows(activation: np.ndarray, target: SparsifyTarget,
               row_mask: np.ndarray | None = None) -> list[np.ndarray]:
    """The input rows x of one captured activation, per row group.

    `row_mask` (e.g. an attention mask [batch, seq]) drops the rows of a MatMul input
    [batch, seq, K] where it is 0: padding tokens do not reach the model's output, and with
    short sentences padded to a long sequence they would otherwise dominate H.
    """
    if target.op_type == "Conv":
        return conv_patches(activation, target)
    if target.op_type == "Gemm" and target.node.attr("transA", 0):
        activation = activation.T
    return [_token_rows(activation, target, row_mask)]


def residual_rows(activation: np.ndarray, target: SparsifyTarget,
                  row_mask: np.ndarray | None = None) -> list[np.ndarray]:
    """Rows [rows, out / groups] of a value shaped like the layer's output (its residual
    stream, see `residual`) per row group, in the order of `layer_rows`: tokens for MatMul and
    Gemm, output positions for Conv."""
    if target.op_type == "Conv":
        rows = np.moveaxis(activation, 1, -1).reshape(-1, activation.shape[1])
        per = activation.shape[1] // target.groups
        return [rows[:, g * per:(g + 1) * per] for g in range(target.groups)]
    return [_token_rows(activation, target, row_mask)]


def _token_rows(activation: np.ndarray, target: SparsifyTarget,
                row_mask: np.ndarray | None) -> np.ndarray:
    """[rows, last dim] of a MatMul/Gemm tensor, without the rows `row_mask` marks 0."""
    if (row_mask is not None and target.op_type == "MatMul"
            and activation.shape[:row_mask.ndim] == row_mask.shape):
        kept = activation[row_mask.astype(bool)]
        if len(kept):
            return kept.reshape(-1, activation.shape[-1])
    return activation.reshape(-1, activation.shape[-1])


def _statistic_key(target: SparsifyTarget) -> tuple:
    node = target.node
    if target.op_type == "Conv":
        return (node.input(0).name, "Conv", target.kernel, target.groups,
                tuple(sorted((k, str(v)) for k, v in node.attrs.items())))
    return (node.input(0).name, target.op_type, bool(node.attr("transA", 0)))


def collect_statistics(model: Model, targets: list[SparsifyTarget], calibration: CalibrationSet,
                       samples: int, full: bool, seed: int = 0, progress=None,
                       row_mask_input: str | None = None,
                       reference: Model | None = None,
                       residual: bool = False,
                       captures: tuple[StagedCapture, StagedCapture | None] | None = None
                       ) -> list[InputStatistics]:
    """One InputStatistics per target (shared between targets reading the same input).

    The model runs once per calibration feed with every target's input as an extra output, and
    each feed's activations are folded into the statistics before the next feed runs: one pass
    over the data whatever the number of layers, and memory bounded by one feed's activations
    (plus ROW_BUFFER_BYTES of rows per statistic, so that x^T x runs as one large BLAS product).
    `row_mask_input` names a graph input whose 0 entries mark rows to leave out (see
    `layer_rows`). With a `reference` model (the same graph inputs and the same names for the
    targets' inputs, e.g. a copy of the original of a model being sparsified) the statistics are
    paired: both models run on each feed and the same rows of both are folded in; `residual`
    then also tracks the residual stream error of each target whose output is added to one
    (`residual.residual_partner`). `captures` (of the model and of the reference, on the same
    feeds) carry activations over from the previous call of a sequential sweep, see
    `staged_capture`; without them each call runs what its layers' inputs need from the graph
    inputs."""
    rng = np.random.default_rng(seed)
    keyed: dict[tuple, InputStatistics] = {}
    owners: dict[tuple, SparsifyTarget] = {}
    for target in targets:
        key = _statistic_key(target)
        if key not in keyed:
            columns = target.matrix().shape[1]
            keyed[key] = InputStatistics(target.groups, columns, full,
                                         paired=reference is not None)
            owners[key] = target
    partners: dict[str, tuple[str, SparsifyTarget, tuple]] = {}
    if residual and reference is not None:
        known = reference.graph.values()
        for target in targets:
            partner = residual_partner(target)
            # A stream value made after the reference was copied has no twin to compare with.
            if partner is not None and partner.name in known:
                key = _statistic_key(target)
                outputs = target.matrix().shape[0] // target.groups
                keyed[key].track_residual(target.node.name, outputs)
                partners[target.node.name] = (partner.name, target, key)
    names = sorted({target.node.input(0).name for target in owners.values()}
                   | {name for name, _, _ in partners.values()})
    if captures is None:
        feeds = calibration.feeds(model, samples)
        captures = (StagedCapture(model, feeds, keep=False),
                    StagedCapture(reference, feeds, keep=False) if reference is not None else None)
    capture, reference_capture = captures
    feeds = capture.feeds
    captured_feeds = capture.capture(names)
    referenced_feeds = reference_capture.capture(names) if reference_capture is not None \
        else repeat(None)
    buffers: dict[tuple, list[tuple]] = {key: [] for key in keyed}
    # Counted as the buffer grows: re-summing it at every feed was quadratic in the feeds that
    # fill one ROW_BUFFER_BYTES window (hundreds of short texts).
    buffered_bytes = dict.fromkeys(keyed, 0)
    iterate = progress(feeds, total=len(feeds), desc="sparsify: calibration") if progress \
        else feeds
    for feed, captured, references in zip(iterate, captured_feeds, referenced_feeds):
        mask = feed[row_mask_input] if row_mask_input is not None else None
        for key, target in owners.items():
            name = target.node.input(0).name
            rows = layer_rows(np.asarray(captured[name]), target, mask)
            ref_rows = layer_rows(np.asarray(references[name]), target, mask) \
                if references is not None else None
            errors = {layer: residual_rows(np.asarray(references[value])
                                           - np.asarray(captured[value]), reader, mask)
                      for layer, (value, reader, reader_key) in partners.items()
                      if reader_key == key}
            if len(rows[0]) > MAX_ROWS_PER_FEED:
                pick = np.sort(rng.choice(len(rows[0]), MAX_ROWS_PER_FEED, replace=False))
                rows = [r[pick] for r in rows]
                ref_rows = [r[pick] for r in ref_rows] if ref_rows is not None else None
                errors = {layer: [r[pick] for r in parts] for layer, parts in errors.items()}
            buffers[key].append((rows, ref_rows, errors))
            buffered_bytes[key] += sum(r.nbytes for r in rows)
            if buffered_bytes[key] >= ROW_BUFFER_BYTES:
                _flush(keyed[key], buffers[key])
                buffered_bytes[key] = 0
    for key in keyed:
        _flush(keyed[key], buffers[key])
    return [keyed[_statistic_key(t)] for t in targets]


def _flush(stat: InputStatistics, buffered: list[tuple]) -> None:
    if not buffered:
        return
    rows = [np.concatenate(parts) for parts in zip(*(entry[0] for entry in buffered))]
    reference = None
    if stat.paired:
        reference = [np.concatenate(parts) for parts in zip(*(entry[1] for entry in buffered))]
    errors = {layer: [np.concatenate(parts) for parts in zip(*(entry[2][layer]
                                                               for entry in buffered))]
              for layer in buffered[0][2]}
    stat.add(rows, reference, errors)
    buffered.clear()
