"""Dense int8 MatMul for x86 AVX-512 VNNI (`vpdpbusd`), activations in their natural row layout.

    Y[m, n] = float32(sum_k X[m, k] * W[n, k] + B[n]) * S[n] + F[n]     (ReLU optional)
    X uint8 [M, K] (token rows, as the graph has them), W int8 [N, K], Y float32 [M, N]

`vpdpbusd` multiplies 4 adjacent unsigned bytes by 4 signed bytes and adds the 4 products to an
int32 lane, 16 lanes per instruction, exactly (no saturation). The kernel broadcasts one quad of a
token's activations (read as one int32) against a vector holding the same k-quad of 16 output
channels, so the weight is packed at compile time as Wp[N/16, K/4, 16 * 4] and neither X nor Y is
transposed (the K-major kernels in int8.py need X^T and give Y^T, two extra passes over the
activations per layer). B folds the activation zero point (-zx * row sums of W), S = sx * sw[n],
F the float bias: the store dequantizes, so every consumer stays float as in the QDQ graph.

Register tile: `rows` tokens x `col_vectors` vectors of 16 outputs, int32 accumulators
(6 x 4 = 24 of the 32 zmm registers, plus 4 weight vectors and one broadcast). Threads split
(column group, row tile) pairs, column group outer so neighbours share the weight panel. Partial
row tiles get their own loop nest; N is padded to whole vectors with zero weights and the store
skips the padding.

`int8_batch_matmul_vnni` is the same loop nest with a batch index and one W (and B) per batch:
the product of two activations (attention's scores and probabilities x values, qdq_pair.py packs
the second one at run time). Measured on Zen 4, 1 thread: ~180 G MAC/s at K = 384 but ~58 at
MiniLM's scores shape (12 x [128, 32] x [32, 128]): with 8 quads per tile the per-tile work
around the inner products dominates (neither the epilogue nor the stores are the cost: removing
them changed nothing).
"""

from __future__ import annotations

import numpy as np

__all__ = ["LANES", "has_vnni", "pack_weight_vnni", "int8_matmul_vnni", "int8_batch_matmul_vnni",
           "int8_matmul_ref"]

LANES = 16          # int32 lanes of a zmm register
QUAD = 4            # bytes per lane product


def has_vnni(target) -> bool:
    """Whether an x86 LLVM target has AVX-512 VNNI (from its -mcpu / -mattr, as LLVM sees it)."""
    import tvm
    from tvm.target import codegen

    if target is None:
        return False
    try:
        target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    except Exception:
        return False
    if target.kind.name != "llvm" or "mtriple" in target.attrs and \
            str(target.attrs["mtriple"]).startswith(("aarch64", "arm")):
        return False
    return bool(codegen.target_has_features("avx512vnni", target))


def pack_weight_vnni(weight: np.ndarray) -> np.ndarray:
    """W int8 [N, K] (K % 4 == 0) -> Wp int8 [ceil(N/16), K/4, 64]:
    Wp[v, q, 4 * lane + j] = W[16 * v + lane, 4 * q + j] (zero past N)."""
    n, k = weight.shape
    if k % QUAD:
        raise ValueError(f"K={k} must be a multiple of {QUAD}")
    vectors = -(-n // LANES)
    padded = np.zeros((vectors * LANES, k), np.int8)
    padded[:n] = weight
    return np.ascontiguousarray(
        padded.reshape(vectors, LANES, k // QUAD, QUAD).transpose(0, 2, 1, 3)
        .reshape(vectors, k // QUAD, LANES * QUAD))


def int8_matmul_ref(x: np.ndarray, weight: np.ndarray, b: np.ndarray, s: np.ndarray,
                    f: np.ndarray, relu: bool = False) -> np.ndarray:
    """numpy reference of the kernel (x uint8 [M, K], weight int8 [N, K])."""
    acc = x.astype(np.int64) @ weight.astype(np.int64).T + b.astype(np.int64)[None]
    y = acc.astype(np.float32) * s[None] + f[None]
    return np.maximum(y, 0) if relu else y


def int8_matmul_vnni(m: int, k: int, n: int, relu: bool = False, rows: int = 6,
                     col_vectors: int = 4):
    """PrimFunc (X uint8 [M, K], Wp int8 [N/16, K/4, 64], B int32 [N], S float32 [N],
    F float32 [N], Y float32 [M, N]); see the module doc. K must be a multiple of 4."""
    return _vnni_func(1, m, k, n, relu, rows, col_vectors, batched=False)


def int8_batch_matmul_vnni(batch: int, m: int, k: int, n: int, rows: int = 6,
                           col_vectors: int = 4):
    """The same product with a second operand per batch, for two activations (attention):
    PrimFunc (X uint8 [batch, M, K], Wp int8 [batch, N/16, K/4, 64], B int32 [batch, N],
    S float32 [N], F float32 [N], Y float32 [batch, M, N]); Wp and B are made at run time
    (see qdq_pair.py). Threads split (batch, column group, row tile) triples."""
    return _vnni_func(batch, m, k, n, False, rows, col_vectors, batched=True)


def _vnni_func(batch: int, m: int, k: int, n: int, relu: bool, rows: int, col_vectors: int,
               batched: bool):
    """Both kernels: the loop nest always has a batch index; the 2-D one views its buffers
    with a batch of 1 (one weight shared by every row)."""
    from tvm.script import tirx as T

    if k % QUAD:
        raise ValueError(f"K={k} must be a multiple of {QUAD}")
    quads = k // QUAD
    vectors = -(-n // LANES)
    rows = max(1, min(rows, m))
    col_vectors = max(1, min(col_vectors, vectors))
    row_tiles, row_rest = divmod(m, rows)
    col_groups, col_rest = divmod(vectors, col_vectors)
    groups = col_groups + (1 if col_rest else 0)
    tiles = row_tiles + (1 if row_rest else 0)

    @T.macro
    def store(acc, bias_q, scale, bias_f, y, b, i, j, lane, m0, v0):
        # The channel index is written out in full: bound to a name first (a Let inside the
        # vectorized lane loop) it produced wrong stores with TVM 0.27.
        if relu:
            y[b, m0 + i, (v0 + j) * LANES + lane] = T.max(
                T.Cast("float32", acc[i, j, lane] + bias_q[b, (v0 + j) * LANES + lane])
                * scale[(v0 + j) * LANES + lane] + bias_f[(v0 + j) * LANES + lane], T.float32(0))
        else:
            y[b, m0 + i, (v0 + j) * LANES + lane] = \
                T.Cast("float32", acc[i, j, lane] + bias_q[b, (v0 + j) * LANES + lane]) \
                * scale[(v0 + j) * LANES + lane] + bias_f[(v0 + j) * LANES + lane]

    @T.macro
    def tile(x32, wp, bias_q, scale, bias_f, y, b, m0, v0, tm, tv):
        acc = T.decl_buffer((tm, tv, LANES), "int32", scope="local")
        for i in T.unroll(tm):
            for j in T.unroll(tv):
                for lane in T.vectorized(LANES):
                    acc[i, j, lane] = 0
        for q in range(quads):
            for i in T.unroll(tm):
                for j in T.unroll(tv):
                    acc[i, j, T.ramp(0, 1, LANES)] = T.call_llvm_pure_intrin(
                        "int32x16", "llvm.x86.avx512.vpdpbusd.512",
                        acc[i, j, T.ramp(0, 1, LANES)],
                        T.reinterpret("int8x64", T.broadcast(x32[b, m0 + i, q], LANES)),
                        wp[b, v0 + j, q, T.ramp(0, 1, LANES * QUAD)])
        for i in T.unroll(tm):
            for j in T.unroll(tv):
                if (v0 + j + 1) * LANES <= n:
                    for lane in T.vectorized(LANES):
                        store(acc, bias_q, scale, bias_f, y, b, i, j, lane, m0, v0)
                else:
                    for lane in range(LANES):
                        if (v0 + j) * LANES + lane < n:
                            store(acc, bias_q, scale, bias_f, y, b, i, j, lane, m0, v0)

    @T.macro
    def body(x32, wp, bias_q, scale, bias_f, y):
        for chunk in T.parallel(batch * groups * tiles):
            b = chunk // (groups * tiles)
            g = chunk // tiles % groups
            t = chunk % tiles
            if g < col_groups:
                if t < row_tiles:
                    tile(x32, wp, bias_q, scale, bias_f, y, b, t * rows, g * col_vectors, rows,
                         col_vectors)
                elif row_rest > 0:
                    tile(x32, wp, bias_q, scale, bias_f, y, b, row_tiles * rows,
                         g * col_vectors, row_rest, col_vectors)
            elif col_rest > 0:
                if t < row_tiles:
                    tile(x32, wp, bias_q, scale, bias_f, y, b, t * rows,
                         col_groups * col_vectors, rows, col_rest)
                elif row_rest > 0:
                    tile(x32, wp, bias_q, scale, bias_f, y, b, row_tiles * rows,
                         col_groups * col_vectors, row_rest, col_rest)

    if batched:
        @T.prim_func
        def int8_vnni_batch(X: T.Buffer((batch, m, k), "uint8"),
                            Wp: T.Buffer((batch, vectors, quads, LANES * QUAD), "int8"),
                            B: T.Buffer((batch, n), "int32"), S: T.Buffer((n,), "float32"),
                            F: T.Buffer((n,), "float32"), Y: T.Buffer((batch, m, n), "float32")):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            X32 = T.decl_buffer((batch, m, quads), "int32", data=X.data)
            body(X32, Wp, B, S, F, Y)

        return int8_vnni_batch

    @T.prim_func
    def int8_vnni(X: T.Buffer((m, k), "uint8"), Wp: T.Buffer((vectors, quads, LANES * QUAD), "int8"),
                  B: T.Buffer((n,), "int32"), S: T.Buffer((n,), "float32"),
                  F: T.Buffer((n,), "float32"), Y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        X32 = T.decl_buffer((1, m, quads), "int32", data=X.data)
        Wp1 = T.decl_buffer((1, vectors, quads, LANES * QUAD), "int8", data=Wp.data)
        B1 = T.decl_buffer((1, n), "int32", data=B.data)
        Y1 = T.decl_buffer((1, m, n), "float32", data=Y.data)
        body(X32, Wp1, B1, S, F, Y1)

    return int8_vnni
