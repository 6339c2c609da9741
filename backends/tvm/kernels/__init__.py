"""Our own TVM kernels: block-sparse (BSR) and dense fp32 matmul/conv kernels as TVMScript,
the cost model that picks between them, and `dispatch`, the hook `backends.tvm.lower` calls.

    bsr.py     dense weight -> BSR; the BSR kernel (K-major activations, register tiles)
    dense.py   our dense kernel in the same schedule style (the fair baseline)
    im2col.py  a general Conv (kxk, stride, padding, dilation) as a matrix product
    ell.py     the BSR product as schedulable blocked-ELL TIR that MetaSchedule can tune
    choice.py  formats per sparsity pattern, break-even densities per target, Relax emitters
    int8.py    int8 BSR/dense kernel: int32 accumulation (vpmaddwd / sdot), fused requantize
    vnni.py    dense int8 MatMul with AVX-512 VNNI (vpdpbusd) on row-layout activations
    qdq.py     QDQ MatMul/Gemm/Conv -> the int8 kernel (dequantizing store)
    qdq_pair.py  QDQ MatMul of two activations (attention) -> the batched VNNI kernel
    cuda.py    the BSR kernel and the dp4a int8 MatMul for CUDA (compile-checked only)
    tune.py    searching our BSR kernel's schedule knobs on the real pattern

`dispatch(ctx, node)` first sends QDQ-quantized MatMul/Gemm/Conv (weight with `meta["quant"]`)
to the int8 kernel when the target has a vector int8 product (see qdq.py), and a QDQ MatMul of
two activations to the batched VNNI kernel on AVX-512 VNNI targets (qdq_pair.py). Otherwise it handles
MatMul (constant 2-D weight), Gemm (transA=0, constant B, bias broadcast along N) and Conv
(group 1, 2-D; kxk / strided / padded / dilated ones through im2col) in float32, when the
weight's `meta["sparsity"]` makes the BSR kernel the faster choice (choice.py). It returns None
(dense lowering) in every other case. The target comes from `ctx.target` (TargetSpec, target
dict or tvm Target) when the lowering sets it; without it the host's x86 choices apply and the
int8 path is off. With `ctx.tunable_kernels` (lower_model's `tunable_kernels=True`) the sparse
product is the blocked-ELL kernel MetaSchedule can tune instead of our pre-scheduled BSR kernel.
The decision is written into `ctx.weight_meta[weight]["kernel"]`, which the backend reports per
layer (manifest `weight_meta`): kernel, format, pattern, block, block density, threshold,
im2col and the reason in words.
"""

from __future__ import annotations

import numpy as np

from .bsr import BSR, to_bsr, bsr_matmul_kn, cpu_schedule
from .choice import (BREAK_EVEN_DENSITY, KernelChoice, choose_kernel, emit_sparse_conv,
                     emit_sparse_conv1x1, emit_sparse_matmul, kernel_choice, storage_format,
                     target_family)
from .dense import dense_matmul_kn
from .ell import to_ell
from .im2col import ConvGeometry, conv_geometry
from .qdq import emit_int8
from .qdq_pair import emit_int8_pair

__all__ = ["dispatch", "target_of", "choose_kernel", "kernel_choice", "emit_sparse_matmul",
           "emit_sparse_conv1x1", "emit_sparse_conv", "storage_format", "target_family",
           "BREAK_EVEN_DENSITY",
           "KernelChoice", "BSR", "to_bsr", "bsr_matmul_kn", "dense_matmul_kn", "cpu_schedule"]


def target_of(ctx):
    """The lowering target as a dict or tvm Target; None when the context has none (then the
    float BSR kernel, plain portable TIR, is still used and scheduled for x86 AVX2, while the
    int8 kernels, which call target-specific intrinsics, are not)."""
    target = getattr(ctx, "target", None)
    if target is not None and hasattr(target, "config"):       # backends.tvm.targets.TargetSpec
        return target.config
    return target


def _weight_and_bias(ctx, node):
    """(W[N, K] out x in, bias[N] or None, kind) of a supported node, else None; kind is
    "matmul" or, for a Conv, its `ConvGeometry`."""
    w_value = node.input(1)
    if not ctx.is_known(w_value) or str(np.dtype(w_value.dtype)) != "float32":
        return None
    w = np.asarray(ctx.const(w_value), np.float32)
    x_shape = ctx.shape(node.inputs[0])
    if node.op_type == "MatMul":
        if w.ndim != 2 or len(x_shape) < 2:
            return None
        return w.T, None, "matmul"
    if node.op_type == "Gemm":
        if node.attr("transA", 0) or w.ndim != 2:
            return None
        weight = (w if node.attr("transB", 0) else w.T) * float(node.attr("alpha", 1.0))
        c = node.input(2)
        bias = None
        if c is not None and float(node.attr("beta", 1.0)) != 0.0:
            if not ctx.is_known(c):
                return None
            c_array = np.asarray(ctx.const(c), np.float32)
            n = weight.shape[0]
            if c_array.size not in (1, n) or (c_array.ndim == 2 and c_array.shape[0] != 1):
                return None                               # a bias varying along M: not fused
            bias = np.broadcast_to(c_array.reshape(-1), (n,)) * float(node.attr("beta", 1.0))
        return weight, bias, "matmul"
    if node.op_type == "Conv":
        geometry = conv_geometry(node, x_shape, w.shape)
        if geometry is None:
            return None
        b = node.input(2)
        if b is not None and not ctx.is_known(b):
            return None
        bias = None if b is None else np.asarray(ctx.const(b), np.float32)
        return w.reshape(w.shape[0], -1), bias, geometry
    return None


def dispatch(ctx, node):
    """Lower `node` with our BSR kernel when its weight's sparsity pays (see module doc);
    None lets `backends.tvm.lower` use the dense lowering."""
    w_value = node.input(1)
    meta = ctx.weight_meta_of(w_value)
    if str(np.dtype(node.output.dtype)) != "float32":
        return None
    name = "".join(ch if ch.isalnum() else "_" for ch in (node.name or node.op_type))
    target = target_of(ctx)
    if "quant" in meta and target is not None and target_family(target) != "cuda":
        pair = node.op_type == "MatMul" and not ctx.is_known(w_value)
        emitted = (emit_int8_pair(ctx, node, target, name) if pair
                   else emit_int8(ctx, node, meta, target, name))
        if emitted is not None:
            result, record = emitted
            _record(ctx, w_value, record)
            return result
    if "sparsity" not in meta:
        return None
    found = _weight_and_bias(ctx, node)
    if found is None:
        _record(ctx, w_value, {"kernel": "dense", "reason": f"{node.op_type} form not handled "
                                                           f"by the BSR kernel"})
        return None
    weight, bias, kind = found
    im2col = isinstance(kind, ConvGeometry) and not kind.is_pointwise
    tunable = bool(getattr(ctx, "tunable_kernels", False))
    choice = kernel_choice(meta, weight, target, im2col=im2col, tunable=tunable)
    record = dict(choice.as_dict(), node=node.name)
    if choice.kernel == "ell":
        # the extra multiply-adds of padding every block row to the longest one
        record["ell_padding"] = round(to_ell(to_bsr(weight, choice.block)).padding, 3)
    _record(ctx, w_value, record)
    if choice.kernel not in ("bsr", "ell"):
        return None
    x = ctx.expr(node.inputs[0])
    if not isinstance(kind, ConvGeometry):
        return emit_sparse_matmul(ctx.bb, x, weight, bias, meta, target, name=name,
                                  make_param=ctx.param, tunable=tunable)
    return emit_sparse_conv(ctx.bb, x, weight, bias, meta, target, kind, name=name,
                            make_param=ctx.param, tunable=tunable)


def _record(ctx, w_value, info: dict) -> None:
    table = getattr(ctx, "weight_meta", None)
    if isinstance(table, dict):
        table.setdefault(w_value.name, {})["kernel"] = info
