"""Fused scaled dot-product attention for CPUs: MatMul -> scale -> (+ mask) -> Softmax -> MatMul
as one pre-scheduled kernel.

The ONNX graphs transformer exporters write (BERT, MiniLM, ViT) compute attention as

    S = MatMul(Q, Kt)         Q [B, H, Sq, D], Kt [B, H, D, Sk]
    S = S / c  (or S * c)     a compile-time scalar
    S = S + mask              optional, broadcastable to S (e.g. [B, 1, 1, Sk])
    P = Softmax(S, axis=-1)
    O = MatMul(P, V)          V [B, H, Sk, E]
    (O = Transpose(O, [0, 2, 1, 3]): heads back next to each other, [B, Sq, H, E])

Lowered op by op, the scores S are written to memory and read back three times (scale + mask,
softmax, the second MatMul) and each MatMul is a separate call. Here one thread takes `rows`
query rows of one head: their scores go into a small stack buffer (rows x Sk floats), the
softmax (one exp per element: the vectorizable polynomial below) runs in that buffer, and the
second product accumulates rows x E outputs in registers, scaled by 1 / row sum in the store,
written straight in the transposed layout when a Transpose [0, 2, 1, 3] follows.

`match_attention` finds the pattern in our IR (every intermediate value used once, not a graph
output, shapes static, Sk and E multiples of the vector width); `emit_attention` lowers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["AttentionPattern", "match_attention", "attention_kernel", "attention_ref",
           "emit_attention"]

SCORE_BUFFER_FLOATS = 16384   # rows x Sk scores per thread (64 KiB of stack at most)


@dataclass
class AttentionPattern:
    """The nodes of one attention (see module doc) and what the kernel needs to know."""
    q: object                 # IR values
    kt: object
    v: object
    mask: object | None
    scale: float              # S is multiplied by this (1 / c for a Div)
    interior: list            # nodes the fused kernel replaces, except `last`
    last: object              # the node whose output the kernel produces
    transposed: bool          # output [B, Sq, H, E] (a Transpose [0, 2, 1, 3] was fused)


def _single_use(value, graph) -> bool:
    return len(value.uses()) == 1 and value not in graph.outputs


def _scalar(ctx, value):
    if value is None or not ctx.is_known(value):
        return None
    array = np.asarray(ctx.const(value))
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def match_attention(ctx, softmax, lanes: int) -> AttentionPattern | None:
    """The attention pattern around a Softmax node, or None (see module doc)."""
    graph = ctx.graph
    shape = ctx.shape(softmax.inputs[0])
    if len(shape) != 4 or ctx.dtype(softmax.inputs[0]) != "float32":
        return None
    if int(softmax.attr("axis", -1 if ctx.model.opset >= 13 else 1)) % 4 != 3:
        return None
    if not _single_use(softmax.output, graph):
        return None
    pv = softmax.output.consumers()[0]
    if pv.op_type != "MatMul" or pv.inputs[0] is not softmax.output:
        return None
    interior = [softmax]
    value, mask, scale = softmax.inputs[0], None, 1.0
    node = value.producer
    if node is not None and node.op_type == "Add" and _single_use(value, graph):
        a, b = node.inputs
        scores, mask = (a, b) if a.producer is not None and \
            a.producer.op_type in ("Div", "Mul", "MatMul") else (b, a)
        mask_shape = ctx.shape(mask)
        if len(mask_shape) > 4 or any(m not in (1, s) for m, s in
                                      zip((1,) * (4 - len(mask_shape)) + mask_shape, shape)):
            return None
        interior.append(node)
        value, node = scores, scores.producer
    if node is not None and node.op_type in ("Div", "Mul") and _single_use(value, graph):
        constant = _scalar(ctx, node.inputs[1])
        if constant is None or constant == 0.0:
            return None
        scale = 1.0 / constant if node.op_type == "Div" else constant
        interior.append(node)
        value, node = node.inputs[0], node.inputs[0].producer
    if node is None or node.op_type != "MatMul" or not _single_use(value, graph):
        return None
    interior.append(node)
    q, kt, v = node.inputs[0], node.inputs[1], pv.inputs[1]
    if any(len(ctx.shape(t)) != 4 or ctx.dtype(t) != "float32" for t in (q, kt, v)):
        return None
    (b, h, sq, d), (b2, h2, d2, sk), (b3, h3, sk3, e) = (ctx.shape(t) for t in (q, kt, v))
    if (b, h) != (b2, h2) or (b, h) != (b3, h3) or d != d2 or sk != sk3 or \
            sk % lanes or e % lanes:
        return None
    if mask is not None and (ctx.dtype(mask) != "float32"):
        return None
    last, transposed = pv, False
    follower = pv.output.consumers()[0] if _single_use(pv.output, graph) else None
    if follower is not None and follower.op_type == "Transpose" and \
            list(follower.attr("perm", [])) == [0, 2, 1, 3]:
        interior.append(pv)
        last, transposed = follower, True
    return AttentionPattern(q, kt, v, mask, scale, interior, last, transposed)


def _fast_exp(x):
    """exp(x) for float32 as a polynomial LLVM vectorizes (Cephes' expf: range reduction by
    ln 2, degree-6 polynomial, 2^n from the exponent bits; relative error ~1e-7; inputs are
    clamped to +-88.38 so n stays in the exponent's range)."""
    from tvm import tirx

    f = tirx.const
    x = tirx.max(tirx.min(x, f(88.3762626647949, "float32")), f(-88.3762626647949, "float32"))
    n = tirx.floor(x * f(1.44269504088896341, "float32") + f(0.5, "float32"))
    r = x - n * f(0.693359375, "float32") + n * f(2.12194440e-4, "float32")
    p = f(1.9875691500e-4, "float32")
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
              5.0000001201e-1):
        p = p * r + f(c, "float32")
    p = p * r * r + r + f(1.0, "float32")
    bits = tirx.shift_left(tirx.Cast("int32", n) + 127, 23)
    return p * tirx.reinterpret("float32", bits)


def attention_ref(q, kt, v, mask, scale, transposed):
    """numpy reference of the kernel."""
    s = np.matmul(q.astype(np.float64), kt.astype(np.float64)) * scale
    if mask is not None:
        s = s + mask
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    out = np.matmul(s / s.sum(axis=-1, keepdims=True), v.astype(np.float64))
    return (out.transpose(0, 2, 1, 3) if transposed else out).astype(np.float32)


def attention_kernel(b: int, h: int, sq: int, sk: int, d: int, e: int, scale: float,
                     mask_shape: tuple | None, transposed: bool, lanes: int = 16,
                     rows: int = 8):
    """PrimFunc (Q, Kt, V[, M], O) of the fused attention (see module doc). `mask_shape` is the
    mask's shape padded to rank 4 (dims 1 or equal to the scores'), None without a mask."""
    from tvm.script import tirx as T

    if sk % lanes or e % lanes:
        raise ValueError(f"Sk={sk} and E={e} must be multiples of {lanes}")
    rows = max(1, min(rows, sq, SCORE_BUFFER_FLOATS // sk))
    tiles, rest = divmod(sq, rows)
    row_tiles = tiles + int(rest > 0)
    vectors_k, vectors_e = sk // lanes, e // lanes
    # Output accumulators per pass over the keys: rows x (up to 2) vectors.
    e_group = 2 if vectors_e % 2 == 0 else 1
    has_mask = mask_shape is not None
    mb, mh, ms, mk = (int(m > 1) for m in (mask_shape or (1, 1, 1, 1)))
    mask_dims = tuple(mask_shape) if has_mask else (1, 1, 1, 1)
    out_shape = (b, sq, h, e) if transposed else (b, h, sq, e)
    scale_c = float(scale)

    @T.macro
    def store_out(o, bi, hi, i, col, value):
        if transposed:
            o[bi, i, hi, col] = value
        else:
            o[bi, hi, i, col] = value

    @T.macro
    def tile(q, kt, v, m, o, bi, hi, i0, tr):
        scores = T.decl_buffer((tr, sk), "float32", scope="local")
        total = T.decl_buffer((tr,), "float32", scope="local")
        # 1. scores = Q Kt * scale (+ mask), one vector of keys at a time
        for kv in range(vectors_k):
            acc = T.decl_buffer((tr, lanes), "float32", scope="local")
            for r in T.unroll(tr):
                for lane in T.vectorized(lanes):
                    acc[r, lane] = T.float32(0)
            for k in range(d):
                for r in T.unroll(tr):
                    for lane in T.vectorized(lanes):
                        acc[r, lane] = acc[r, lane] + q[bi, hi, i0 + r, k] * \
                            kt[bi, hi, k, kv * lanes + lane]
            for r in T.unroll(tr):
                for lane in T.vectorized(lanes):
                    if has_mask:
                        scores[r, kv * lanes + lane] = acc[r, lane] * T.float32(scale_c) + m[
                            bi * mb, hi * mh, (i0 + r) * ms, (kv * lanes + lane) * mk]
                    else:
                        scores[r, kv * lanes + lane] = acc[r, lane] * T.float32(scale_c)
        # 2. softmax numerators in place, row sums kept for the store
        for r in range(tr):
            part = T.decl_buffer((lanes,), "float32", scope="local")
            for lane in T.vectorized(lanes):
                part[lane] = scores[r, lane]
            for kv in range(1, vectors_k):
                for lane in T.vectorized(lanes):
                    part[lane] = T.max(part[lane], scores[r, kv * lanes + lane])
            top = T.decl_buffer((1,), "float32", scope="local")
            top[0] = part[0]
            for lane in range(1, lanes):
                top[0] = T.max(top[0], part[lane])
            for lane in T.vectorized(lanes):
                part[lane] = T.float32(0)
            for kv in range(vectors_k):
                for lane in T.vectorized(lanes):
                    scores[r, kv * lanes + lane] = _fast_exp(
                        scores[r, kv * lanes + lane] - top[0])
                    part[lane] = part[lane] + scores[r, kv * lanes + lane]
            total[r] = T.float32(0)
            for lane in range(lanes):
                total[r] = total[r] + part[lane]
        # 3. O = P V / row sum, rows x e_group vectors of outputs per pass over the keys
        for eg in range(vectors_e // e_group):
            out = T.decl_buffer((tr, e_group, lanes), "float32", scope="local")
            for r in T.unroll(tr):
                for g in T.unroll(e_group):
                    for lane in T.vectorized(lanes):
                        out[r, g, lane] = T.float32(0)
            for j in range(sk):
                for r in T.unroll(tr):
                    for g in T.unroll(e_group):
                        for lane in T.vectorized(lanes):
                            out[r, g, lane] = out[r, g, lane] + scores[r, j] * \
                                v[bi, hi, j, (eg * e_group + g) * lanes + lane]
            for r in T.unroll(tr):
                for g in T.unroll(e_group):
                    for lane in T.vectorized(lanes):
                        store_out(o, bi, hi, i0 + r, (eg * e_group + g) * lanes + lane,
                                  out[r, g, lane] / total[r])

    @T.prim_func
    def attention(Q: T.Buffer((b, h, sq, d), "float32"), Kt: T.Buffer((b, h, d, sk), "float32"),
                  V: T.Buffer((b, h, sk, e), "float32"), M: T.Buffer(mask_dims, "float32"),
                  O: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for chunk in T.parallel(b * h * row_tiles):
            bh = chunk // row_tiles
            t = chunk % row_tiles
            if t < tiles:
                tile(Q, Kt, V, M, O, bh // h, bh % h, t * rows, rows)
            elif rest > 0:
                tile(Q, Kt, V, M, O, bh // h, bh % h, tiles * rows, rest)

    return attention


def emit_attention(ctx, pattern: AttentionPattern, lanes: int):
    """Emit the fused kernel for `pattern`; returns the Relax expression of `pattern.last`'s
    output."""
    from tvm import relax

    (b, h, sq, d), sk, e = ctx.shape(pattern.q), ctx.shape(pattern.kt)[3], ctx.shape(pattern.v)[3]
    mask_shape = None
    args = [ctx.expr(pattern.q), ctx.expr(pattern.kt), ctx.expr(pattern.v)]
    if pattern.mask is not None:
        raw = ctx.shape(pattern.mask)
        mask_shape = (1,) * (4 - len(raw)) + tuple(raw)
        args.append(ctx.emit(relax.op.reshape(ctx.expr(pattern.mask), list(mask_shape))))
    else:
        args.append(relax.const(np.zeros((1, 1, 1, 1), np.float32)))
    func = attention_kernel(b, h, sq, sk, d, e, pattern.scale, mask_shape, pattern.transposed,
                            lanes=lanes)
    gvar = ctx.bb.add_func(func.without_attr("global_symbol"), "attention")
    out_shape = [b, sq, h, e] if pattern.transposed else [b, h, sq, e]
    return relax.call_tir(gvar, args, out_ty=relax.TensorType(out_shape, "float32"))
