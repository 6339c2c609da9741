"""The BSR product as schedulable TIR, so MetaSchedule can tune it: blocked-ELL.

Our BSR kernel (`bsr.py`) is written already scheduled and its nnz loop runs from indptr[i] to
indptr[i+1]: a data-dependent extent, which MetaSchedule cannot tile, and a pattern its runners
would fill with random numbers. Here every block row is padded to the same number of block
slots L = the most blocks any row keeps (padding slots: zero data, column block 0), so

    Y[b, n, q] = sum_{l < L, cc < C} data[n // R, l, n % R, cc] * X[b, col(n // R, l) * C + cc, q]
                 (+ bias[n]) (ReLU)

has constant loop extents everywhere: one reduction block (over l, cc) plus an elementwise
epilogue, which MetaSchedule's CPU rules tile, vectorize, parallelize and fuse. The column
block is read from `indices[nb, L]` modulo the number of column blocks: the identity on a real
pattern, and on a tuner's random argument fill it gives in-bounds, uniformly scattered columns,
i.e. the memory behaviour of a random sparse pattern (so whole-model tuning, whose runner
cannot know the pattern, times something close to the truth); `tune_ell` times the real
pattern. The cost: rows
with fewer blocks than L do padded work (`ELL.padding`, the extra fraction of multiply-adds).
Untuned, the kernel gets the default CPU schedule (`backends.tvm.schedule`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bsr import BSR

__all__ = ["ELL", "to_ell", "ell_matmul_te", "ell_matmul_kn", "tune_ell"]


@dataclass(frozen=True)
class ELL:
    """Blocked-ELL form of a [N, K] matrix: data [N/R, L, R, C], indices [N/R, L] int32."""
    data: np.ndarray
    indices: np.ndarray
    shape: tuple[int, int]
    block: tuple[int, int]

    @property
    def slots(self) -> int:
        return int(self.indices.shape[1])

    @property
    def padding(self) -> float:
        """Padded slots / kept blocks - 1: the work ELL does beyond BSR."""
        kept = int(np.count_nonzero(np.any(self.data != 0, axis=(2, 3))))
        return self.data.shape[0] * self.slots / max(kept, 1) - 1.0


def to_ell(bsr: BSR) -> ELL:
    """Pad each block row of `bsr` to the longest row's block count (at least 1)."""
    counts = np.diff(bsr.indptr)
    slots = max(int(counts.max(initial=0)), 1)
    nb = bsr.block_rows
    r, c = bsr.block
    data = np.zeros((nb, slots, r, c), bsr.data.dtype)
    indices = np.zeros((nb, slots), np.int32)
    for row in range(nb):
        start, end = int(bsr.indptr[row]), int(bsr.indptr[row + 1])
        data[row, :end - start] = bsr.data[start:end]
        indices[row, :end - start] = bsr.indices[start:end]
    return ELL(data, indices, bsr.shape, bsr.block)


def ell_matmul_te(x, data, indices, bias, shape: tuple[int, int], block: tuple[int, int],
                  relu: bool = False):
    """TE compute of Y[b, N, P] (see module doc) from te.Tensors x[b, K, P], data, indices,
    bias[N]."""
    from tvm import te, tirx

    n, k = shape
    r, c = block
    batch, _, p = (int(d) for d in x.shape)
    nb, slots = (int(d) for d in indices.shape)
    column_blocks = -(-k // c)
    slot = te.reduce_axis((0, slots), name="slot")
    cc = te.reduce_axis((0, c), name="cc")

    def column(row, s):
        block_col = tirx.floormod(indices[row, s], column_blocks)
        col = block_col * c + cc
        return tirx.min(col, k - 1) if k % c else col

    product = te.compute(
        (batch, n, p),
        lambda b, i, q: te.sum(data[i // r, slot, i % r, cc] * x[b, column(i // r, slot), q],
                               axis=[slot, cc]), name="ell_product")

    def store(b, i, q):
        value = product[b, i, q] + bias[i]
        return tirx.max(value, tirx.const(0, x.dtype)) if relu else value

    return te.compute((batch, n, p), store, name="ell_store")


def ell_matmul_kn(ell: ELL, batch: int, p: int, *, relu: bool = False, dtype="float32"):
    """PrimFunc `(X[batch, K, P], data, indices, bias[N], Y[batch, N, P])`, not scheduled."""
    from tvm import te

    n, k = ell.shape
    r, c = ell.block
    nb = ell.data.shape[0]
    x = te.placeholder((batch, k, p), dtype, name="X")
    data = te.placeholder((nb, ell.slots, r, c), dtype, name="data")
    indices = te.placeholder((nb, ell.slots), "int32", name="indices")
    bias = te.placeholder((n,), dtype, name="B")
    y = ell_matmul_te(x, data, indices, bias, ell.shape, ell.block, relu)
    return te.create_prim_func([x, data, indices, bias, y]).with_attr("tirx.noalias", True)


def _real_arguments(arrays):
    """A MetaSchedule `f_alloc_argument` giving the kernel its real pattern (cloudpickled into
    the runner's worker, so it imports what it needs itself)."""
    def alloc(device, args_info, alloc_repeat):
        import tvm
        return [[tvm.runtime.tensor(a, device) for a in arrays] for _ in range(alloc_repeat)]
    return alloc


def _with_num_cores(target):
    """MetaSchedule needs the core count in the target; the host's when it is not given."""
    import os

    import tvm
    if isinstance(target, tvm.target.Target):
        if "num-cores" in target.attrs:
            return target
        config = dict(target.export())
    else:
        config = dict(target)
    config.setdefault("num-cores", os.cpu_count() or 1)
    return tvm.target.Target(config)


def tune_ell(func, target, work_dir: str, trials: int, arrays=None, *, seed: int = 0,
             timeout_s: float = 300.0):
    """Tune the ELL PrimFunc with MetaSchedule (`trials` measured candidates, database in
    `work_dir`); returns the scheduled IRModule, or None when no candidate built and ran.
    `arrays` (X, data, indices, bias, Y as numpy) makes the runner time the real pattern."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    target = _with_num_cores(target)
    # Generous timeouts: a worker that imports TVM on a loaded machine needs tens of seconds.
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=timeout_s)
    alloc = None if arrays is None else \
        _real_arguments([np.ascontiguousarray(a) for a in arrays])
    runner = ms.runner.LocalRunner(timeout_sec=timeout_s, f_alloc_argument=alloc,
                                   evaluator_config=ms.runner.EvaluatorConfig(number=3,
                                                                              repeat=1))
    mod = tvm.IRModule({"main": func})
    database = ms.tir_integration.tune_tir(
        mod, target, work_dir, max_trials_global=trials, num_trials_per_iter=min(trials, 16),
        builder=builder, runner=runner, seed=seed, num_tuning_cores=1)
    schedule = ms.tir_integration.compile_tir(database, mod, target)
    return None if schedule is None else schedule.mod
