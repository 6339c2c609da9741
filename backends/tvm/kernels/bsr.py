"""Block-sparse (BSR) weight x dense activation kernels, written as TVMScript with their schedule.

Convention: the weight is W[N, K] (output x input, as `meta["sparsity"]` states its pattern:
`layout: out_in`). Blocks are R output rows x C input columns. `to_bsr` pads N up to a multiple of
R and K up to a multiple of C and keeps every block with a nonzero:

    data    [nnz_blocks, R, C]  float32 values of the kept blocks, row-block major
    indices [nnz_blocks]        int32 column-block index of each kept block
    indptr  [N/R + 1]           int32 range of `data` rows belonging to each block row

The kernel, `bsr_matmul_kn`, computes Y[b, N, P] = W @ X[b, K, P] (+ bias[N]) (ReLU): activations
are K-major, so the inner loop of every nonzero block reads a contiguous run of X (`tile_p`
columns), broadcasts one weight and accumulates R x tile_p outputs in vector registers; bias and
ReLU are fused into the store. That is the 1x1 Conv layout (NCHW, X[I, H*W]) as it is; a MatMul
Y[M, N] = X[M, K] @ W^T runs on X^T (the dispatcher emits the transposes, which are cheap next to
the product). Threads split the block rows.

Awkward shapes are handled without padding X or Y: a partial last P tile gets its own (narrower)
loop nest, a partial last block row guards its store, and a partial last column block clamps its
X index (the padded weight columns are zero, so they add nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BSR", "to_bsr", "bsr_matmul_kn", "CpuSchedule", "cpu_schedule", "vector_lanes"]


@dataclass(frozen=True)
class BSR:
    """A [N, K] matrix in block-sparse-row form with R x C blocks (see module doc)."""
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]
    block: tuple[int, int]

    @property
    def nnz_blocks(self) -> int:
        return int(self.indices.shape[0])

    @property
    def block_rows(self) -> int:
        return int(self.indptr.shape[0]) - 1

    @property
    def block_density(self) -> float:
        """Fraction of (padded) blocks kept: the fraction of the dense work the kernel does."""
        r, c = self.block
        total = self.block_rows * (-(-self.shape[1] // c))
        return self.nnz_blocks / max(total, 1)

    def to_dense(self) -> np.ndarray:
        r, c = self.block
        n, k = self.shape
        kb = -(-k // c)
        dense = np.zeros((self.block_rows * r, kb * c), dtype=self.data.dtype)
        for row in range(self.block_rows):
            for j in range(self.indptr[row], self.indptr[row + 1]):
                col = int(self.indices[j])
                dense[row * r:(row + 1) * r, col * c:(col + 1) * c] = self.data[j]
        return dense[:n, :k]


def to_bsr(weight: np.ndarray, block: tuple[int, int], dtype=None) -> BSR:
    """Dense W[N, K] -> BSR with R x C blocks (edges zero-padded). A block is kept when any of
    its values is nonzero, so a weight pruned with the same blocks keeps exactly its density."""
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"to_bsr expects a 2-D [N, K] weight, got shape {weight.shape}")
    r, c = (int(block[0]), int(block[1]))
    if r < 1 or c < 1:
        raise ValueError(f"bad block {block}")
    n, k = weight.shape
    nb, kb = -(-n // r), -(-k // c)
    padded = np.zeros((nb * r, kb * c), dtype=dtype or weight.dtype)
    padded[:n, :k] = weight
    tiles = padded.reshape(nb, r, kb, c).transpose(0, 2, 1, 3)       # [nb, kb, r, c]
    keep = np.any(tiles != 0, axis=(2, 3))
    rows, cols = np.nonzero(keep)                                    # row-major: sorted by row
    indptr = np.zeros(nb + 1, dtype=np.int32)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    data = np.ascontiguousarray(tiles[rows, cols])
    if data.shape[0] == 0:
        # A zero-size buffer is awkward for TVM; one all-zero block (in no row) stands in.
        data = np.zeros((1, r, c), dtype=padded.dtype)
        cols = np.zeros(1, dtype=np.int64)
    return BSR(data=data, indices=cols.astype(np.int32), indptr=indptr, shape=(n, k),
               block=(r, c))


# -- CPU schedule parameters -------------------------------------------------------------------
@dataclass(frozen=True)
class CpuSchedule:
    """lanes: float32 vector lanes; registers: vector registers; tile_p: output columns per
    register tile (a multiple of lanes when P allows)."""
    lanes: int
    registers: int
    tile_p: int | None = None

    def tile_for(self, rows_per_block: int, p: int) -> int:
        if self.tile_p:
            return max(1, min(self.tile_p, p))
        # Keep R x vectors accumulators in about half of the registers: the rest hold X vectors
        # and the broadcast weight.
        vectors = max(1, min(4, (self.registers // 2) // max(rows_per_block, 1)))
        return max(1, min(vectors * self.lanes, p))


def vector_lanes(target) -> int:
    """float32 lanes of a TVM target (dict, JSON-able config or tvm.target.Target)."""
    return cpu_schedule(target).lanes


def _target_attrs(target) -> dict:
    if target is None:
        return {"kind": "llvm"}
    if isinstance(target, dict):
        return target
    config = {"kind": target.kind.name}
    for key in ("mcpu", "mtriple", "mattr"):
        if key in target.attrs:
            value = target.attrs[key]
            config[key] = [str(v) for v in value] if key == "mattr" else str(value)
    return config


def cpu_schedule(target) -> CpuSchedule:
    """AVX-512: 16 lanes x 32 registers; AVX2 (the x86 default): 8 x 16; aarch64 NEON:
    4 x 32; 32-bit ARM NEON: 4 x 16."""
    config = _target_attrs(target)
    mattr = " ".join(config.get("mattr", []) or [])
    mcpu = str(config.get("mcpu", ""))
    triple = str(config.get("mtriple", ""))
    if triple.startswith("aarch64") or "cortex-a7" in mcpu and not triple.startswith("arm"):
        return CpuSchedule(lanes=4, registers=32)
    if triple.startswith("arm"):
        return CpuSchedule(lanes=4, registers=16)
    if "avx512" in mattr or any(k in mcpu for k in ("skylake-avx512", "icelake", "sapphire",
                                                     "znver4", "cascadelake")):
        return CpuSchedule(lanes=16, registers=32)
    return CpuSchedule(lanes=8, registers=16)


# -- the kernel ----------------------------------------------------------------------------------
def bsr_matmul_kn(bsr: BSR, batch: int, p: int, *, relu: bool = False,
                  schedule: CpuSchedule | None = None):
    """PrimFunc `(X[batch, K, P], data, indices, indptr, bias[N], Y[batch, N, P])` computing
    Y = W @ X + bias (ReLU) for the BSR weight's sizes (see module doc). The pattern is an
    argument, so one compiled kernel serves every weight with the same sizes; pass zeros as
    bias when there is none (one add per output is noise next to the product)."""
    from tvm.script import tirx as T

    schedule = schedule or CpuSchedule(lanes=8, registers=16)
    dtype = "float32"
    n, k = bsr.shape
    r, c = bsr.block
    nb = bsr.block_rows
    nnzb = int(bsr.data.shape[0])
    tp = schedule.tile_for(r, p)
    tiles, rest = divmod(p, tp)
    ragged_rows = n % r != 0
    ragged_cols = k % c != 0

    # Macro parameters are named apart from the kernel's buffers: TVMScript macros are hygienic
    # (they see their own closure), and a parameter named like a caller variable is refused.
    @T.macro
    def tile(x, w_data, w_indices, w_indptr, w_bias, y, bi, b, p0, width):
        acc = T.decl_buffer((r, width), dtype, scope="local")
        for rr in T.unroll(r):
            for pp in T.vectorized(width):
                acc[rr, pp] = T.float32(0)
        for j in range(w_indptr[bi], w_indptr[bi + 1]):
            for cc in T.unroll(c):
                for rr in T.unroll(r):
                    for pp in T.vectorized(width):
                        if ragged_cols:
                            acc[rr, pp] = acc[rr, pp] + w_data[j, rr, cc] * x[
                                b, T.min(w_indices[j] * c + cc, k - 1), p0 + pp]
                        else:
                            acc[rr, pp] = acc[rr, pp] + w_data[j, rr, cc] * x[
                                b, w_indices[j] * c + cc, p0 + pp]
        for rr in T.unroll(r):
            if not ragged_rows or bi * r + rr < n:
                for pp in T.vectorized(width):
                    if relu:
                        y[b, bi * r + rr, p0 + pp] = T.max(acc[rr, pp] + w_bias[bi * r + rr],
                                                           T.float32(0))
                    else:
                        y[b, bi * r + rr, p0 + pp] = acc[rr, pp] + w_bias[bi * r + rr]

    @T.prim_func
    def bsr_kn(X: T.Buffer((batch, k, p), dtype), data: T.Buffer((nnzb, r, c), dtype),
               indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
               B: T.Buffer((n,), dtype), Y: T.Buffer((batch, n, p), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for b in range(batch):
            for bi in T.parallel(nb):
                for t in range(tiles):
                    tile(X, data, indices, indptr, B, Y, bi, b, t * tp, tp)
                if rest > 0:
                    tile(X, data, indices, indptr, B, Y, bi, b, tiles * tp, rest)

    return bsr_kn
