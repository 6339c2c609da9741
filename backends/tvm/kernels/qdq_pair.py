"""Routing a QDQ MatMul of two activations (attention's Q.K^T and probabilities.V) to the batched
AVX-512 VNNI kernel (`vnni.int8_batch_matmul_vnni`).

The quantize pass (`activation_matmuls=true`) leaves

    A -> Q(sa, za) -> DQ ─┐
                           MatMul -> Y float      A [..., M, K] uint8/int8, B [..., K, N] int8
    B -> Q(sb, 0)  -> DQ ─┘

Neither operand is known at compile time, so what the weight path does once at compile time
happens here on every run, as cheap layout work next to the product itself:
- B is packed into the kernel's layout: Wp[b, v, q, 4 * lane + j] = B[b, 4 * q + j, 16 * v + lane]
  (N padded to whole vectors with zeros), one injective pass over B;
- the zero point term -za * sum_k B[b, k, n] is one reduction over B;
- A is read as it is ([batch, M, K] uint8; int8 activations are shifted up by 128, za with them).
The store dequantizes with sa * sb, so Y is the float tensor the QDQ graph computes:

    Y[b, m, n] = float32(sum_k Aq[b, m, k] * Bq[b, k, n] - za * sum_k Bq[b, k, n]) * (sa * sb)

Only B with a zero point of 0 (symmetric int8, what the pass emits for the second operand) fits
vpdpbusd's signed operand; anything else, a target without VNNI, K not a multiple of 4 or batch
dimensions that differ between A and B, stays on the float path (dequantize, float MatMul).
"""

from __future__ import annotations

import numpy as np

from .qdq import _const_scalar
from .vnni import LANES, QUAD, has_vnni, int8_batch_matmul_vnni

__all__ = ["emit_int8_pair", "paired_operands"]


def _scalar_params(ctx, dq):
    """(quantized value, scale, zero point) behind a per-tensor DequantizeLinear, else None."""
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = dq.inputs[0]
    scale, zero = _const_scalar(ctx, dq.input(1), None), _const_scalar(ctx, dq.input(2))
    if str(np.dtype(q.dtype)) not in ("int8", "uint8") or scale is None or zero is None:
        return None
    return q, float(scale), int(zero)


def paired_operands(ctx, node):
    """(Aq, sa, za, Bq, sb, leading dims, M, K, N) for a MatMul of two QDQ activations the
    VNNI kernel can run, else None."""
    if node.op_type != "MatMul" or ctx.is_known(node.input(1)):
        return None
    a = _scalar_params(ctx, node.inputs[0].producer)
    b = _scalar_params(ctx, node.input(1).producer)
    if a is None or b is None:
        return None
    (aq, sa, za), (bq, sb, zb) = a, b
    if str(np.dtype(bq.dtype)) != "int8" or zb != 0:
        return None
    a_shape, b_shape = ctx.shape(aq), ctx.shape(bq)
    if len(a_shape) < 2 or len(a_shape) != len(b_shape) or a_shape[:-2] != b_shape[:-2]:
        return None
    m, k = a_shape[-2:]
    if b_shape[-2] != k or k % QUAD:
        return None
    return aq, sa, za, bq, sb, a_shape[:-2], m, k, b_shape[-1]


def emit_int8_pair(ctx, node, target, name: str):
    """Emit the node on the batched VNNI kernel; returns (relax expr, record) or None."""
    from tvm import relax

    if not has_vnni(target):
        return None
    found = paired_operands(ctx, node)
    if found is None:
        return None
    aq, sa, za, bq, sb, leading, m, k, n = found
    op = relax.op
    batch = int(np.prod(leading, dtype=np.int64))
    vectors = -(-n // LANES)
    x = ctx.expr(aq)
    if str(np.dtype(aq.dtype)) == "int8":
        x = op.astype(op.add(op.astype(x, "int16"), relax.const(128, "int16")), "uint8")
        za += 128
    x = ctx.emit(op.reshape(x, [batch, m, k]))
    b3 = op.reshape(ctx.expr(bq), [batch, k, n])
    w = op.permute_dims(b3, [0, 2, 1])                                   # [batch, N, K]
    if vectors * LANES != n:
        w = op.nn.pad(w, [0, 0, 0, vectors * LANES - n, 0, 0])
    w = op.reshape(w, [batch, vectors, LANES, k // QUAD, QUAD])
    packed = ctx.emit(op.reshape(op.permute_dims(w, [0, 1, 3, 2, 4]),
                                 [batch, vectors, k // QUAD, LANES * QUAD]))
    zero_point_sums = ctx.emit(op.multiply(op.sum(op.astype(b3, "int32"), axis=[1]),
                                           relax.const(-za, "int32")))
    gvar = ctx.bb.add_func(int8_batch_matmul_vnni(batch, m, k, n).without_attr("global_symbol"),
                           f"int8_{name}")
    args = [x, packed, zero_point_sums,
            ctx.param(f"{name}_i8_scale", np.full(n, sa * sb, np.float32)),
            ctx.param(f"{name}_i8_bias", np.zeros(n, np.float32))]
    y = ctx.emit(relax.call_tir(gvar, args,
                                out_ty=relax.TensorType([batch, m, n], "float32")))
    record = {"kernel": "int8-activations", "method": "vnni",
              "format": "int8 x int8 activations (VNNI, packed at run time)", "block": None,
              "node": node.name, "im2col": False,
              "reason": "QDQ MatMul of two activations: uint8 x int8 -> int32 with AVX-512 VNNI "
                        "(vpdpbusd), second operand packed per run, dequantized in the store"}
    return ctx.emit(op.reshape(y, list(leading) + [m, n])), record
