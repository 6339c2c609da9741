"""Default schedules, so code that was never tuned is usable.

GPU: dlight's rules (matmul, GEMV, reductions, then a fallback that binds threads): without them
CUDA code does not even compile (every loop needs a thread binding).

CPU: TVM's legalized TIR is plain nested loops (one scalar multiply-add at a time). Our rule,
`ParallelVectorize`, gives every compute block the things that matter most:
- the outer spatial loops fused and run in parallel (all cores);
- the innermost spatial loop split by the vector width and moved *inside* the reduction loops,
  then vectorized;
- for reductions with two spatial loops to spare, a register tile: ROWS values of another
  spatial loop (conv: output rows, or output channels when ROWS does not divide the rows;
  matmul: rows of A) times one vector of the innermost (conv: output columns; matmul: columns
  of B), accumulated in a local buffer that LLVM keeps in registers across the whole
  reduction, so each loaded weight or input vector feeds several multiply-adds and the
  accumulators are not stored every step (3x3 conv 64->64 at 56x56: 4-6x faster).
Matmuls (one reduction axis) put the column blocks outside the row blocks, so each K x vector
panel of B is read from memory once and reused by every row block (MiniLM FFN, 128 tokens:
8.0 -> 2.7 ms per layer).
Padding blocks are not inlined into convolutions: the bounds test in the inner loop costs more
than the padded copy. Nor is a computed value its consumers read more than once (it would be
recomputed at every read: round-half-even after GELU evaluated erf ~7 times per element),
unless it is a single operation (a bias add), cheaper to repeat than to store and reload.
"""

from __future__ import annotations

import re

import tvm
from tvm import tirx

__all__ = ["default_schedule_pass", "cpu_default_rule", "ParallelVectorize"]


def _dlight():
    from tvm.s_tir import dlight
    return dlight


def default_schedule_pass(target):
    """An IRModule pass applying the default schedules for `target` (a tvm.target.Target)."""
    dl = _dlight()
    if target.kind.name in ("cuda", "rocm", "vulkan", "opencl", "metal"):
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    return dl.ApplyDefaultSchedule(cpu_default_rule(target))


def cpu_default_rule(target) -> "ParallelVectorize":
    """Our CPU schedule rule with the vector width of `target` (also what tuning measures as
    each task's default schedule)."""
    return ParallelVectorize(_vector_lanes(target))


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
    """Inline producers that only rearrange or map values (reshapes, bias adds into their
    consumer), keeping the reductions as the blocks we schedule. Pads stay separate."""
    for block in blocks[:-1]:
        if _iter_kinds(sch, block).count("R") == 0 and \
                not sch.get(block).name_hint.startswith("pad") and \
                not _inlining_duplicates_work(sch, block):
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001
                try:
                    sch.reverse_compute_inline(block)
                except Exception:  # noqa: BLE001
                    pass


def _inlining_duplicates_work(sch, block) -> bool:
    """True when inlining `block` would compute its value several times per element: its
    consumers read it more than once in all (round-half-even reads its input 4 times) and the
    value is more than a (cast) load. Inlined, MiniLM's int8 GELU + quantize + pack function
    evaluated erf ~7 times per element (128 tokens: 31 ms; 1.1 ms with the fast erf, 0.6 ms
    with this check)."""
    value = _stored_value(sch.get(block).body)
    if value is None or _is_plain_load(value) or _is_one_operation(value):
        return False
    for region in sch.get(block).writes:
        # TVM's Python API has no TIR visitor: count the loads in the consumers' scripts.
        load = re.compile(rf"(?<![\w.]){re.escape(region.source.name)}\[")
        if sum(len(load.findall(sch.get(consumer).body.script()))
               for consumer in sch.get_consumers(block)) > 1:
            return True
    return False


def _stored_value(stmt):
    return stmt.value if isinstance(stmt, tirx.BufferStore) else None


def _is_plain_load(value) -> bool:
    while isinstance(value, tirx.Cast):
        value = value.value
    return isinstance(value, tvm.ir.TensorLoad)


def _is_one_operation(value) -> bool:
    """A single add/subtract/multiply/divide/max/min of loads and constants (a bias add, a
    scale): recomputing it at each read is cheaper than a round trip through memory (MiniLM's
    int8 FFN-up epilogue wrote and re-read two such intermediates of 128 x 1536 floats)."""
    while isinstance(value, tirx.Cast):
        value = value.value
    if not isinstance(value, (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Max, tirx.Min)):
        return False
    return all(_is_plain_load(operand) or isinstance(operand, (tirx.FloatImm, tirx.IntImm))
               for operand in (value.a, value.b))


def _iter_kinds(sch, block) -> list[str]:
    kinds = []
    for iv in sch.get(block).iter_vars:
        kinds.append("R" if iv.iter_type == tirx.IterVar.CommReduce else "S")
    return kinds


def _extent(sch, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


# Rows of the register tile (ROWS x one vector of accumulators: 8 of the 16 AVX2 / 32 NEON
# vector registers), halved when the vector is wider than the hardware's.
ROWS = 8


def _vector_width(extent: int | None, lanes: int) -> int | None:
    """Width of the vectorized tile of a loop of `extent`: the hardware width when it divides,
    the whole loop when short (7, 14: LLVM splits it), else a divisor up to two vectors."""
    if extent is None or extent < 2:
        return None
    if extent % lanes == 0:
        return lanes
    if extent <= 2 * lanes:
        return extent
    return max((d for d in range(2, 2 * lanes + 1) if extent % d == 0), default=None)


def _register_tile(sch, block, spatial, reduce, lanes: int) -> bool:
    """ROWS x vector accumulator tile for a reduction block (see module doc); False when the
    loop extents do not fit it (the caller then uses the single-row schedule)."""
    if not reduce or len(spatial) < 2:
        return False
    width = _vector_width(_extent(sch, spatial[-1]), lanes)
    rows = ROWS if width is not None and width <= lanes else ROWS // 2
    # The innermost other spatial loop that `rows` divides: conv (n, c, h, w) tiles h when it
    # divides (56), else the output channels; matmul (i, j) tiles i.
    row_index = next((i for i in range(len(spatial) - 2, -1, -1)
                      if (_extent(sch, spatial[i]) or 1) % rows == 0), None)
    if width is None or row_index is None:
        return False
    column_outer, column_inner = sch.split(spatial[-1], [None, width])
    row_outer, row_inner = sch.split(spatial[row_index], [None, rows])
    if len(reduce) == 1 and row_index == len(spatial) - 2:
        # Matmul: column blocks outside the row blocks, so the K x vector panel of B stays in
        # cache while every row block of A uses it (B is re-read from memory once, not once
        # per row block: MiniLM's 384x1536 FFN weights are bigger than L2).
        outer = spatial[:row_index] + [column_outer, row_outer]
    else:
        outer = spatial[:row_index] + [row_outer] + spatial[row_index + 1:-1] + [column_outer]
    sch.reorder(*(outer + reduce + [row_inner, column_inner]))
    accumulator = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulator, outer[-1])
    parallel = outer[:-1]
    sch.parallel(sch.fuse(*parallel) if len(parallel) > 1 else parallel[0])
    sch.vectorize(column_inner)
    sch.unroll(row_inner)
    sch.decompose_reduction(block, reduce[0])
    sch.vectorize(sch.get_loops(accumulator)[-1])  # the tile's write-back
    return True


def _schedule_block(sch, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    kinds = _iter_kinds(sch, block)
    if len(loops) != len(kinds) or not loops:
        return
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
    reduce = [loop for loop, kind in zip(loops, kinds) if kind == "R"]
    if not spatial:
        return
    if _register_tile(sch, block, spatial, reduce, lanes):
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
