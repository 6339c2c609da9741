"""Lower our IR to a Relax IRModule, op by op, with `relax.BlockBuilder`.

The model must be cleaned up first (constants folded, shapes static: `passes.prepare` + `cleanup`).
Every IR value maps to one Relax expression. Graph inputs become the first parameters of `main`;
large constants (weights) become the following parameters, saved beside the library, so the
library stays small and the weights can be swapped; small constants are inlined. `main` always
returns a tuple of the graph outputs.

Layouts are ONNX's (NCHW activations, OIHW conv weights). Shapes are static, so ops that only
reshape (Reshape, Flatten, Squeeze, Unsqueeze) lower to a reshape to the inferred output shape.
A node fed only by constants is evaluated at compile time (this is how DequantizeLinear of int8
weights becomes a float weight: dense simulation, while the int8 data and its `meta["quant"]`
stay reachable for kernels).

float32 Softmax (over the last axis, or the flattened trailing axes before opset 13), Erf and
Gelu use our vectorizable versions (`fast_math.py`): LLVM turns exact exp/erf into one libm call
per element, which made softmax and GELU cost more than the matmuls around them.

Hook for our own kernels: before the generic lowering of MatMul/Gemm/Conv, if the weight (input
1) carries `meta["sparsity"]` or `meta["quant"]` (on itself, or on the constant feeding its
DequantizeLinear) and `backends.tvm.kernels` exists, `kernels.dispatch(ctx, node)` is called. It
returns the Relax expression of the node's output (emitted through `ctx.bb`), or None to fall back
to the dense lowering here. See `LoweringContext` for what `ctx` offers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ir import Model, Node, UnsupportedModelError, Value, is_static_shape
from ir.node_eval import NotEvaluable, evaluate_node

__all__ = ["LoweredModule", "LoweringContext", "lower_model", "supported_ops", "LOWERINGS",
           "INLINE_CONSTANT_LIMIT"]

# Constants with at most this many elements are inlined into the module; bigger ones are params.
INLINE_CONSTANT_LIMIT = 64

# Weight-carrying ops whose weight metadata may route them to our own kernels.
KERNEL_OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class LoweredModule:
    """The result of lowering.

    mod: Relax IRModule with `main(*inputs, *params) -> tuple(outputs)`.
    inputs / outputs: [(name, shape, dtype)] in the graph's order.
    param_names: names of the params of `main` after the inputs, in order.
    params: param name -> numpy array (after any compile-time transform, e.g. transposition).
    weight_meta: IR weight name -> {"sparsity": ..., "quant": ...} for weights carrying metadata;
        the kernel issue uses it to pick its own kernels.
    """
    mod: object
    inputs: list[tuple[str, tuple[int, ...], str]]
    outputs: list[tuple[str, tuple[int, ...], str]]
    param_names: list[str]
    params: dict[str, np.ndarray]
    weight_meta: dict[str, dict] = field(default_factory=dict)


class LoweringContext:
    """State shared by the per-op lowering functions.

    bb: the relax.BlockBuilder (emit with `ctx.emit(expr)`).
    expr(value): the Relax expression of an IR value (constants become params or inline consts).
    const(value): the numpy array of a value known at compile time (error otherwise).
    param(name, array): a new weight param holding `array` (e.g. a transformed weight).
    weight_meta(value): metadata of a weight (looks through DequantizeLinear to the int8 constant).
    """

    target = None  # what the code is for (kernel dispatch reads it); None = the host CPU
    tunable_kernels = False  # sparse kernels as MetaSchedule-tunable TIR (see lower_model)

    def __init__(self, model: Model, bb):
        from tvm import relax
        self.relax = relax
        self.model = model
        self.graph = model.graph
        self.bb = bb
        self.env: dict[str, object] = {}            # value name -> relax expr
        self.known: dict[str, np.ndarray] = {}      # value name -> array known at compile time
        self.param_vars: list = []
        self.param_names: list[str] = []
        self.params: dict[str, np.ndarray] = {}
        self.weight_meta: dict[str, dict] = {}

    # -- values ------------------------------------------------------------------------------
    def is_known(self, value: Value | None) -> bool:
        return value is not None and (value.is_constant or value.name in self.known)

    def const(self, value: Value) -> np.ndarray:
        if value.is_constant:
            return value.const
        if value.name in self.known:
            return self.known[value.name]
        raise UnsupportedModelError(
            f"{value.name!r} must be a compile-time constant for TVM lowering "
            f"(run the cleanup pass and give static input shapes)")

    def expr(self, value: Value):
        if value.name in self.env:
            return self.env[value.name]
        array = self.const(value)
        if array.size <= INLINE_CONSTANT_LIMIT:
            expr = self.relax.const(np.ascontiguousarray(array), str(array.dtype))
        else:
            expr = self.param(value.name, array)
        self.env[value.name] = expr
        return expr

    def param(self, name: str, array: np.ndarray):
        """A new `main` parameter bound to `array` at run time."""
        array = np.ascontiguousarray(array)
        unique = name
        while unique in self.params:
            unique = f"{name}_{len(self.params)}"
        var = self.relax.Var(unique, self.relax.TensorType(list(array.shape), str(array.dtype)))
        self.param_vars.append(var)
        self.param_names.append(unique)
        self.params[unique] = array
        return var

    def weight(self, value: Value, transform: Callable[[np.ndarray], np.ndarray] | None = None,
               tag: str = ""):
        """The Relax expr of a weight, transformed at compile time when it is a constant
        (so e.g. Gemm's transB costs nothing at run time)."""
        if transform is None or not self.is_known(value):
            return None if transform is not None else self.expr(value)
        array = transform(self.const(value))
        if array.size <= INLINE_CONSTANT_LIMIT:
            return self.relax.const(np.ascontiguousarray(array), str(array.dtype))
        return self.param(f"{value.name}{tag}", array)

    def weight_meta_of(self, value: Value | None) -> dict:
        """`meta` entries that matter to kernels, from the value or from the int8 constant
        behind the DequantizeLinear that produces it."""
        found: dict = {}
        if value is None:
            return found
        sources = [value]
        if value.producer is not None and value.producer.op_type == "DequantizeLinear":
            sources.append(value.producer.inputs[0])
        for source in sources:
            for key in ("sparsity", "quant"):
                if key in source.meta and key not in found:
                    found[key] = source.meta[key]
        return found

    def emit(self, expr):
        return self.bb.emit(expr)

    # -- static facts ----------------------------------------------------------------------------
    @staticmethod
    def shape(value: Value) -> tuple[int, ...]:
        return tuple(int(d) for d in value.shape)

    @staticmethod
    def dtype(value: Value) -> str:
        return str(np.dtype(value.dtype))


# ---------------------------------------------------------------------------------------------
# Per-op lowering functions: fn(ctx, node) -> relax expr (or list for multi-output ops).
# ---------------------------------------------------------------------------------------------
def _op():
    from tvm import relax
    return relax.op


def _scalar(value, dtype):
    from tvm import relax
    return relax.const(np.array(value, dtype=dtype), dtype)


def _binary(name):
    def lower(ctx, node):
        a, b = (ctx.expr(v) for v in node.inputs[:2])
        return getattr(_op(), name)(a, b)
    return lower


def _unary(name):
    def lower(ctx, node):
        return getattr(_op(), name)(ctx.expr(node.inputs[0]))
    return lower


def _nn_unary(name):
    def lower(ctx, node):
        return getattr(_op().nn, name)(ctx.expr(node.inputs[0]))
    return lower


def _variadic(name):
    def lower(ctx, node):
        exprs = [ctx.expr(v) for v in node.inputs if v is not None]
        result = exprs[0]
        for other in exprs[1:]:
            result = ctx.emit(getattr(_op(), name)(result, other))
        return result
    return lower


def lower_identity(ctx, node):
    return ctx.expr(node.inputs[0])


def lower_reshape_to_output(ctx, node):
    """Reshape, Flatten, Squeeze, Unsqueeze: the output shape is static and inferred."""
    return _op().reshape(ctx.expr(node.inputs[0]), ctx.shape(node.output))


def lower_expand(ctx, node):
    return _op().broadcast_to(ctx.expr(node.inputs[0]), ctx.shape(node.output))


def lower_cast(ctx, node):
    return _op().astype(ctx.expr(node.inputs[0]), ctx.dtype(node.output))


def lower_div(ctx, node):
    a, b = ctx.expr(node.inputs[0]), ctx.expr(node.inputs[1])
    if np.issubdtype(node.output.dtype, np.integer):
        # ONNX integer division truncates toward zero; TVM's divide on ints may floor.
        quotient = ctx.emit(_op().divide(_op().astype(a, "float64"), _op().astype(b, "float64")))
        return _op().astype(_op().trunc(quotient), ctx.dtype(node.output))
    return _op().divide(a, b)


def lower_pow(ctx, node):
    base, exponent = node.inputs
    if ctx.is_known(exponent) and ctx.const(exponent).size == 1:
        e = float(ctx.const(exponent).reshape(()))
        if e == 2.0:
            x = ctx.expr(base)
            return _op().multiply(x, x)
        if e == 0.5:
            return _op().sqrt(ctx.expr(base))
    exp_expr = ctx.expr(exponent)
    if ctx.dtype(exponent) != ctx.dtype(base):
        exp_expr = _op().astype(exp_expr, ctx.dtype(base))
    return _op().power(ctx.expr(base), exp_expr)


def lower_reciprocal(ctx, node):
    return _op().divide(_scalar(1.0, ctx.dtype(node.output)), ctx.expr(node.inputs[0]))


def lower_clip(ctx, node):
    x = ctx.expr(node.inputs[0])
    dtype = ctx.dtype(node.output)
    info = np.finfo(dtype) if np.issubdtype(np.dtype(dtype), np.floating) else np.iinfo(dtype)
    low, high = node.attr("min", float(info.min)), node.attr("max", float(info.max))
    if node.input(1) is not None:
        low = float(ctx.const(node.input(1)).reshape(()))
    if node.input(2) is not None:
        high = float(ctx.const(node.input(2)).reshape(()))
    return _op().clip(x, _prim(low, dtype), _prim(high, dtype))


def _prim(value, dtype):
    from tvm import tirx
    return tirx.const(value, dtype) if dtype.startswith("float") else tirx.const(int(value), dtype)


def lower_leaky_relu(ctx, node):
    return _op().nn.leakyrelu(ctx.expr(node.inputs[0]), float(node.attr("alpha", 0.01)))


def lower_gelu(ctx, node):
    x = ctx.expr(node.inputs[0])
    if node.attr("approximate", "none") == "tanh":
        return _op().nn.gelu_tanh(x)
    if ctx.dtype(node.inputs[0]) == "float32":
        from .fast_math import gelu_erf_te
        return ctx.bb.emit_te(gelu_erf_te, x)
    return _op().nn.gelu(x)


def lower_erf(ctx, node):
    """float32 erf as TOPI's vectorizable polynomial (see fast_math.py): LLVM turns the exact
    erf into one libm call per element, which made GELU cost more than its matmul."""
    x = ctx.expr(node.inputs[0])
    if ctx.dtype(node.inputs[0]) == "float32":
        from .fast_math import fast_erf_te
        return ctx.bb.emit_te(fast_erf_te, x)
    return _op().erf(x)


def lower_hard_sigmoid(ctx, node):
    dtype = ctx.dtype(node.output)
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    x = ctx.emit(_op().add(_op().multiply(ctx.expr(node.inputs[0]), _scalar(alpha, dtype)),
                           _scalar(beta, dtype)))
    return _op().clip(x, _prim(0.0, dtype), _prim(1.0, dtype))


def lower_where(ctx, node):
    cond, a, b = (ctx.expr(v) for v in node.inputs)
    return _op().where(cond, a, b)


def lower_softmax(ctx, node, log=False):
    x = ctx.expr(node.inputs[0])
    shape = ctx.shape(node.inputs[0])
    fn = _op().nn.log_softmax if log else _op().nn.softmax
    axis = node.attr("axis", -1 if ctx.model.opset >= 13 else 1)
    axis = axis % len(shape)
    last = axis == len(shape) - 1
    if not log and ctx.dtype(node.inputs[0]) == "float32" and (last or ctx.model.opset < 13) \
            and _targets_cpu(ctx):
        return _softmax_rows(ctx, x, shape, axis)
    if ctx.model.opset >= 13 or last:
        return fn(x, axis=axis)
    # Before opset 13, Softmax normalizes over all axes from `axis` on (flattened to 2-D).
    flat = ctx.emit(_op().reshape(x, (int(np.prod(shape[:axis])), int(np.prod(shape[axis:])))))
    return _op().reshape(ctx.emit(fn(flat, axis=1)), shape)


def _targets_cpu(ctx) -> bool:
    """Whether the code is for a CPU (None: the host); our pre-scheduled CPU kernels (parallel
    loops, no thread bindings) do not compile for GPUs."""
    from .kernels import target_family, target_of
    return target_family(target_of(ctx)) != "cuda"


def _cpu_lanes(ctx) -> int:
    """float32 lanes of the CPU the code is for (16 AVX-512, 8 AVX2, 4 NEON)."""
    from .kernels import cpu_schedule, target_of
    return cpu_schedule(target_of(ctx)).lanes


def _softmax_rows(ctx, x, shape, axis):
    """Softmax over the axes from `axis` on, as our pre-scheduled row kernel (fast_math.py):
    one exp per element instead of two, contiguous row reductions."""
    from .fast_math import softmax_rows
    rows, columns = int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))
    func = softmax_rows(rows, columns)
    gvar = ctx.bb.add_func(func.without_attr("global_symbol"), "softmax_rows")
    flat = ctx.emit(_op().reshape(x, (rows, columns)))
    y = ctx.emit(ctx.relax.call_tir(gvar, [flat],
                                    out_ty=ctx.relax.TensorType([rows, columns], "float32")))
    return _op().reshape(y, shape)


def lower_transpose(ctx, node):
    perm = node.attr("perm")
    return _op().permute_dims(ctx.expr(node.inputs[0]), list(perm) if perm is not None else None)


def lower_concat(ctx, node):
    exprs = [ctx.expr(v) for v in node.inputs if v is not None]
    return _op().concat(exprs, axis=int(node.attr("axis")) % len(ctx.shape(node.output)))


def lower_split(ctx, node):
    x = ctx.expr(node.inputs[0])
    rank = len(ctx.shape(node.inputs[0]))
    axis = int(node.attr("axis", 0)) % rank
    sizes = [ctx.shape(out)[axis] for out in node.outputs]
    indices = list(np.cumsum(sizes)[:-1].astype(int))
    parts = ctx.emit(_op().split(x, [int(i) for i in indices], axis=axis))
    from tvm import relax
    return [relax.TupleGetItem(parts, i) for i in range(len(sizes))]


def lower_slice(ctx, node):
    x = ctx.expr(node.inputs[0])
    shape = ctx.shape(node.inputs[0])
    if ctx.model.opset < 10:
        starts, ends = node.attr("starts"), node.attr("ends")
        axes, steps = node.attr("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        starts = ctx.const(node.inputs[1]).tolist()
        ends = ctx.const(node.inputs[2]).tolist()
        axes = (ctx.const(node.input(3)).tolist() if node.input(3) is not None
                else list(range(len(starts))))
        steps = ctx.const(node.input(4)).tolist() if node.input(4) is not None else [1] * len(starts)
    axes = [int(a) % len(shape) for a in axes]
    begins, finals = [], []
    for axis, start, end, step in zip(axes, starts, ends, steps):
        # Normalize as numpy does so TVM gets in-range, explicit bounds.
        begin, final, _ = slice(int(start), int(end), int(step)).indices(shape[axis])
        begins.append(begin)
        finals.append(final if final >= 0 else -shape[axis] - 1)
    if any(s < 0 for s in steps):
        return _op().strided_slice(x, axes, begins, finals, [int(s) for s in steps])
    return _op().strided_slice(x, axes, begins, finals, [int(s) for s in steps],
                               assume_inbound=True)


def lower_gather(ctx, node):
    data, indices = node.inputs
    axis = int(node.attr("axis", 0)) % len(ctx.shape(data))
    if ctx.is_known(indices):
        array = ctx.const(indices).astype(np.int64)
        array = np.where(array < 0, array + ctx.shape(data)[axis], array)
        index_expr = _op().astype(ctx.emit(_op().reshape(
            ctx.weight(indices, lambda a: array.reshape(-1), "_idx")
            if array.size > INLINE_CONSTANT_LIMIT else
            ctx.relax.const(array.reshape(-1), "int64"), (-1,))), "int64")
        taken = ctx.emit(_op().take(ctx.expr(data), index_expr, axis=axis))
        return _op().reshape(taken, ctx.shape(node.output))
    # Dynamic indices (token ids): ONNX allows negatives, so wrap them.
    idx = ctx.expr(indices)
    size = _scalar(ctx.shape(data)[axis], ctx.dtype(indices))
    zero = _scalar(0, ctx.dtype(indices))
    idx = ctx.emit(_op().where(_op().less(idx, zero), _op().add(idx, size), idx))
    return _op().take(ctx.expr(data), idx, axis=axis)


def lower_constant_of_output(ctx, node):
    """Nodes whose output is known at compile time were folded already; kept for clarity."""
    return ctx.expr(node.output)


def lower_pad(ctx, node):
    x = ctx.expr(node.inputs[0])
    rank = len(ctx.shape(node.inputs[0]))
    mode = node.attr("mode", "constant")
    if ctx.model.opset < 11:
        pads, value = node.attr("pads"), float(node.attr("value", 0.0))
    else:
        pads = ctx.const(node.inputs[1]).tolist()
        value = (float(ctx.const(node.input(2)).reshape(())) if node.input(2) is not None
                 else 0.0)
        if node.input(3) is not None:
            raise UnsupportedModelError(f"Pad with axes input ({node.name}) is not supported")
    if mode != "constant":
        raise UnsupportedModelError(f"Pad mode {mode!r} ({node.name}) is not supported")
    width = []
    for axis in range(rank):
        width += [int(pads[axis]), int(pads[axis + rank])]
    return _op().nn.pad(x, width, "constant", value)


def lower_tile(ctx, node):
    return _op().tile(ctx.expr(node.inputs[0]), [int(r) for r in ctx.const(node.inputs[1])])


# -- reductions --------------------------------------------------------------------------------
def _reduce_axes(ctx, node):
    rank = len(ctx.shape(node.inputs[0]))
    axes = node.attr("axes")
    if axes is None and node.input(1) is not None:
        axes = ctx.const(node.input(1)).tolist()
    if axes is None or len(axes) == 0:
        if node.attr("noop_with_empty_axes", 0):
            return None
        axes = list(range(rank))
    return sorted(int(a) % rank for a in axes)


def _reduce(name):
    def lower(ctx, node):
        x = ctx.expr(node.inputs[0])
        axes = _reduce_axes(ctx, node)
        if axes is None:
            return x
        keep = bool(node.attr("keepdims", 1))
        if name == "l2":
            squared = ctx.emit(_op().multiply(x, x))
            return _op().sqrt(ctx.emit(_op().sum(squared, axes, keep)))
        if name == "sum_square":
            return _op().sum(ctx.emit(_op().multiply(x, x)), axes, keep)
        return getattr(_op(), name)(x, axes, keep)
    return lower


def lower_arg(name):
    def lower(ctx, node):
        axis = int(node.attr("axis", 0)) % len(ctx.shape(node.inputs[0]))
        result = getattr(_op(), name)(ctx.expr(node.inputs[0]), axis, bool(node.attr("keepdims", 1)))
        return _op().astype(ctx.emit(result), "int64")
    return lower


# -- linear algebra ----------------------------------------------------------------------------
def lower_matmul(ctx, node):
    a, b = node.inputs
    return _op().matmul(ctx.expr(a), ctx.expr(b), out_dtype=ctx.dtype(node.output))


def lower_gemm(ctx, node):
    """Y = alpha * A' @ B' + beta * C. A constant B is stored as [K, N] (transposed at compile
    time when transB=1), so the run-time matmul reads it row by row."""
    a, b = node.inputs[:2]
    c = node.input(2)
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    dtype = ctx.dtype(node.output)
    a_expr = ctx.expr(a)
    if node.attr("transA", 0):
        a_expr = ctx.emit(_op().permute_dims(a_expr, [1, 0]))
    if node.attr("transB", 0):
        b_expr = ctx.weight(b, lambda w: w.T, "_T")
        if b_expr is None:
            b_expr = ctx.emit(_op().permute_dims(ctx.expr(b), [1, 0]))
    else:
        b_expr = ctx.expr(b)
    y = ctx.emit(_op().matmul(a_expr, b_expr))
    if alpha != 1.0:
        y = ctx.emit(_op().multiply(y, _scalar(alpha, dtype)))
    if c is not None and beta != 0.0:
        c_expr = ctx.expr(c)
        if beta != 1.0:
            c_expr = ctx.emit(_op().multiply(c_expr, _scalar(beta, dtype)))
        y = _op().add(y, c_expr)
    return y


def _spatial_padding(node, in_shape, kernel, strides, dilations, ceil_mode=False):
    """ONNX pads (begin..., end...) with auto_pad resolved, for the spatial axes."""
    rank = len(kernel)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", ""):
        pads = list(node.attr("pads", [0] * (2 * rank)))
        return pads[:rank], pads[rank:]
    if auto_pad == "VALID":
        return [0] * rank, [0] * rank
    begin, end = [], []
    for size, k, s, d in zip(in_shape, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin, end


def lower_conv(ctx, node):
    x, w = node.inputs[:2]
    bias = node.input(2)
    w_shape = ctx.shape(w)
    kernel = list(node.attr("kernel_shape", w_shape[2:]))
    rank = len(kernel)
    strides = list(node.attr("strides", [1] * rank))
    dilations = list(node.attr("dilations", [1] * rank))
    begin, end = _spatial_padding(node, ctx.shape(x)[2:], kernel, strides, dilations)
    group = int(node.attr("group", 1))
    args = dict(strides=strides, padding=begin + end, dilation=dilations, groups=group)
    if rank == 2:
        y = ctx.emit(_op().nn.conv2d(ctx.expr(x), ctx.expr(w), **args))
    elif rank == 1:
        y = ctx.emit(_op().nn.conv1d(ctx.expr(x), ctx.expr(w), **args))
    else:
        raise UnsupportedModelError(f"Conv with {rank} spatial dims ({node.name}) is not supported")
    if bias is None:
        return y
    channels = w_shape[0]
    b_expr = ctx.weight(bias, lambda b: b.reshape((1, channels) + (1,) * rank), "_bcast")
    if b_expr is None:
        b_expr = ctx.emit(_op().reshape(ctx.expr(bias), (1, channels) + (1,) * rank))
    return _op().add(y, b_expr)


def _pool_args(ctx, node, with_dilation=True):
    kernel = list(node.attr("kernel_shape"))
    rank = len(kernel)
    strides = list(node.attr("strides", [1] * rank))
    dilations = list(node.attr("dilations", [1] * rank)) if with_dilation else [1] * rank
    begin, end = _spatial_padding(node, ctx.shape(node.inputs[0])[2:], kernel, strides, dilations)
    if rank != 2:
        raise UnsupportedModelError(f"{node.op_type} with {rank} spatial dims ({node.name}) "
                                    f"is not supported")
    return dict(pool_size=kernel, strides=strides, padding=begin + end, dilation=dilations,
                ceil_mode=bool(node.attr("ceil_mode", 0)))


def lower_max_pool(ctx, node):
    if len(node.outputs) > 1 and node.outputs[1] is not None:
        raise UnsupportedModelError(f"MaxPool with Indices output ({node.name}) is not supported")
    return _op().nn.max_pool2d(ctx.expr(node.inputs[0]), **_pool_args(ctx, node))


def lower_average_pool(ctx, node):
    return _op().nn.avg_pool2d(ctx.expr(node.inputs[0]), **_pool_args(ctx, node, False),
                               count_include_pad=bool(node.attr("count_include_pad", 0)))


def lower_global_pool(name):
    def lower(ctx, node):
        rank = len(ctx.shape(node.inputs[0]))
        return getattr(_op(), name)(ctx.expr(node.inputs[0]), list(range(2, rank)), True)
    return lower


def lower_batch_norm(ctx, node):
    """Inference BatchNormalization as x * scale + shift, folded at compile time."""
    x, gamma, beta, mean, var = node.inputs[:5]
    eps = float(node.attr("epsilon", 1e-5))
    rank = len(ctx.shape(x))
    if not all(ctx.is_known(v) for v in (gamma, beta, mean, var)):
        raise UnsupportedModelError(f"BatchNormalization with non-constant statistics "
                                    f"({node.name}) is not supported")
    scale = ctx.const(gamma) / np.sqrt(ctx.const(var) + eps)
    shift = ctx.const(beta) - ctx.const(mean) * scale
    bshape = (1, -1) + (1,) * (rank - 2)
    dtype = ctx.dtype(x)
    scale_expr = _const_or_param(ctx, f"{node.name}_scale", scale.reshape(bshape).astype(dtype))
    shift_expr = _const_or_param(ctx, f"{node.name}_shift", shift.reshape(bshape).astype(dtype))
    return _op().add(ctx.emit(_op().multiply(ctx.expr(x), scale_expr)), shift_expr)


def _const_or_param(ctx, name, array):
    if array.size <= INLINE_CONSTANT_LIMIT:
        return ctx.relax.const(np.ascontiguousarray(array), str(array.dtype))
    return ctx.param(name, array)


def lower_layer_norm(ctx, node):
    x, scale = node.inputs[:2]
    bias = node.input(2)
    rank = len(ctx.shape(x))
    axis = int(node.attr("axis", -1)) % rank
    axes = list(range(axis, rank))
    if len(node.outputs) > 1 and any(o is not None and o.uses() for o in node.outputs[1:]):
        raise UnsupportedModelError(f"LayerNormalization with Mean/InvStdDev outputs "
                                    f"({node.name}) is not supported")
    dtype = ctx.dtype(x)
    beta = ctx.expr(bias) if bias is not None else _op().zeros(ctx.shape(scale), dtype)
    epsilon = float(node.attr("epsilon", 1e-5))
    shape = ctx.shape(x)
    if dtype == "float32" and _targets_cpu(ctx) and \
            tuple(ctx.shape(scale)) in (tuple(shape[axis:]), (int(np.prod(shape[axis:])),)) and \
            (bias is None or tuple(ctx.shape(bias)) == tuple(ctx.shape(scale))):
        return _layer_norm_rows(ctx, node, shape, axis, scale, beta, epsilon)
    return _op().nn.layer_norm(ctx.expr(x), ctx.expr(scale), beta, axes, epsilon=epsilon)


def _layer_norm_rows(ctx, node, shape, axis, scale, beta, epsilon):
    """LayerNorm over the trailing axes as our pre-scheduled row kernel (fast_math.py)."""
    from .fast_math import layer_norm_rows
    rows, columns = int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))
    op = _op()
    func = layer_norm_rows(rows, columns, epsilon, lanes=_cpu_lanes(ctx))
    gvar = ctx.bb.add_func(func.without_attr("global_symbol"), "layer_norm_rows")
    args = [ctx.emit(op.reshape(ctx.expr(node.inputs[0]), [rows, columns])),
            ctx.emit(op.reshape(ctx.expr(scale), [columns])),
            ctx.emit(op.reshape(beta, [columns]))]
    y = ctx.emit(ctx.relax.call_tir(gvar, args, out_ty=ctx.relax.TensorType([rows, columns],
                                                                             "float32")))
    return op.reshape(y, list(shape))


def lower_lrn(ctx, node):
    from tvm import topi
    return ctx.bb.emit_te(topi.nn.lrn, ctx.expr(node.inputs[0]), int(node.attr("size")), 1,
                          float(node.attr("alpha", 1e-4)), float(node.attr("beta", 0.75)),
                          float(node.attr("bias", 1.0)))


# -- quantization (QDQ, simulated in float) -----------------------------------------------------
def _axis_broadcast(ctx, node, param: Value, rank: int):
    """A per-tensor or per-axis scale / zero point, shaped to broadcast against the data."""
    array = ctx.const(param)
    if array.size == 1:
        return array.reshape(())
    axis = int(node.attr("axis", 1)) % rank
    shape = [1] * rank
    shape[axis] = array.size
    return array.reshape(shape)


def lower_dequantize(ctx, node):
    x, scale = node.inputs[:2]
    zero = node.input(2)
    rank = len(ctx.shape(x))
    dtype = ctx.dtype(node.output)
    scale_arr = _axis_broadcast(ctx, node, scale, rank).astype(dtype)
    y = _op().astype(ctx.expr(x), dtype)
    if zero is not None and np.any(ctx.const(zero)):
        zp = _axis_broadcast(ctx, node, zero, rank).astype(dtype)
        y = _op().subtract(ctx.emit(y), _const_or_param(ctx, f"{node.name}_zp", zp))
    return _op().multiply(ctx.emit(y), _const_or_param(ctx, f"{node.name}_scale", scale_arr))


def lower_quantize(ctx, node):
    """round-half-to-even(x / scale) + zero_point, saturated to the output integer type."""
    x, scale = node.inputs[:2]
    zero = node.input(2)
    rank = len(ctx.shape(x))
    out_dtype = ctx.dtype(node.output)
    in_dtype = ctx.dtype(x)
    info = np.iinfo(out_dtype)
    # x * (1 / scale), as onnxruntime's MLAS kernels compute it, so ties round the same way.
    inverse = (1.0 / _axis_broadcast(ctx, node, scale, rank)).astype(in_dtype)
    y = ctx.emit(_op().multiply(ctx.expr(x), _const_or_param(ctx, f"{node.name}_inv_scale",
                                                             inverse)))
    # LLVM lowers R.round to nearbyint, which rounds ties to even in the default FP mode (one
    # instruction); other targets get the exact emulation (their round may tie away from zero).
    if _targets_cpu(ctx):
        _vectorizable_nearbyint()
    y = ctx.emit(_op().round(y) if _targets_cpu(ctx) else _round_half_even(y, in_dtype))
    if zero is not None and np.any(ctx.const(zero)):
        zp = _axis_broadcast(ctx, node, zero, rank).astype(in_dtype)
        y = ctx.emit(_op().add(y, _const_or_param(ctx, f"{node.name}_zp", zp)))
    y = ctx.emit(_op().clip(y, _prim(float(info.min), in_dtype), _prim(float(info.max), in_dtype)))
    return _op().astype(y, out_dtype)


def _vectorizable_nearbyint() -> None:
    """Let TVM's loop vectorizer keep `tirx.nearbyint` (what R.round becomes) in vector form.

    TVM 0.27 marks tirx.round, floor, exp... `TVectorizable` but not nearbyint, so a vectorized
    loop holding one is scalarized and LLVM re-vectorizes it across the outer loop with gathers
    and byte scatters: every QuantizeLinear ran ~10x slower than the same loop without the
    rounding (0.039 vs 0.0037 ms for 128 x 384). nearbyint is elementwise and LLVM has it as a
    vector intrinsic (vrndscaleps / frintx), so the attribute only restores the vector loop."""
    import tvm

    if tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable") is None:
        tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)


def _round_half_even(y, dtype):
    """ONNX rounds ties to even; floor(y + 0.5) corrected where y is exactly halfway."""
    op = _op()
    rounded = op.floor(op.add(y, _scalar(0.5, dtype)))
    tie = op.equal(op.subtract(rounded, y), _scalar(0.5, dtype))
    odd = op.not_equal(op.floor_mod(rounded, _scalar(2.0, dtype)), _scalar(0.0, dtype))
    return op.where(op.logical_and(tie, odd), op.subtract(rounded, _scalar(1.0, dtype)), rounded)


LOWERINGS: dict[str, Callable] = {
    # elementwise
    "Add": _binary("add"), "Sub": _binary("subtract"), "Mul": _binary("multiply"),
    "Div": lower_div, "Pow": lower_pow, "Max": _variadic("maximum"), "Min": _variadic("minimum"),
    "Sum": _variadic("add"), "Equal": _binary("equal"), "Less": _binary("less"),
    "Greater": _binary("greater"), "LessOrEqual": _binary("less_equal"),
    "GreaterOrEqual": _binary("greater_equal"), "And": _binary("logical_and"),
    "Or": _binary("logical_or"), "Where": lower_where, "Mod": _binary("floor_mod"),
    "Relu": _nn_unary("relu"), "Sigmoid": _unary("sigmoid"), "Tanh": _unary("tanh"),
    "Exp": _unary("exp"), "Log": _unary("log"), "Sqrt": _unary("sqrt"), "Erf": lower_erf,
    "Neg": _unary("negative"), "Abs": _unary("abs"), "Floor": _unary("floor"),
    "Ceil": _unary("ceil"), "Not": _unary("logical_not"), "Sin": _unary("sin"),
    "Cos": _unary("cos"), "Reciprocal": lower_reciprocal, "Clip": lower_clip,
    "LeakyRelu": lower_leaky_relu, "Gelu": lower_gelu, "HardSigmoid": lower_hard_sigmoid,
    "Softplus": _nn_unary("softplus"), "Cast": lower_cast,
    "Identity": lower_identity, "Dropout": lower_identity,
    # shape
    "Reshape": lower_reshape_to_output, "Flatten": lower_reshape_to_output,
    "Squeeze": lower_reshape_to_output, "Unsqueeze": lower_reshape_to_output,
    "Expand": lower_expand, "Transpose": lower_transpose, "Concat": lower_concat,
    "Split": lower_split, "Slice": lower_slice, "Gather": lower_gather, "Pad": lower_pad,
    "Tile": lower_tile,
    # reductions and normalization
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "ReduceProd": _reduce("prod"), "ReduceL2": _reduce("l2"),
    "ReduceSumSquare": _reduce("sum_square"), "ArgMax": lower_arg("argmax"),
    "ArgMin": lower_arg("argmin"),
    "Softmax": lower_softmax, "LogSoftmax": lambda ctx, node: lower_softmax(ctx, node, log=True),
    "BatchNormalization": lower_batch_norm, "LayerNormalization": lower_layer_norm,
    "LRN": lower_lrn,
    # linear algebra, conv, pooling
    "MatMul": lower_matmul, "Gemm": lower_gemm, "Conv": lower_conv,
    "MaxPool": lower_max_pool, "AveragePool": lower_average_pool,
    "GlobalAveragePool": lower_global_pool("mean"), "GlobalMaxPool": lower_global_pool("max"),
    # quantization
    "QuantizeLinear": lower_quantize, "DequantizeLinear": lower_dequantize,
}


def supported_ops() -> list[str]:
    return sorted(LOWERINGS)


def _kernels_module():
    """backends.tvm.kernels if it exists (written by the kernel issue), else None."""
    try:
        return importlib.import_module("backends.tvm.kernels")
    except ModuleNotFoundError as exc:
        if exc.name in ("backends.tvm.kernels",):
            return None
        raise


def _check_supported(model: Model) -> None:
    graph = model.graph
    missing = sorted({n.op_type if not n.domain or n.domain == "ai.onnx" else f"{n.domain}.{n.op_type}"
                      for n in graph.nodes
                      if (n.domain not in ("", "ai.onnx") or n.op_type not in LOWERINGS)
                      and not all(v is None or v.is_constant for v in n.inputs)})
    if missing:
        raise UnsupportedModelError(f"no TVM lowering for op(s): {', '.join(missing)}")
    for value in list(graph.inputs) + list(graph.outputs):
        if not is_static_shape(value.shape) or value.dtype is None:
            raise UnsupportedModelError(
                f"TVM lowering needs static shapes and dtypes; {value.name!r} has shape "
                f"{value.shape} (give --input-shape and run cleanup)")


def lower_model(model: Model, use_kernels: bool = True, target=None,
                tunable_kernels: bool = False) -> LoweredModule:
    """Lower a cleaned-up IR model with static shapes to a Relax IRModule (see module doc).

    `target` (a TargetSpec, target dict or tvm Target) lets the kernel dispatch pick the
    schedule and instructions of the machine the code is for; None means the host CPU.
    `tunable_kernels` makes the sparse kernels schedulable TIR with constant loop extents
    (blocked-ELL, `kernels/ell.py`) that MetaSchedule can tune, instead of our pre-scheduled
    BSR kernels (which MetaSchedule skips); use it when the module will be tuned.
    """
    from tvm import relax

    graph = model.graph
    graph.toposort()
    _check_supported(model)
    kernels = _kernels_module() if use_kernels else None
    bb = relax.BlockBuilder()
    ctx = LoweringContext(model, bb)
    if target is not None:
        ctx.target = target
    ctx.tunable_kernels = bool(tunable_kernels)
    input_vars = []
    for value in graph.inputs:
        if value.is_constant:
            continue
        var = relax.Var(value.name, relax.TensorType(list(ctx.shape(value)), ctx.dtype(value)))
        ctx.env[value.name] = var
        input_vars.append((value, var))

    with bb.function("main"):
        with bb.dataflow():
            for node in graph.nodes:
                _lower_node(ctx, node, kernels)
            outputs = [bb.emit_output(ctx.expr(v)) for v in graph.outputs]
        bb.emit_func_output(relax.Tuple(outputs),
                            params=[var for _, var in input_vars] + ctx.param_vars)
    return LoweredModule(
        mod=bb.get(),
        inputs=[(v.name, ctx.shape(v), ctx.dtype(v)) for v, _ in input_vars],
        outputs=[(v.name, ctx.shape(v), ctx.dtype(v)) for v in graph.outputs],
        param_names=list(ctx.param_names),
        params=dict(ctx.params),
        weight_meta=dict(ctx.weight_meta),
    )


def _lower_node(ctx: LoweringContext, node: Node, kernels) -> None:
    if all(v is None or ctx.is_known(v) for v in node.inputs) and node.inputs:
        if _fold(ctx, node):
            return
    if node.op_type in KERNEL_OPS and node.input(1) is not None:
        meta = ctx.weight_meta_of(node.input(1))
        if meta:
            ctx.weight_meta[node.input(1).name] = meta
            if kernels is not None:
                result = kernels.dispatch(ctx, node)
                if result is not None:
                    _bind(ctx, node, result)
                    return
    lower = LOWERINGS.get(node.op_type)
    if lower is None or node.domain not in ("", "ai.onnx"):
        raise UnsupportedModelError(f"no TVM lowering for op {node.op_type} ({node.name})")
    _bind(ctx, node, lower(ctx, node))


def _fold(ctx: LoweringContext, node: Node) -> bool:
    """Evaluate a node fed only by compile-time constants (e.g. DequantizeLinear of int8
    weights); False when the evaluator cannot."""
    inputs = [None if v is None else ctx.const(v) for v in node.inputs]
    try:
        if all(v is None or v.is_constant for v in node.inputs):
            results = evaluate_node(node, ctx.model)
        else:
            results = _evaluate_with(node, ctx, inputs)
    except NotEvaluable:
        return False
    for value, array in zip(node.outputs, results):
        if value is not None and array is not None:
            ctx.known[value.name] = np.asarray(array)
    return True


def _evaluate_with(node: Node, ctx: LoweringContext, inputs) -> list:
    """Run one node on given arrays with onnxruntime (inputs known only during lowering)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(inputs)]
    outs = [f"out{i}" if v is not None else "" for i, v in enumerate(node.outputs)]
    attrs = {k: v for k, v in node.attrs.items() if not hasattr(v, "nodes")}
    onnx_node = helper.make_node(node.op_type, names, outs, domain=node.domain or None, **attrs)
    inits = [numpy_helper.from_array(a, n) for n, a in zip(names, inputs) if a is not None]
    out_infos = [helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype),
                                               list(v.shape))
                 for n, v in zip(outs, node.outputs) if v is not None]
    proto = helper.make_model(helper.make_graph([onnx_node], "fold", [], out_infos, inits),
                              opset_imports=[helper.make_opsetid("", ctx.model.opset)])
    proto.ir_version = min(proto.ir_version, 10)
    try:
        session = ort.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return session.run(None, {})
    except Exception as exc:  # noqa: BLE001 - anything ORT refuses is simply not folded
        raise NotEvaluable(str(exc)) from None


def _bind(ctx: LoweringContext, node: Node, result) -> None:
    results = result if isinstance(result, list) else [result]
    for value, expr in zip(node.outputs, results):
        if value is None:
            continue
        if not isinstance(expr, ctx.relax.Var):
            expr = ctx.emit(expr)
        ctx.env[value.name] = expr
