"""Default schedules, so code that was never tuned is usable.

GPU: dlight's rules (matmul, GEMV, reductions, then a fallback that binds threads): without them
CUDA code does not even compile (every loop needs a thread binding).

CPU: TVM's legalized TIR is plain nested loops (one scalar multiply-add at a time). Our rule,
`ParallelVectorize`, gives every compute block the two things that matter most:
- the outer spatial loops fused and run in parallel (all cores);
- the innermost spatial loop split by the vector width and moved *inside* the reduction loops,
  then vectorized: for conv (n, c, h, w, rc, rh, rw) this computes a row of `w` outputs per weight
  broadcast, for matmul (i, j, k) a row of `j` outputs per A[i, k]; the accumulators stay in
  registers across the reduction.
dlight's CPU GEMV/Reduction rules handle matrix-vector and reduction blocks first.
"""

from __future__ import annotations

import tvm
from tvm import tirx

__all__ = ["default_schedule_pass", "ParallelVectorize"]


def _dlight():
    from tvm.s_tir import dlight
    return dlight


def default_schedule_pass(target):
    """An IRModule pass applying the default schedules for `target` (a tvm.target.Target)."""
    dl = _dlight()
    if target.kind.name in ("cuda", "rocm", "vulkan", "opencl", "metal"):
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    return dl.ApplyDefaultSchedule(ParallelVectorize(_vector_lanes(target)))


def _vector_lanes(target) -> int:
    """float32 lanes worth unrolling for: 16 on AVX-512, 8 on AVX2, 4 on NEON / SSE."""
    features = " ".join(str(a) for a in target.attrs.get("mattr", []))
    mcpu = str(target.attrs.get("mcpu", ""))
    if "avx512" in features or "skylake-avx512" in mcpu or "sapphirerapids" in mcpu \
            or "icelake" in mcpu or "znver4" in mcpu:
        return 16
    if str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm")) or "cortex" in mcpu:
        return 4
    return 8


class ParallelVectorize(_dlight().ScheduleRule):
    """Parallel outer loops + vectorized innermost spatial loop (see module doc)."""

    def __init__(self, lanes: int = 8):
        self.lanes = lanes

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = tvm.s_tir.Schedule(func)
        try:
            blocks = _compute_blocks(sch)
            _inline_elementwise(sch, blocks)
            for block in _compute_blocks(sch):
                _schedule_block(sch, block, self.lanes)
        except Exception:  # noqa: BLE001 - a block we cannot handle stays as it was
            return None
        return sch


def _compute_blocks(sch):
    root = sch.get_sblock("root") if _has_root(sch) else None
    return list(sch.get_child_blocks(root)) if root is not None else []


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def _inline_elementwise(sch, blocks):
    """Inline producers that only rearrange or map values (pads, bias adds feeding a conv's
    consumer), keeping the reductions as the blocks we schedule."""
    for block in blocks[:-1]:
        if _iter_kinds(sch, block).count("R") == 0:
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001
                try:
                    sch.reverse_compute_inline(block)
                except Exception:  # noqa: BLE001
                    pass


def _iter_kinds(sch, block) -> list[str]:
    kinds = []
    for iv in sch.get(block).iter_vars:
        kinds.append("R" if iv.iter_type == tirx.IterVar.CommReduce else "S")
    return kinds


def _extent(sch, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _schedule_block(sch, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    kinds = _iter_kinds(sch, block)
    if len(loops) != len(kinds) or not loops:
        return
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
    reduce = [loop for loop, kind in zip(loops, kinds) if kind == "R"]
    if not spatial:
        return
    inner = spatial[-1]
    inner_extent = _extent(sch, inner)
    vector = None
    if inner_extent is not None and inner_extent >= lanes and inner_extent % lanes == 0:
        outer_inner, vector = sch.split(inner, [None, lanes])
        spatial = spatial[:-1] + [outer_inner]
    elif inner_extent is not None and inner_extent > 1 and inner_extent <= 4 * lanes:
        vector = inner
        spatial = spatial[:-1]
    if reduce:
        tail = [vector] if vector is not None else []
        sch.reorder(*(spatial + reduce + tail))
    outer = [loop for loop in spatial[:-1] if _extent(sch, loop) is not None] \
        if len(spatial) > 1 else list(spatial)
    if outer:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)
    if vector is not None:
        # Vectorize while the block is still a whole reduction (TVM refuses it on the bare
        # update block); decomposing afterwards gives the init its own vectorized loop.
        sch.vectorize(vector)
        if reduce:
            sch.decompose_reduction(block, reduce[0])
