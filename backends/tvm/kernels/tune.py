"""Tuning hook for our BSR kernel: search the schedule knobs with the weight's real pattern.

MetaSchedule does not fit our kernels (`ell.py` is the MetaSchedule-tunable form of the same
product, lower_model's `tunable_kernels=True`): they are written already scheduled (no sblocks
to transform, `tirx.is_scheduled`), their nnz loop has a data-dependent extent, and its runners
call kernels with random arguments, i.e. garbage `indptr`/`indices` (out-of-bounds reads). So the
knobs that matter - the P tile (accumulator columns per register tile) and, for the dense
kernel, the rows per tile - are searched here instead, timing the compiled kernel on the actual
BSR arrays. `tune_bsr` returns the best `CpuSchedule` and the timings; pass it to
`bsr_matmul_kn(schedule=...)`. Runs on the machine it is called on (host targets only; tuning
for a board would time over RPC, not written).
"""

from __future__ import annotations

import numpy as np

from .bsr import BSR, CpuSchedule, bsr_matmul_kn, cpu_schedule

__all__ = ["tune_bsr", "tile_candidates"]


def tile_candidates(schedule: CpuSchedule, rows_per_block: int, p: int) -> list[int]:
    """1..4 vectors of lanes, plus the default rule's choice, capped at P."""
    tiles = {min(v * schedule.lanes, p) for v in (1, 2, 3, 4)}
    tiles.add(schedule.tile_for(rows_per_block, p))
    return sorted(t for t in tiles if t >= 1)


def tune_bsr(bsr: BSR, batch: int, p: int, target=None, *, relu: bool = False,
             number: int = 10, repeat: int = 3) -> tuple[CpuSchedule, dict[int, float]]:
    """(best schedule, {tile_p: best seconds}) for this weight on this machine."""
    import tvm

    config = target if isinstance(target, dict) else {"kind": "llvm"}
    base = cpu_schedule(config)
    rng = np.random.default_rng(0)
    n, k = bsr.shape
    x = rng.standard_normal((batch, k, p)).astype(np.float32)
    args = [x, bsr.data.astype(np.float32), bsr.indices, bsr.indptr, np.zeros(n, np.float32),
            np.zeros((batch, n, p), np.float32)]
    timings: dict[int, float] = {}
    for tile in tile_candidates(base, bsr.block[0], p):
        schedule = CpuSchedule(base.lanes, base.registers, tile)
        func = bsr_matmul_kn(bsr, batch, p, relu=relu, schedule=schedule)
        lib = tvm.compile(tvm.IRModule({"main": func}), tvm.target.Target(config))
        tensors = [tvm.runtime.tensor(a) for a in args]
        evaluator = lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)
        timings[tile] = float(min(evaluator(*tensors).results))
    best = min(timings, key=timings.get)
    return CpuSchedule(base.lanes, base.registers, best), timings
