"""Where a layer's output is added to a residual stream, and that stream's rows.

Error correction (`correction`) fits a sparsified layer's output to the original model's output
of the same layer. When the layer's output (after its bias) is added to a residual stream r, as
the attention-out and FFN-down projections of a transformer or the last conv of a ResNet block
are, what later layers read is the sum y + r, and by then r already carries the error d = r_ref - r
of the layers sparsified before. Fitting the sum instead of y alone,

    min_V E||V x + r - (W x_ref + r_ref)||^2 = min_V E||V x - (W x_ref + d)||^2,

lets the layer cancel the part of d that its own input predicts (see `error_correcting_start`).

`residual_partner` finds r: the layer's output, or its single bias Add's output, read only by an
Add whose other operand is computed (not a constant) and has the same shape as the sum.
`residual_rows` lays r out as rows matching the layer's input rows (`statistics.layer_rows`).
"""

from __future__ import annotations

import numpy as np

from ir import Value

from .layers import SparsifyTarget

__all__ = ["residual_partner", "residual_rows"]


def residual_partner(target: SparsifyTarget) -> Value | None:
    """The residual operand r of the Add that sums this layer's output with a stream, or None."""
    value = target.node.output
    for _ in range(2):  # the layer's own output, then its bias Add's output
        found = value.sole_add()
        if found is None:
            return None
        add, index = found
        other = add.input(index)
        if other is None:
            return None
        if not other.is_constant:
            same = (other.shape is not None and add.output.shape is not None
                    and tuple(other.shape) == tuple(add.output.shape)
                    and value.shape is not None and tuple(value.shape) == tuple(other.shape))
            return other if same else None
        value = add.output  # a bias (constant operand): the stream may be added after it
    return None


def residual_rows(activation: np.ndarray, target: SparsifyTarget,
                  row_mask: np.ndarray | None = None) -> list[np.ndarray]:
    """Rows [rows, out / groups] of a residual value per row group, in the order of the layer's
    input rows (`statistics.layer_rows`): tokens for MatMul, output positions for Conv."""
    if target.op_type == "Conv":
        channels_last = np.moveaxis(activation, 1, -1)
        rows = channels_last.reshape(-1, activation.shape[1])
        per = activation.shape[1] // target.groups
        return [rows[:, g * per:(g + 1) * per] for g in range(target.groups)]
    if (row_mask is not None and target.op_type == "MatMul"
            and activation.shape[:row_mask.ndim] == row_mask.shape):
        kept = activation[row_mask.astype(bool)]
        if len(kept):
            return [kept.reshape(-1, activation.shape[-1])]
    return [activation.reshape(-1, activation.shape[-1])]
