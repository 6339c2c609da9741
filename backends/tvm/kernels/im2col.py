"""General 2-D convolution as a matrix product: im2col, so a kxk / strided / padded / dilated
Conv (group 1) runs on the same BSR and int8 kernels as a 1x1 conv.

For X[B, C, H, W] (NCHW) and W[O, C, kh, kw] (OIHW), the column matrix is

    col[b, c, i, j, oh, ow] = Xpad[b, c, oh * sh + i * dh, ow * sw + j * dw]

viewed as [B, K = C*kh*kw, P = OH*OW]; K is ordered (c, i, j) like OIHW's flattening, so
W.reshape(O, K) @ col[b] = Y[b].reshape(O, P). The padded halo reads `pad_value` (0 for float,
the zero point for quantized activations: that is what a float 0 quantizes to). The compute
keeps six axes so no index is divided (the innermost, ow, stays contiguous for stride 1) and
the [B, K, P] view is a free reshape. It costs one pass writing kh*kw times the input; for the
product it feeds that is small (K multiply-adds per written value).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ConvGeometry", "conv_geometry", "im2col_te", "im2col_packed_te", "im2col_ref",
           "emit_im2col", "emit_im2col_packed"]


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution's sizes; pads are (top, left, bottom, right) as ONNX orders them."""
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]

    @property
    def out_height(self) -> int:
        return (self.height + self.pads[0] + self.pads[2]
                - self.dilations[0] * (self.kernel[0] - 1) - 1) // self.strides[0] + 1

    @property
    def out_width(self) -> int:
        return (self.width + self.pads[1] + self.pads[3]
                - self.dilations[1] * (self.kernel[1] - 1) - 1) // self.strides[1] + 1

    @property
    def k(self) -> int:
        return self.channels * self.kernel[0] * self.kernel[1]

    @property
    def p(self) -> int:
        return self.out_height * self.out_width

    @property
    def is_pointwise(self) -> bool:
        """1x1, stride 1, no padding: the input is its own column matrix."""
        return self.kernel == (1, 1) and self.strides == (1, 1) and not any(self.pads)


def conv_geometry(node, x_shape, w_shape) -> ConvGeometry | None:
    """The geometry of an ONNX Conv node on NCHW x_shape with OIHW w_shape; None for what the
    im2col kernels do not cover (groups, 1-D/3-D convs)."""
    from backends.tvm.lower import _spatial_padding

    if len(x_shape) != 4 or len(w_shape) != 4 or int(node.attr("group", 1)) != 1:
        return None
    kernel = [int(v) for v in node.attr("kernel_shape", list(w_shape[2:]))]
    if tuple(kernel) != tuple(w_shape[2:]) or w_shape[1] != x_shape[1]:
        return None
    strides = [int(v) for v in node.attr("strides", [1, 1])]
    dilations = [int(v) for v in node.attr("dilations", [1, 1])]
    begin, end = _spatial_padding(node, x_shape[2:], kernel, strides, dilations)
    geometry = ConvGeometry(int(x_shape[1]), int(x_shape[2]), int(x_shape[3]), tuple(kernel),
                            tuple(strides), (int(begin[0]), int(begin[1]), int(end[0]),
                                             int(end[1])), tuple(dilations))
    if geometry.out_height < 1 or geometry.out_width < 1:
        return None
    return geometry


def im2col_te(x, geometry: ConvGeometry, pad_value=0):
    """TE compute of col[B, C, kh, kw, OH, OW] (see module doc) from the te.Tensor x."""
    from tvm import te, tirx

    g = geometry
    batch = x.shape[0]
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
    top, left = g.pads[0], g.pads[1]
    halo = any(g.pads)

    def column(b, c, i, j, oh, ow):
        h = oh * sh + i * dh - top
        w = ow * sw + j * dw - left
        if not halo:
            return x[b, c, h, w]
        inside = tirx.all(h >= 0, h < g.height, w >= 0, w < g.width)
        # Clamped reads: a vectorized select may evaluate both sides.
        value = x[b, c, tirx.max(tirx.min(h, g.height - 1), 0),
                  tirx.max(tirx.min(w, g.width - 1), 0)]
        return tirx.if_then_else(inside, value, tirx.const(pad_value, x.dtype))

    return te.compute((batch, g.channels, kh, kw, g.out_height, g.out_width), column,
                      name="im2col")


def im2col_packed_te(x, geometry: ConvGeometry, pad_value, group: int, k_padded: int,
                     dtype: str, offset: int = 0):
    """TE compute of the int8 kernels' packed activations straight from x: out[B, Kp/g, P, g]
    (`dtype`) = col[b, kq * g + j, p] - offset for k < K, else 0 (Kp = k_padded, whole
    groups; `pad_value` is after the offset). One pass instead of shift, im2col, transpose and
    cast; the index divisions are by constants."""
    from tvm import te, tirx

    g = geometry
    batch = x.shape[0]
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
    top, left = g.pads[0], g.pads[1]
    taps = kh * kw

    def packed(b, kq, p, j):
        k = kq * group + j
        c, tap = k // taps, k % taps
        oh, ow = p // g.out_width, p % g.out_width
        h = oh * sh + (tap // kw) * dh - top
        w = ow * sw + (tap % kw) * dw - left
        inside = tirx.all(h >= 0, h < g.height, w >= 0, w < g.width)
        value = x[b, tirx.min(c, g.channels - 1), tirx.max(tirx.min(h, g.height - 1), 0),
                  tirx.max(tirx.min(w, g.width - 1), 0)].astype("int32") - offset
        value = tirx.if_then_else(inside, value, tirx.const(pad_value, "int32"))
        value = tirx.if_then_else(k < g.k, value, tirx.const(0, "int32"))
        return value.astype(dtype)

    return te.compute((batch, k_padded // group, g.p, group), packed, name="im2col_packed")


def im2col_ref(x: np.ndarray, geometry: ConvGeometry, pad_value=0) -> np.ndarray:
    """numpy reference: col[B, K, P]."""
    g = geometry
    top, left, bottom, right = g.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)),
                    constant_values=pad_value)
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
    cols = np.empty((x.shape[0], g.channels, kh, kw, g.out_height, g.out_width), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = padded[:, :, i * dh: i * dh + (g.out_height - 1) * sh + 1: sh,
                                      j * dw: j * dw + (g.out_width - 1) * sw + 1: sw]
    return cols.reshape(x.shape[0], g.k, g.p)


def emit_im2col(bb, x_expr, geometry: ConvGeometry, pad_value=0):
    """Relax [B, K, P] column matrix of x_expr ([B, C, H, W]); the input itself reshaped when
    the conv is pointwise."""
    from tvm import relax

    batch = int(x_expr.ty.shape[0])
    if geometry.is_pointwise:
        return bb.emit(relax.op.reshape(x_expr, [batch, geometry.k, geometry.p]))
    from tvm import te

    dtype = str(x_expr.ty.dtype)
    x = te.placeholder([int(d) for d in x_expr.ty.shape], dtype, name="x")
    cols = im2col_te(x, geometry, pad_value)
    # Opaque to operator fusion: fused with the int8 path's packing (a reshape + transpose
    # into pairs / quads), its six-axis indices became divisions per element (2x slower than
    # the float QDQ conv in a probe); alone it is a plain copy loop.
    func = te.create_prim_func([x, cols]).with_attr("op_pattern", 8)
    gvar = bb.add_func(func.without_attr("global_symbol"), "im2col")
    out = bb.emit(relax.call_tir(gvar, [x_expr], out_ty=relax.TensorType(
        [int(d) for d in cols.shape], dtype)))
    return bb.emit(relax.op.reshape(out, [batch, geometry.k, geometry.p]))


def emit_im2col_packed(bb, x_expr, geometry: ConvGeometry, pad_value, group: int,
                       k_padded: int, dtype: str, offset: int = 0):
    """Relax [B, Kp/g, P*g] packed activations of x_expr for the int8 kernels
    (`im2col_packed_te`)."""
    from tvm import relax, te

    batch = int(x_expr.ty.shape[0])
    x = te.placeholder([int(d) for d in x_expr.ty.shape], str(x_expr.ty.dtype), name="x")
    out = im2col_packed_te(x, geometry, pad_value, group, k_padded, dtype, offset)
    func = te.create_prim_func([x, out]).with_attr("op_pattern", 8)
    gvar = bb.add_func(func.without_attr("global_symbol"), "im2col_packed")
    packed = bb.emit(relax.call_tir(gvar, [x_expr], out_ty=relax.TensorType(
        [int(d) for d in out.shape], dtype)))
    return bb.emit(relax.op.reshape(packed, [batch, k_padded // group, geometry.p * group]))
