"""Our dense kernel, in the same schedule style as the BSR kernel (`bsr.bsr_matmul_kn`).

Y[b, N, P] = W[N, K] @ X[b, K, P] + bias (ReLU): threads split row blocks of `rows` outputs, each
P tile keeps rows x tile_p accumulators in registers, one broadcast weight per contiguous X run.
It is the BSR loop nest with every block present and no index loads, so "ours dense vs ours
sparse" measures what sparsity buys, not a difference in code generation quality.
"""

from __future__ import annotations

from .bsr import CpuSchedule

__all__ = ["dense_matmul_kn"]


def dense_matmul_kn(n: int, k: int, batch: int, p: int, *, rows: int = 4, relu: bool = False,
                    schedule: CpuSchedule | None = None):
    """PrimFunc `(X[batch, K, P], W[N, K], bias[N], Y[batch, N, P])`."""
    from tvm.script import tirx as T

    schedule = schedule or CpuSchedule(lanes=8, registers=16)
    r = max(1, min(rows, n))
    nb = -(-n // r)
    tp = schedule.tile_for(r, p)
    tiles, rest = divmod(p, tp)
    ragged_rows = n % r != 0
    dtype = "float32"

    @T.macro
    def tile(x, w, w_bias, y, bi, b, p0, width):
        acc = T.decl_buffer((r, width), dtype, scope="local")
        for rr in T.unroll(r):
            for pp in T.vectorized(width):
                acc[rr, pp] = T.float32(0)
        for kk in range(k):
            for rr in T.unroll(r):
                for pp in T.vectorized(width):
                    if ragged_rows:
                        acc[rr, pp] = acc[rr, pp] + w[T.min(bi * r + rr, n - 1), kk] * x[
                            b, kk, p0 + pp]
                    else:
                        acc[rr, pp] = acc[rr, pp] + w[bi * r + rr, kk] * x[b, kk, p0 + pp]
        for rr in T.unroll(r):
            if not ragged_rows or bi * r + rr < n:
                for pp in T.vectorized(width):
                    if relu:
                        y[b, bi * r + rr, p0 + pp] = T.max(acc[rr, pp] + w_bias[bi * r + rr],
                                                           T.float32(0))
                    else:
                        y[b, bi * r + rr, p0 + pp] = acc[rr, pp] + w_bias[bi * r + rr]

    @T.prim_func
    def dense_kn(X: T.Buffer((batch, k, p), dtype), W: T.Buffer((n, k), dtype),
                 B: T.Buffer((n,), dtype), Y: T.Buffer((batch, n, p), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for b in range(batch):
            for bi in T.parallel(nb):
                for t in range(tiles):
                    tile(X, W, B, Y, bi, b, t * tp, tp)
                if rest > 0:
                    tile(X, W, B, Y, bi, b, tiles * tp, rest)

    return dense_kn
