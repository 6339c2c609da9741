"""Vector-Jacobian products of ONNX ops, for gradients of a model's outputs with respect to its
intermediate tensors, and to the constant operands of MatMul, Gemm and Add (weights and biases;
Conv's weight has none).

`VJP_RULES[op_type](node, grads, inputs, outputs, opset)` returns, for each input of `node`, the
gradient of the probed scalar(s) with respect to that input (None for inputs that carry shapes,
indices or exponents; the caller drops the gradients of constants). `grads` holds the gradients
of the node's outputs, `inputs` and `outputs` the forward arrays (captured from onnxruntime).
Every gradient carries one extra leading axis, the probe axis: K independent output directions
are pulled back at once, so a rule works on arrays of shape [K, *tensor_shape] and forward
arrays of shape tensor_shape.
Broadcasting inputs get their gradient summed back to their own shape (`unbroadcast`).

An op without a rule (pooling other than global average, Max/Min, control flow, custom domains)
stops the backward sweep with `NotDifferentiable`; the passes report it as a one-line option
error naming the op.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ir import CompressError, Node

__all__ = ["NotDifferentiable", "VJP_RULES", "unbroadcast"]


class NotDifferentiable(CompressError):
    """The backward sweep met an op it has no gradient rule for."""


def unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a [K, *broadcast_shape] gradient back to [K, *shape] (numpy broadcasting rules)."""
    extra = grad.ndim - 1 - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(1, 1 + extra)))
    axes = tuple(i + 1 for i, dim in enumerate(shape) if dim == 1 and grad.shape[i + 1] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape((grad.shape[0], *shape))


def _axis(axis: int, rank: int) -> int:
    """An ONNX axis (negative counts from the end) as an axis of the probe-prefixed array."""
    return (axis + rank if axis < 0 else axis) + 1


def _swap_last(array: np.ndarray) -> np.ndarray:
    return np.swapaxes(array, -1, -2)


# -- elementwise ----------------------------------------------------------------------------------
def _add(node, g, x, y, opset):
    return [unbroadcast(g[0], x[0].shape), unbroadcast(g[0], x[1].shape)]


def _sub(node, g, x, y, opset):
    return [unbroadcast(g[0], x[0].shape), -unbroadcast(g[0], x[1].shape)]


def _mul(node, g, x, y, opset):
    return [unbroadcast(g[0] * x[1], x[0].shape), unbroadcast(g[0] * x[0], x[1].shape)]


def _div(node, g, x, y, opset):
    return [unbroadcast(g[0] / x[1], x[0].shape),
            unbroadcast(-g[0] * y[0] / x[1], x[1].shape)]


def _pow(node, g, x, y, opset):
    base, exponent = x[0], x[1]
    return [unbroadcast(g[0] * exponent * np.power(base, exponent - 1), base.shape), None]


def _unary(derivative):
    """A rule for y = f(x) given f'(x, y)."""
    def rule(node, g, x, y, opset):
        return [g[0] * derivative(node, x[0], y[0])] + [None] * (len(x) - 1)
    return rule


def _clip(node, g, x, y, opset):
    low = x[1] if len(x) > 1 and x[1] is not None else node.attr("min", -np.inf)
    high = x[2] if len(x) > 2 and x[2] is not None else node.attr("max", np.inf)
    inside = ((x[0] >= low) & (x[0] <= high)).astype(g[0].dtype)
    return [g[0] * inside] + [None] * (len(x) - 1)


def _gelu(node, x, y):
    if node.attr("approximate", "none") == "tanh":
        inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
        t = np.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * math.sqrt(2 / math.pi) * (
            1 + 3 * 0.044715 * x * x)
    return 0.5 * (1 + _erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf
    return erf(x)


def _hard_sigmoid_slope(node, x, y):
    alpha = node.attr("alpha", 0.2)
    return np.where((y > 0) & (y < 1), alpha, 0.0).astype(x.dtype)


def _hard_swish(node, x, y):
    return np.where(x <= -3, 0.0, np.where(x >= 3, 1.0, (2 * x + 3) / 6)).astype(x.dtype)


UNARY = {
    "Relu": lambda n, x, y: (x > 0).astype(x.dtype),
    "LeakyRelu": lambda n, x, y: np.where(x > 0, 1.0, n.attr("alpha", 0.01)).astype(x.dtype),
    "Sigmoid": lambda n, x, y: y * (1 - y),
    "Tanh": lambda n, x, y: 1 - y * y,
    "Erf": lambda n, x, y: (2 / math.sqrt(math.pi)) * np.exp(-x * x),
    "Exp": lambda n, x, y: y,
    "Log": lambda n, x, y: 1 / x,
    "Sqrt": lambda n, x, y: 0.5 / y,
    "Reciprocal": lambda n, x, y: -y * y,
    "Neg": lambda n, x, y: -np.ones_like(x),
    "Abs": lambda n, x, y: np.sign(x),
    "Softplus": lambda n, x, y: 1 / (1 + np.exp(-x)),
    "Gelu": _gelu,
    "HardSigmoid": _hard_sigmoid_slope,
    "HardSwish": _hard_swish,
}


# -- linear algebra -------------------------------------------------------------------------------
def _matmul(node, g, x, y, opset, wanted=(True, True)):
    a, b = x
    grad = g[0]
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    if a.ndim == 1:
        grad = np.expand_dims(grad, -2)
    if b.ndim == 1:
        grad = np.expand_dims(grad, -1)
    grads = [None, None]
    if wanted[0]:
        grad_a = grad @ _swap_last(b2)
        grads[0] = unbroadcast(grad_a[..., 0, :] if a.ndim == 1 else grad_a, a.shape)
    if wanted[1]:
        grad_b = _swap_last(a2) @ grad
        grads[1] = unbroadcast(grad_b[..., 0] if b.ndim == 1 else grad_b, b.shape)
    return grads


def _gemm(node, g, x, y, opset, wanted=(True, True, True)):
    a, b = x[0], x[1]
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    a_used = a.T if node.attr("transA", 0) else a
    b_used = b.T if node.attr("transB", 0) else b
    grads = [None, None]
    if wanted[0]:
        grad_a = alpha * g[0] @ b_used.T
        grads[0] = np.swapaxes(grad_a, 1, 2) if node.attr("transA", 0) else grad_a
    if wanted[1]:
        grad_b = alpha * np.einsum("mk,pmn->pkn", a_used, g[0])
        grads[1] = np.swapaxes(grad_b, 1, 2) if node.attr("transB", 0) else grad_b
    if len(x) > 2 and x[2] is not None:
        grads.append(unbroadcast(beta * g[0], x[2].shape) if wanted[2] else None)
    return grads


def _conv_pads(node, data, weight, out_shape) -> list[int]:
    """Begin and end pads per spatial axis (explicit `pads` or the auto_pad rule)."""
    spatial = data.ndim - 2
    auto_pad = node.attr("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", "VALID"):
        return list(node.attr("pads") or [0] * (2 * spatial))
    strides = node.attr("strides") or [1] * spatial
    dilations = node.attr("dilations") or [1] * spatial
    begins, ends = [], []
    for i in range(spatial):
        total = max(0, (out_shape[i] - 1) * strides[i] + (weight.shape[2 + i] - 1) * dilations[i]
                    + 1 - data.shape[2 + i])
        begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begins.append(begin)
        ends.append(total - begin)
    return begins + ends


def _conv(node, g, x, y, opset):
    """Input gradient of a (grouped, strided, dilated) convolution: every kernel offset
    scatters its share of the output gradient back onto the input positions it read."""
    data, weight = x[0], x[1]
    spatial = data.ndim - 2
    grad = g[0]
    probes, batch, channels_out = grad.shape[:3]
    out_shape = grad.shape[3:]
    strides = node.attr("strides") or [1] * spatial
    dilations = node.attr("dilations") or [1] * spatial
    pads = _conv_pads(node, data, weight, out_shape)
    groups = node.attr("group", 1)
    channels = data.shape[1]
    padded = np.zeros((probes, batch, channels,
                       *(data.shape[2 + i] + pads[i] + pads[spatial + i] for i in range(spatial))),
                      grad.dtype)
    grouped = grad.reshape(probes, batch, groups, channels_out // groups, *out_shape)
    kernels = weight.reshape(groups, channels_out // groups, channels // groups,
                             *weight.shape[2:])
    for offset in itertools.product(*(range(k) for k in weight.shape[2:])):
        taps = kernels[(slice(None),) * 3 + offset]  # [groups, out/group, in/group]
        share = np.einsum("pbgo...,goc->pbgc...", grouped, taps).reshape(
            probes, batch, channels, *out_shape)
        window = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                       for o, d, n, s in zip(offset, dilations, out_shape, strides))
        padded[(slice(None),) * 3 + window] += share
    inside = tuple(slice(pads[i], pads[i] + data.shape[2 + i]) for i in range(spatial))
    return [padded[(slice(None),) * 3 + inside]] + [None] * (len(x) - 1)


def _global_average_pool(node, g, x, y, opset):
    data = x[0]
    count = int(np.prod(data.shape[2:]))
    return [np.broadcast_to(g[0] / count, (g[0].shape[0], *data.shape))]


# -- shape ops ------------------------------------------------------------------------------------
def _reshape_like(node, g, x, y, opset):
    return [g[0].reshape((g[0].shape[0], *x[0].shape))] + [None] * (len(x) - 1)


def _expand(node, g, x, y, opset):
    return [unbroadcast(g[0], x[0].shape), None]


def _transpose(node, g, x, y, opset):
    perm = node.attr("perm") or list(range(x[0].ndim))[::-1]
    inverse = np.argsort(perm)
    return [np.transpose(g[0], (0, *(int(p) + 1 for p in inverse)))]


def _concat(node, g, x, y, opset):
    axis = _axis(node.attr("axis"), y[0].ndim)
    bounds = np.cumsum([part.shape[axis - 1] for part in x])[:-1]
    return list(np.split(g[0], bounds, axis=axis))


def _split(node, g, x, y, opset):
    axis = _axis(node.attr("axis", 0), x[0].ndim)
    return [np.concatenate(g, axis=axis)] + [None] * (len(x) - 1)


def _slice(node, g, x, y, opset):
    data = x[0]
    if opset >= 10:
        starts, ends = x[1], x[2]
        axes = x[3] if len(x) > 3 and x[3] is not None else range(len(starts))
        steps = x[4] if len(x) > 4 and x[4] is not None else [1] * len(starts)
    else:
        starts, ends = node.attr("starts"), node.attr("ends")
        axes = node.attr("axes") or range(len(starts))
        steps = [1] * len(starts)
    index = [slice(None)] * (data.ndim + 1)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[_axis(int(axis), data.ndim)] = slice(*slice(int(start), int(end), int(step))
                                                   .indices(data.shape[int(axis)]))
    grad = np.zeros((g[0].shape[0], *data.shape), g[0].dtype)
    grad[tuple(index)] = g[0]
    return [grad] + [None] * (len(x) - 1)


def _where(node, g, x, y, opset):
    condition = x[0].astype(bool)
    return [None, unbroadcast(np.where(condition, g[0], 0), x[1].shape),
            unbroadcast(np.where(condition, 0, g[0]), x[2].shape)]


# -- normalization and reductions -----------------------------------------------------------------
def _softmax(node, g, x, y, opset):
    out = y[0]
    axis = node.attr("axis", -1 if opset >= 13 else 1)
    axis = axis + out.ndim if axis < 0 else axis
    if opset >= 13:
        dims = (axis + 1,)
    else:  # opset < 13: softmax over the flattened trailing dims from `axis` on
        dims = tuple(range(axis + 1, out.ndim + 1))
    if node.op_type == "LogSoftmax":
        return [g[0] - np.exp(out) * g[0].sum(axis=dims, keepdims=True)]
    return [out * (g[0] - (g[0] * out).sum(axis=dims, keepdims=True))]


def _layer_norm(node, g, x, y, opset):
    data, scale = x[0], x[1]
    axis = node.attr("axis", -1)
    axis = axis + data.ndim if axis < 0 else axis
    dims = tuple(range(axis, data.ndim))
    mean = data.mean(axis=dims, keepdims=True)
    centered = data - mean
    std = np.sqrt((centered ** 2).mean(axis=dims, keepdims=True) + node.attr("epsilon", 1e-5))
    normalized = centered / std
    probe_dims = tuple(d + 1 for d in dims)
    scaled = g[0] * scale
    grad = (scaled - scaled.mean(axis=probe_dims, keepdims=True)
            - normalized * (scaled * normalized).mean(axis=probe_dims, keepdims=True)) / std
    return [grad] + [None] * (len(x) - 1)


def _batch_norm(node, g, x, y, opset):
    scale, variance = x[1], x[4]
    factor = scale / np.sqrt(variance + node.attr("epsilon", 1e-5))
    shape = (1, -1) + (1,) * (x[0].ndim - 2)
    return [g[0] * factor.reshape(shape), None, None, None, None]


def _reduce_axes(node, data, x, opset) -> tuple[int, ...] | None:
    """The reduced axes of a Reduce* node (attribute or, from opset 13/18, second input)."""
    axes = x[1] if len(x) > 1 and x[1] is not None else node.attr("axes")
    if axes is None or len(axes) == 0:
        if node.attr("noop_with_empty_axes", 0):
            return None
        return tuple(range(data.ndim))
    return tuple(int(a) + data.ndim if a < 0 else int(a) for a in np.ravel(axes))


def _reduce(node, g, x, y, opset):
    data = x[0]
    axes = _reduce_axes(node, data, x, opset)
    if axes is None:
        return [g[0]] + [None] * (len(x) - 1)
    kept = [1 if i in axes else d for i, d in enumerate(data.shape)]
    grad = g[0].reshape((g[0].shape[0], *kept))
    if node.op_type == "ReduceMean":
        grad = grad / max(1, int(np.prod([data.shape[a] for a in axes])))
    elif node.op_type == "ReduceL2":
        grad = grad * data / np.maximum(y[0].reshape(kept), 1e-30)
    elif node.op_type == "ReduceSumSquare":
        grad = grad * 2 * data
    return [np.broadcast_to(grad, (grad.shape[0], *data.shape))] + [None] * (len(x) - 1)


def _identity(node, g, x, y, opset):
    return [g[0]] + [None] * (len(x) - 1)


VJP_RULES = {
    "Add": _add, "Sub": _sub, "Mul": _mul, "Div": _div, "Pow": _pow,
    "Clip": _clip, "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv,
    "GlobalAveragePool": _global_average_pool,
    "Reshape": _reshape_like, "Flatten": _reshape_like, "Squeeze": _reshape_like,
    "Unsqueeze": _reshape_like, "Expand": _expand, "Transpose": _transpose,
    "Concat": _concat, "Split": _split, "Slice": _slice, "Where": _where,
    "Softmax": _softmax, "LogSoftmax": _softmax, "LayerNormalization": _layer_norm,
    "BatchNormalization": _batch_norm,
    "ReduceSum": _reduce, "ReduceMean": _reduce, "ReduceL2": _reduce, "ReduceSumSquare": _reduce,
    "Identity": _identity, "Cast": _identity, "Dropout": _identity,
    **{op: _unary(derivative) for op, derivative in UNARY.items()},
}


# Rules that can leave out the gradient of an input no one reads: for a weight it costs as much
# as the input's gradient (a [K, in, out] product) and the caller drops it anyway.
SELECTIVE_RULES = {"MatMul", "Gemm"}


def pull_back(node: Node, grads, inputs, outputs, opset: int,
              wanted: list[bool] | None = None) -> list[np.ndarray | None]:
    """Input gradients of `node` (see the module docstring); NotDifferentiable without a rule.
    `wanted` (one flag per input) lets MatMul and Gemm skip the gradients flagged False (None
    in their place)."""
    rule = VJP_RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if rule is None:
        raise NotDifferentiable(f"no gradient rule for {node.op_type} (node {node.name!r})")
    probes = next(grad.shape[0] for grad in grads if grad is not None)
    filled = [grad if grad is not None or out is None
              else np.zeros((probes, *out.shape), out.dtype)
              for grad, out in zip(grads, outputs)]
    if wanted is not None and node.op_type in SELECTIVE_RULES:
        flags = list(wanted) + [True] * (len(inputs) - len(wanted))
        return rule(node, filled, inputs, outputs, opset, wanted=flags)
    return rule(node, filled, inputs, outputs, opset)
