"""Vectorizable float32 softmax and erf for the CPU lowering.

LLVM has no vector form of `exp` or `erf` on x86: TVM's `exp`/`erf` become one libm call per
element (measured here, 196k float32 values, 1 thread: erf 5.8 ms, exp 0.6 ms), and GELU's erf
made MiniLM's FFN-up layer 3x slower than its matmul. TOPI's `fast_exp` / `fast_erf` are
polynomials LLVM vectorizes (0.04-0.05 ms on the same values; relative error <= 3.4e-7, exact at
0, +-inf and for saturated inputs).

Softmax as Relax legalizes it also computes exp twice per element and reduces each row with the
rows in the vector lanes (strided loads); so does LayerNorm (and its schedule ran on one thread:
the only spatial loop left outside the reductions was the batch of 1). `layer_norm_rows` is the
same kind of row kernel: mean, then variance of the centred row, then the affine store. `softmax_rows` is one pass per row instead, pre-scheduled:
rows in parallel; a lane-wise partial max and sum over contiguous vectors; one exp per element,
stored once and scaled by 1 / sum.
"""

from __future__ import annotations

__all__ = ["fast_erf_te", "gelu_erf_te", "softmax_rows", "softmax_lanes", "layer_norm_rows"]


def fast_erf_te(x):
    """erf(x) for a TE tensor: TOPI's polynomial for float32, the exact op otherwise."""
    from tvm import topi
    return topi.fast_erf(x) if str(x.dtype) == "float32" else topi.erf(x)


def gelu_erf_te(x):
    """GELU, 0.5 x (1 + erf(x / sqrt 2)), with `fast_erf_te`."""
    from tvm import te, topi
    dtype = str(x.dtype)
    scaled = te.compute(x.shape, lambda *i: x(*i) * te.const(0.7071067811865476, dtype),
                        name="gelu_scaled")
    erf = fast_erf_te(scaled) if dtype == "float32" else topi.erf(scaled)
    return te.compute(x.shape, lambda *i: x(*i) * te.const(0.5, dtype)
                      * (te.const(1.0, dtype) + erf(*i)), name="gelu")


def softmax_lanes(columns: int, lanes: int = 16) -> int:
    """Lanes of the partial max/sum: the largest power of two up to `lanes` dividing the row
    into at least two vectors (1: plain scalar reductions)."""
    width = 1
    while width * 2 <= lanes and columns % (width * 2) == 0 and columns // (width * 2) >= 2:
        width *= 2
    return width


def softmax_rows(rows: int, columns: int, dtype: str = "float32", lanes: int = 16):
    """A scheduled PrimFunc (x[rows, columns]) -> y, softmax over each row (see module doc)."""
    import tvm
    from tvm import te, topi

    width = softmax_lanes(columns, lanes)
    chunks = columns // width
    x = te.placeholder((rows, columns), dtype, name="x")
    ko = te.reduce_axis((0, chunks), name="ko")
    part_max = te.compute((rows, width), lambda r, lane: te.max(x[r, ko * width + lane], axis=ko),
                          name="part_max")
    lane_axis = te.reduce_axis((0, width), name="lane")
    row_max = te.compute((rows,), lambda r: te.max(part_max[r, lane_axis], axis=lane_axis),
                         name="row_max")
    shifted = te.compute((rows, columns), lambda r, k: x[r, k] - row_max[r], name="shifted")
    exps = topi.fast_exp(shifted) if dtype == "float32" else topi.exp(shifted)
    ko2 = te.reduce_axis((0, chunks), name="ko2")
    part_sum = te.compute((rows, width), lambda r, lane: te.sum(exps[r, ko2 * width + lane],
                                                                axis=ko2), name="part_sum")
    lane_axis2 = te.reduce_axis((0, width), name="lane2")
    row_sum = te.compute((rows,), lambda r: te.sum(part_sum[r, lane_axis2], axis=lane_axis2),
                         name="row_sum")
    inverse = te.compute((rows,), lambda r: te.const(1.0, dtype) / row_sum[r], name="inverse")
    y = te.compute((rows, columns), lambda r, k: exps[r, k] * inverse[r], name="softmax")
    func = te.create_prim_func([x, y])

    sch = tvm.s_tir.Schedule(func)
    out = sch.get_sblock("softmax")
    row, column = sch.get_loops(out)
    _, column_inner = sch.split(column, [None, width])
    sch.vectorize(column_inner)
    # Everything a row needs is computed under the row loop, so it stays in L1.
    sch.compute_inline(sch.get_sblock("shifted"))
    for name in ("inverse", "row_sum", "part_sum", sch.get(_exp_block(sch)).name_hint,
                 "row_max", "part_max"):
        sch.compute_at(sch.get_sblock(name), row)
    sch.parallel(row)  # before decompose_reduction: TVM checks the reductions are whole
    exp_loops = sch.get_loops(_exp_block(sch))
    if len(exp_loops) > 1:  # a row of 1 has no column loop left
        _, exp_inner = sch.split(exp_loops[-1], [None, width])
        sch.vectorize(exp_inner)
    for name in ("part_max", "part_sum") if width > 1 else ():
        block = sch.get_sblock(name)
        lane, chunk = sch.get_loops(block)[-2:]
        sch.reorder(chunk, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(block, chunk)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("tirx.noalias", True)


def _exp_block(sch):
    """The block TOPI's exp created (its name differs between fast_exp and exp)."""
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root):
        name = sch.get(block).name_hint
        if name not in ("part_max", "row_max", "part_sum", "row_sum", "inverse", "softmax",
                        "shifted"):
            return block
    raise RuntimeError("softmax: no exp block")


def layer_norm_rows(rows: int, columns: int, epsilon: float, dtype: str = "float32",
                    lanes: int = 16):
    """A scheduled PrimFunc (x[rows, columns], gamma[columns], beta[columns]) -> y, LayerNorm
    over each row: rows in parallel, lane-wise partial sums over contiguous vectors, the
    variance from the centred values (two passes over a row that is in L1 by then)."""
    from tvm.script import tirx as T

    width = softmax_lanes(columns, lanes)
    chunks = columns // width
    inverse_n = 1.0 / columns

    @T.prim_func
    def layer_norm_rows_func(X: T.Buffer((rows, columns), dtype),
                             G: T.Buffer((columns,), dtype), B: T.Buffer((columns,), dtype),
                             Y: T.Buffer((rows, columns), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for r in T.parallel(rows):
            part = T.decl_buffer((width,), dtype, scope="local")
            stats = T.decl_buffer((2,), dtype, scope="local")   # mean, 1 / std
            for lane in T.vectorized(width):
                part[lane] = T.Cast(dtype, 0)
            for c in range(chunks):
                for lane in T.vectorized(width):
                    part[lane] = part[lane] + X[r, c * width + lane]
            stats[0] = T.Cast(dtype, 0)
            for lane in range(width):
                stats[0] = stats[0] + part[lane]
            stats[0] = stats[0] * T.Cast(dtype, inverse_n)
            for lane in T.vectorized(width):
                part[lane] = T.Cast(dtype, 0)
            for c in range(chunks):
                for lane in T.vectorized(width):
                    part[lane] = part[lane] + (X[r, c * width + lane] - stats[0]) * \
                        (X[r, c * width + lane] - stats[0])
            stats[1] = T.Cast(dtype, 0)
            for lane in range(width):
                stats[1] = stats[1] + part[lane]
            stats[1] = T.Cast(dtype, 1) / T.sqrt(stats[1] * T.Cast(dtype, inverse_n)
                                                  + T.Cast(dtype, epsilon))
            for c in range(chunks):
                for lane in T.vectorized(width):
                    Y[r, c * width + lane] = (X[r, c * width + lane] - stats[0]) * stats[1] \
                        * G[c * width + lane] + B[c * width + lane]

    return layer_norm_rows_func
