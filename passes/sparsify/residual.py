"""Where a layer's output is added to a residual stream, and that stream's rows.

Error correction (`correction`) fits a sparsified layer's output to the original model's output
of the same layer. When the layer's output (after its bias) is added to a residual stream r, as
the attention-out and FFN-down projections of a transformer or the last conv of a ResNet block
are, what later layers read is the sum y + r, and by then r already carries the error d = r_ref - r
of the layers sparsified before. Fitting the sum instead of y alone,

    min_V E||V x + r - (W x_ref + r_ref)||^2 = min_V E||V x - (W x_ref + d)||^2,

lets the layer cancel the part of d that its own input predicts (see `error_correcting_start`).

`residual_partner` finds r: the layer's output, or its single bias Add's output, read only by an
Add whose other operand is computed (not a constant) and has the same shape as the sum
(`statistics.residual_rows` lays r out as rows matching the layer's input rows).
"""

from __future__ import annotations

from ir import Value

from .layers import SparsifyTarget

__all__ = ["residual_partner"]


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
            # Equal operand shapes: no broadcasting, so the sum has that shape too.
            same = (other.shape is not None and value.shape is not None
                    and tuple(value.shape) == tuple(other.shape))
            return other if same else None
        value = add.output  # a bias (constant operand): the stream may be added after it
    return None
