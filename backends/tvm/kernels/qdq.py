"""Routing QDQ-quantized MatMul / Gemm / Conv to the int8 kernel (`int8.bsr_int8_kn`).

The quantize pass leaves  x -> QuantizeLinear -> DequantizeLinear -> op(., DequantizeLinear(Wq))
and TVM's lowering would run the op in float on dequantized values. Here the op reads the
quantized activation xq (the QuantizeLinear output) and the int8 weight directly, accumulates in
int32 and dequantizes in the store, float output = what the QDQ graph computes (so any consumer,
including the next QuantizeLinear, is unchanged):

    Y[n, p] = float32(acc[n, p] - zx * sum_k Wq[n, k]) * (sx * sw[n]) + bias[n]

uint8 activations (the pass's default) are shifted to int8 (xq - 128, zx - 128) so one signed
kernel serves both ("vnni" wants them unsigned: int8 ones are shifted up instead). Only the vector
inner products are used ("madd" on x86 AVX2, "vnni" with AVX-512 VNNI, "sdot" on ARM with
+dotprod): the plain int32 one measured slower than float32 here, so without them the node
stays on the float path. Sparse int8 weights keep their blocks when the block width fits the
inner product (C a multiple of 2 / 4), else they are re-blocked R x 2 / R x 4 (R = 4) and the
block density decides as for float. A Conv (group 1, any kernel / stride / padding / dilation)
runs on im2col of xq (`im2col.py`, the halo filled with the zero point), K padded with zero
weight columns to whole quads.

On an AVX-512 VNNI CPU a MatMul / Gemm (K a multiple of 4) whose weight is not sparse enough for
the BSR kernel to beat it runs on the dense row-layout kernel of vnni.py instead: uint8 xq as it
is ([M, K], no transposes; int8 activations are shifted up), Y [M, N] (method "vnni").
"""

from __future__ import annotations

import numpy as np

from .bsr import to_bsr
from .choice import BREAK_EVEN_DENSITY, pattern_name, target_family
from .im2col import ConvGeometry, conv_geometry, emit_im2col_packed
from .int8 import bsr_int8_kn, dequantize_params, int8_method_for
from .vnni import QUAD, has_vnni, int8_matmul_vnni, pack_weight_vnni

__all__ = ["quantized_operands", "emit_int8"]

GROUP = {"madd": 2, "sdot": 4, "vnni": 4}
# The dense VNNI kernel ran MiniLM's FFN shapes 1.96-2.26x faster than the dense "madd" one
# (bench/results/sparse_kernels.md, AVX-512 VNNI section), so a sparse int8 BSR kernel only pays
# below 1/2 of its usual break-even density when the target has VNNI.
VNNI_SPEEDUP = 2.0


def _const_scalar(ctx, value, default=0):
    if value is None:
        return default
    if not ctx.is_known(value):
        return None
    array = np.asarray(ctx.const(value))
    return array.reshape(-1)[0].item() if array.size == 1 else None


def quantized_operands(ctx, node):
    """(xq value, sx, zx, Wq [N, K] int8, sw [N], bias [N] or None, kind) for a QDQ node the
    int8 kernel can run, else None; kind is "matmul" or the Conv's `ConvGeometry`."""
    x_dq, w_dq = node.inputs[0].producer, node.input(1).producer
    if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" \
            or w_dq.op_type != "DequantizeLinear":
        return None
    xq = x_dq.inputs[0]
    if str(np.dtype(xq.dtype)) not in ("int8", "uint8"):
        return None
    sx, zx = _const_scalar(ctx, x_dq.input(1)), _const_scalar(ctx, x_dq.input(2))
    if sx is None or zx is None:
        return None
    wq_value = w_dq.inputs[0]
    if not ctx.is_known(wq_value) or str(np.dtype(wq_value.dtype)) != "int8":
        return None
    wq = np.asarray(ctx.const(wq_value))
    w_zp = w_dq.input(2)
    if w_zp is not None and (not ctx.is_known(w_zp) or np.any(np.asarray(ctx.const(w_zp)))):
        return None
    if not ctx.is_known(w_dq.input(1)):
        return None
    scales = np.asarray(ctx.const(w_dq.input(1)), np.float32).reshape(-1)
    axis = int(w_dq.attr("axis", 1)) % max(wq.ndim, 1)
    bias = None
    if node.op_type == "MatMul":
        if wq.ndim != 2 or (scales.size > 1 and axis != 1):
            return None
        weight, kind = wq.T, "matmul"
    elif node.op_type == "Gemm":
        trans_b = bool(node.attr("transB", 0))
        if node.attr("transA", 0) or wq.ndim != 2 or \
                (scales.size > 1 and axis != (0 if trans_b else 1)):
            return None
        weight, kind = (wq if trans_b else wq.T), "matmul"
        scales = scales * np.float32(node.attr("alpha", 1.0))
        c = node.input(2)
        if c is not None and float(node.attr("beta", 1.0)) != 0.0:
            if not ctx.is_known(c) or np.asarray(ctx.const(c)).size not in (1, weight.shape[0]):
                return None
            bias = np.broadcast_to(np.asarray(ctx.const(c), np.float32).reshape(-1),
                                   (weight.shape[0],)) * np.float32(node.attr("beta", 1.0))
    elif node.op_type == "Conv":
        geometry = conv_geometry(node, tuple(int(d) for d in xq.shape), wq.shape)
        if geometry is None or (scales.size > 1 and axis != 0):
            return None
        weight, kind = wq.reshape(wq.shape[0], -1), geometry
        b = node.input(2)
        if b is not None:
            if not ctx.is_known(b):
                return None
            bias = np.asarray(ctx.const(b), np.float32)
    else:
        return None
    sw = np.broadcast_to(scales, (weight.shape[0],)).astype(np.float32)
    return xq, float(sx), int(zx), np.ascontiguousarray(weight), sw, bias, kind


def _int8_block(meta: dict, group: int) -> tuple[int, int]:
    sparsity = (meta or {}).get("sparsity") or {}
    if sparsity.get("pattern") == "block":
        r, c = (int(v) for v in sparsity.get("block", (4, 1)))
        if c % group == 0:
            return r, c
    return 4, group


def emit_int8(ctx, node, meta: dict, target, name: str):
    """Emit the node with the int8 kernel; returns (relax expr, record) or None."""
    from tvm import relax

    found = quantized_operands(ctx, node)
    if found is None:
        return None
    xq, sx, zx, weight, sw, bias, kind = found
    n, k = weight.shape
    conv = isinstance(kind, ConvGeometry)
    if conv and k % 4:
        # Zero weight columns up to whole quads: the inner products need K % group == 0, and
        # im2col pads the activations to match (what they hold there is multiplied by 0).
        weight = np.pad(weight, ((0, 0), (0, -k % 4)))
        k = weight.shape[1]
    method = int8_method_for(target, 4, k)     # the target's best; blocks are chosen to fit it
    if method not in GROUP:
        return None
    group = GROUP[method]
    block = _int8_block(meta, group)
    bsr = to_bsr(weight, block)
    family = target_family(target)
    threshold = BREAK_EVEN_DENSITY[family]["vector"]
    sparse = bsr.block_density < threshold
    op = relax.op
    x = ctx.expr(xq)
    if not conv and k % QUAD == 0 and has_vnni(target) and \
            bsr.block_density >= threshold / VNNI_SPEEDUP:
        return _emit_vnni(ctx, node, meta, name, x, xq, sx, zx, weight, sw, bias, threshold)
    x_dtype = {"madd": "int16", "sdot": "int8", "vnni": "uint8"}[method]
    # madd / sdot multiply signed values: uint8 activations (the pass's default) are shifted to
    # int8. vpdpbusd wants them unsigned: int8 activations are shifted up instead.
    unsigned = str(np.dtype(xq.dtype)) == "uint8"
    offset = (0 if unsigned else -128) if method == "vnni" else (128 if unsigned else 0)
    zx -= offset
    shape = [int(d) for d in x.ty.shape]
    if conv:
        # im2col straight into the packed layout, shift included; the halo reads the zero
        # point (what a float 0 quantizes to).
        batch, p = shape[0], kind.p
        packed = emit_im2col_packed(ctx.bb, x, kind, zx, group, k, x_dtype, offset)
    else:
        if offset:
            x = _shifted(ctx, x, offset, x_dtype)
        m = int(np.prod(shape[:-1]))
        batch, p = 1, m
        x3 = op.reshape(op.permute_dims(op.reshape(x, [m, k]), [1, 0]), [1, k, m])  # [1, K, M]
        packed = op.permute_dims(op.reshape(x3, [batch, k // group, group, p]), [0, 1, 3, 2])
        packed = ctx.emit(op.reshape(op.astype(packed, x_dtype), [batch, k // group, p * group]))
    func, data = bsr_int8_kn(bsr, batch, p, method=method, out_dtype="float32")
    gvar = ctx.bb.add_func(func.without_attr("global_symbol"), f"int8_{name}")
    b_q, mult = dequantize_params(weight, sx, zx, sw)
    args = [packed, ctx.param(f"{name}_i8_packed", data),
            ctx.param(f"{name}_i8_data", bsr.data.astype(np.int8)),
            ctx.param(f"{name}_i8_indices", bsr.indices),
            ctx.param(f"{name}_i8_indptr", bsr.indptr),
            ctx.param(f"{name}_i8_zero_point_sums", b_q), ctx.param(f"{name}_i8_scale", mult),
            ctx.param(f"{name}_i8_bias", np.zeros(n, np.float32) if bias is None
                      else np.asarray(bias, np.float32))]
    y3 = ctx.emit(relax.call_tir(gvar, args, out_ty=relax.TensorType([batch, n, p], "float32")))
    if not conv:
        y = op.reshape(op.permute_dims(op.reshape(y3, [n, p]), [1, 0]), shape[:-1] + [n])
    else:
        y = op.reshape(y3, [batch, n, kind.out_height, kind.out_width])
    record = {"kernel": "int8-bsr" if sparse else "int8-dense", "method": method,
              "format": f"bsr {block[0]}x{block[1]} int8", "block": list(block),
              "block_density": bsr.block_density, "node": node.name,
              "pattern": pattern_name(meta), "im2col": conv and not kind.is_pointwise,
              "reason": f"QDQ {node.op_type}: 8-bit products summed in int32 with {method}, "
                        f"dequantized in the store (every block kept counts: sparse below "
                        f"{BREAK_EVEN_DENSITY[family]['vector']} block density)"}
    return ctx.emit(y), record


def _emit_vnni(ctx, node, meta, name, x, xq, sx, zx, weight, sw, bias, threshold):
    """MatMul/Gemm on the row-layout AVX-512 VNNI kernel (vnni.py): X stays [M, K] uint8 (int8
    activations are shifted up by 128, the zero point with them), Y comes out [M, N]."""
    from tvm import relax

    op = relax.op
    n, k = weight.shape
    shape = [int(d) for d in x.ty.shape]
    m = int(np.prod(shape[:-1]))
    if str(np.dtype(xq.dtype)) == "int8":
        x = _shifted(ctx, x, -128, "uint8")
        zx += 128
    x2 = ctx.emit(op.reshape(x, [m, k]))
    gvar = ctx.bb.add_func(int8_matmul_vnni(m, k, n).without_attr("global_symbol"),
                           f"int8_{name}")
    b_q, mult = dequantize_params(weight, sx, zx, sw)
    args = [x2, ctx.param(f"{name}_i8_vnni", pack_weight_vnni(weight)),
            ctx.param(f"{name}_i8_zero_point_sums", b_q), ctx.param(f"{name}_i8_scale", mult),
            ctx.param(f"{name}_i8_bias", np.zeros(n, np.float32) if bias is None
                      else np.asarray(bias, np.float32))]
    y2 = ctx.emit(relax.call_tir(gvar, args, out_ty=relax.TensorType([m, n], "float32")))
    density = float(np.count_nonzero(weight)) / max(weight.size, 1)
    record = {"kernel": "int8-dense", "method": "vnni", "format": "dense int8 (VNNI packed)",
              "block": None, "block_density": 1.0, "weight_density": round(density, 4),
              "node": node.name, "pattern": pattern_name(meta), "im2col": False,
              "reason": f"QDQ {node.op_type}: uint8 x int8 -> int32 with AVX-512 VNNI "
                        f"(vpdpbusd), row layout, dequantized in the store (a sparse int8 kernel "
                        f"only pays below {threshold / VNNI_SPEEDUP:.3g} block density here)"}
    return ctx.emit(op.reshape(y2, shape[:-1] + [n])), record


def _shifted(ctx, x, offset: int, dtype: str):
    """x - offset in `dtype` (8-bit activations moved between the signed and unsigned range
    the inner product wants; int16 in between so nothing wraps)."""
    from tvm import relax
    op = relax.op
    return ctx.emit(op.astype(op.subtract(op.astype(x, "int16"), relax.const(offset, "int16")),
                              dtype))
