"""CUDA kernels: the BSR product and the int8 MatMul with `__dp4a` (compile-checked here; no
GPU on the build machine, so neither is measured and the dispatcher picks neither:
`choice.BREAK_EVEN_DENSITY["cuda"]` is 0, and QDQ layers on CUDA take the float path).

The BSR kernel has the CPU kernel's layout, Y[b, N, P] = W @ X[b, K, P] + bias (ReLU), W in
BSR (see bsr.py): one thread block per (block row, P tile), one thread per output column p
holding the block row's R accumulators in registers. Threads of a warp read consecutive
X[k, p] (coalesced); every thread of the block walks the same nonzero blocks, so the weight and
index loads are broadcasts served by the cache.
"""

from __future__ import annotations

from .bsr import BSR

__all__ = ["bsr_matmul_kn_cuda", "int8_matmul_dp4a", "pack_weight_dp4a"]


def bsr_matmul_kn_cuda(bsr: BSR, batch: int, p: int, *, relu: bool = False, threads: int = 64):
    """PrimFunc `(X[batch, K, P], data, indices, indptr, bias[N], Y[batch, N, P])` for CUDA."""
    from tvm.script import tirx as T

    n, k = bsr.shape
    r, c = bsr.block
    nb = bsr.block_rows
    nnzb = int(bsr.data.shape[0])
    threads = max(1, min(threads, p))
    p_tiles = -(-p // threads)
    ragged_cols = k % c != 0
    dtype = "float32"

    @T.prim_func
    def bsr_kn_cuda(X: T.Buffer((batch, k, p), dtype), data: T.Buffer((nnzb, r, c), dtype),
                    indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
                    B: T.Buffer((n,), dtype), Y: T.Buffer((batch, n, p), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for bp in T.thread_binding(batch * p_tiles, thread="blockIdx.y"):
            for bi in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    acc = T.decl_buffer((r,), dtype, scope="local")
                    b = bp // p_tiles
                    col = (bp % p_tiles) * threads + tx
                    if col < p:
                        for rr in T.unroll(r):
                            acc[rr] = T.float32(0)
                        for j in range(indptr[bi], indptr[bi + 1]):
                            for cc in T.unroll(c):
                                for rr in T.unroll(r):
                                    if ragged_cols:
                                        acc[rr] = acc[rr] + data[j, rr, cc] * X[
                                            b, T.min(indices[j] * c + cc, k - 1), col]
                                    else:
                                        acc[rr] = acc[rr] + data[j, rr, cc] * X[
                                            b, indices[j] * c + cc, col]
                        for rr in T.unroll(r):
                            if bi * r + rr < n:
                                if relu:
                                    Y[b, bi * r + rr, col] = T.max(acc[rr] + B[bi * r + rr],
                                                                   T.float32(0))
                                else:
                                    Y[b, bi * r + rr, col] = acc[rr] + B[bi * r + rr]

    return bsr_kn_cuda


def pack_weight_dp4a(weight):
    """W int8 [N, K] (K % 4 == 0) -> int32 [K/4, N]: each int32 holds W[n, 4q : 4q + 4], and
    threads with consecutive n read consecutive words (coalesced)."""
    import numpy as np

    n, k = weight.shape
    if k % 4:
        raise ValueError(f"K={k} must be a multiple of 4")
    quads = np.ascontiguousarray(np.asarray(weight, np.int8)).view(np.int32)   # [N, K/4]
    return np.ascontiguousarray(quads.T)


def int8_matmul_dp4a(m: int, k: int, n: int, *, relu: bool = False, rows: int = 4,
                     threads: int = 64):
    """PrimFunc `(X int8 [M, K], Wt int32 [K/4, N], B int32 [N], S f32 [N], F f32 [N],
    Y f32 [M, N])` for CUDA: Y = float32(X @ W^T + B) * S + F (ReLU), the dequantizing store of
    vnni.py, with `__dp4a` (4 int8 products summed into an int32 per instruction, sm_61+).

    One thread per output column n and `rows` rows of X (register accumulators); the X words
    are the same for every thread of a block (broadcast loads), the weight words coalesced.
    Compile-checked here (no GPU on the build machine): the dispatcher does not route to it."""
    from tvm.script import tirx as T

    if k % 4:
        raise ValueError(f"K={k} must be a multiple of 4")
    quads = k // 4
    threads = max(1, min(threads, n))
    rows = max(1, min(rows, m))
    col_tiles = -(-n // threads)
    row_tiles = -(-m // rows)

    @T.prim_func
    def int8_dp4a(X: T.Buffer((m, k), "int8"), Wt: T.Buffer((quads, n), "int32"),
                  B: T.Buffer((n,), "int32"), S: T.Buffer((n,), "float32"),
                  F: T.Buffer((n,), "float32"), Y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        X32 = T.decl_buffer((m, quads), "int32", data=X.data)
        for bm in T.thread_binding(row_tiles, thread="blockIdx.y"):
            for bn in T.thread_binding(col_tiles, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    acc = T.decl_buffer((rows,), "int32", scope="local")
                    if bn * threads + tx < n:
                        for i in T.unroll(rows):
                            acc[i] = 0
                        for q in range(quads):
                            for i in T.unroll(rows):
                                if bm * rows + i < m:
                                    acc[i] = T.call_pure_extern(
                                        "int32", "__dp4a", X32[bm * rows + i, q],
                                        Wt[q, bn * threads + tx], acc[i])
                        for i in T.unroll(rows):
                            if bm * rows + i < m:
                                if relu:
                                    Y[bm * rows + i, bn * threads + tx] = T.max(
                                        T.Cast("float32", acc[i] + B[bn * threads + tx])
                                        * S[bn * threads + tx] + F[bn * threads + tx],
                                        T.float32(0))
                                else:
                                    Y[bm * rows + i, bn * threads + tx] = \
                                        T.Cast("float32", acc[i] + B[bn * threads + tx]) \
                                        * S[bn * threads + tx] + F[bn * threads + tx]

    return int8_dp4a
