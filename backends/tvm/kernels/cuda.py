"""BSR kernel for CUDA (compile-checked here; no GPU on the build machine, so it is not yet
measured and the dispatcher does not pick it: `choice.BREAK_EVEN_DENSITY["cuda"]` is 0).

Same layout as the CPU kernel, Y[b, N, P] = W @ X[b, K, P] + bias (ReLU), W in BSR (see bsr.py):
one thread block per (block row, P tile), one thread per output column p holding the block
row's R accumulators in registers. Threads of a warp read consecutive X[k, p] (coalesced); every
thread of the block walks the same nonzero blocks, so the weight and index loads are broadcasts
served by the cache.
"""

from __future__ import annotations

from .bsr import BSR

__all__ = ["bsr_matmul_kn_cuda"]


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
