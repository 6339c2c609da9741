"""int8 BSR / dense kernels with requantization fused into the store.

Quantization (what `quantize_params` folds, ONNX QLinear conventions):
    X  int8 [b, K, P], scale sx, zero point zx          (per tensor)
    W  int8 [N, K], scales sw[N], zero point 0           (symmetric, per output channel)
    Y  int8 [b, N, P], scale sy, zero point zy
    acc[n, p] = sum_k W[n, k] * X[k, p]                  (int32)
    Y = clamp(nearbyint((acc + bias_q[n]) * mult[n]) + zy, lo, 127)
with bias_q[n] = nearbyint(bias[n] / (sx * sw[n])) - zx * sum_k W[n, k] (the activation zero
point folded in at compile time), mult[n] = sx * sw[n] / sy (float32), lo = zy with ReLU fused,
else -128. A dense weight is the BSR weight with every block kept (`to_bsr` of it).

Inner products, by `method`:
    "int32"  widen to int32 and multiply-add (every target; LLVM vectorizes it over P)
    "madd"   x86 AVX2 `vpmaddwd`: X as int16 pairs [b, K/2, P*2], one weight pair broadcast;
             8 outputs x 2 k per instruction, exact (int16 x int16 -> int32 pair sums)
    "sdot"   ARM dot product (Cortex-A76 / +dotprod): X as int8 quads [b, K/4, P*4], one weight
             quad broadcast; 4 outputs x 4 k per instruction
    "vnni"   x86 AVX-512 VNNI `vpdpbusd`: X as uint8 quads [b, K/4, P*4] (unsigned: the
             activations are not shifted), one weight quad broadcast; 16 outputs x 4 k
"madd" needs block columns C % 2 == 0, "sdot"/"vnni" C % 4 == 0 (blocks cover whole pairs/quads),
and K divisible by 2 / 4; `pack_activations` lays X out for them. Dense MatMul/Gemm on an
AVX-512 VNNI CPU use the row-layout `vpdpbusd` kernel in vnni.py instead (qdq.py decides).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bsr import BSR
from .vnni import has_vnni

__all__ = ["QuantParams", "quantize_params", "dequantize_params", "bsr_int8_kn",
           "pack_activations", "requantize_ref",
           "int8_method_for"]


@dataclass(frozen=True)
class QuantParams:
    bias_q: np.ndarray      # int32 [N]
    mult: np.ndarray        # float32 [N]
    zy: int
    relu: bool


def quantize_params(weight_q: np.ndarray, sx: float, zx: int, sw, sy: float, zy: int,
                    bias: np.ndarray | None = None, relu: bool = False) -> QuantParams:
    """Fold scales, zero points and bias into the per-channel int32 bias and float multiplier."""
    n = weight_q.shape[0]
    sw = np.broadcast_to(np.asarray(sw, np.float32).reshape(-1), (n,))
    row_sums = weight_q.reshape(n, -1).astype(np.int64).sum(axis=1)
    bias_q = np.zeros(n, np.int64) if bias is None else \
        np.rint(np.asarray(bias, np.float64) / (np.float64(sx) * sw)).astype(np.int64)
    bias_q = bias_q - int(zx) * row_sums
    mult = (np.float32(sx) * sw / np.float32(sy)).astype(np.float32)
    return QuantParams(bias_q.astype(np.int32), mult, int(zy), bool(relu))


def dequantize_params(weight_q: np.ndarray, sx: float, zx: int, sw) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """(B int32 [N], M float32 [N]) for the float-output kernel: B = -zx * row sums of W (the
    activation zero point), M = sx * sw[n]."""
    n = weight_q.shape[0]
    sw = np.broadcast_to(np.asarray(sw, np.float32).reshape(-1), (n,))
    row_sums = weight_q.reshape(n, -1).astype(np.int64).sum(axis=1)
    return (-int(zx) * row_sums).astype(np.int32), (np.float32(sx) * sw).astype(np.float32)


def requantize_ref(acc: np.ndarray, q: QuantParams) -> np.ndarray:
    """numpy reference of the fused store, acc int32 [b, N, P]."""
    scaled = (acc + q.bias_q[:, None]).astype(np.float32) * q.mult[:, None]
    lo = q.zy if q.relu else -128
    return np.clip(np.rint(scaled) + q.zy, lo, 127).astype(np.int8)


def int8_method_for(target, block_cols: int, k: int) -> str:
    """The fastest inner product the target and the block shape allow."""
    from .bsr import _target_attrs
    config = _target_attrs(target)
    mattr = " ".join(config.get("mattr", []) or [])
    triple = str(config.get("mtriple", ""))
    mcpu = str(config.get("mcpu", ""))
    if triple.startswith("aarch64") and ("+dotprod" in mattr or "cortex-a76" in mcpu) \
            and block_cols % 4 == 0 and k % 4 == 0:
        return "sdot"
    if block_cols % 4 == 0 and k % 4 == 0 and has_vnni(config):
        return "vnni"
    if not triple.startswith(("aarch64", "arm")) and block_cols % 2 == 0 and k % 2 == 0:
        return "madd"
    return "int32"


def pack_activations(x: np.ndarray, method: str) -> np.ndarray:
    """X int8 [b, K, P] in the layout `method` reads (see module doc)."""
    if method == "int32":
        return np.ascontiguousarray(x)
    group, dtype = {"madd": (2, np.int16), "sdot": (4, np.int8), "vnni": (4, np.uint8)}[method]
    b, k, p = x.shape
    return np.ascontiguousarray(x.reshape(b, k // group, group, p).transpose(0, 1, 3, 2)
                                .astype(dtype)).reshape(b, k // group, p * group)


def _packed_weights(bsr: BSR, method: str) -> np.ndarray:
    """BSR data [nnzb, R, C] as one int32 per weight pair (madd) or quad (sdot), so the kernel
    broadcasts a single int32 and reinterprets it as int16x16 / int8x16."""
    if method == "int32":
        return bsr.data.astype(np.int8)
    group, dtype = (2, np.int16) if method == "madd" else (4, np.int8)   # sdot / vnni: quads
    nnzb, r, c = bsr.data.shape
    grouped = np.ascontiguousarray(bsr.data.astype(dtype).reshape(nnzb, r, c // group, group))
    return grouped.view(np.int32).reshape(nnzb, r, c // group)


def bsr_int8_kn(bsr: BSR, batch: int, p: int, q_relu: bool = False, *, method: str = "int32",
                lanes: int = 8, tile_p: int | None = None, out_dtype: str = "int8"):
    """(PrimFunc, packed weight data) for Y int8 = requant(W @ X). PrimFunc arguments:
    `(X packed, data packed, data int8 [nnzb, R, C], indices, indptr, bias_q int32[N],
    mult f32[N], zy int32[1], Y int8[b, N, P])` (the plain int8 data serves the ragged P tail of
    the packed methods). `q_relu` fuses ReLU (the lower clamp becomes zy).

    out_dtype="float32" dequantizes instead of requantizing (for a QDQ graph whose consumer is
    float): Y = float32(acc + B[n]) * M[n] + F[n] (ReLU), with the argument `Z` replaced by the
    float bias F[N]; use `dequantize_params` for B and M."""
    from tvm.script import tirx as T

    n, k = bsr.shape
    r, c = bsr.block
    nb = bsr.block_rows
    nnzb = int(bsr.data.shape[0])
    group = {"int32": 1, "madd": 2, "sdot": 4, "vnni": 4}[method]
    if c % group or k % group:
        raise ValueError(f"method {method!r} needs block columns and K divisible by {group}")
    width = {"int32": lanes, "madd": 8, "sdot": 4, "vnni": 16}[method]     # outputs per vector
    if tile_p is None:
        tile_p = width * max(1, min(4, 8 // max(r, 1)))
    tp = max(width, (min(tile_p, p) // width) * width) if p >= width else p
    if method == "int32":
        tp = min(tile_p, p)
    tiles, rest = divmod(p, tp)
    ragged_rows = n % r != 0
    ragged_cols = k % c != 0
    cg = c // group
    data = _packed_weights(bsr, method)
    w_dtype = "int8" if method == "int32" else "int32"
    relu = bool(q_relu)
    if out_dtype not in ("int8", "float32"):
        raise ValueError(f"out_dtype must be int8 or float32, not {out_dtype!r}")
    z_shape, z_dtype = ((1,), "int32") if out_dtype == "int8" else ((n,), "float32")

    if method == "int32":
        x_shape = (batch, k, p)
    else:
        x_shape = (batch, k // group, p * group)
    x_dtype = {"int32": "int8", "madd": "int16", "sdot": "int8", "vnni": "uint8"}[method]

    @T.macro
    def product(acc, x, w_data, w_indices, j, b, p0, a0):
        # acc[rr, a0:a0+width] += W block row rr . X[:, p0+a0 : p0+a0+width] (one vector each)
        if method == "madd":
            for cg_ in T.unroll(cg):
                for rr in T.unroll(r):
                    acc[rr, T.ramp(a0, 1, 8)] = acc[rr, T.ramp(a0, 1, 8)] + T.call_llvm_pure_intrin(
                        "int32x8", "llvm.x86.avx2.pmadd.wd",
                        x[b, w_indices[j] * cg + cg_, T.ramp((p0 + a0) * 2, 1, 16)],
                        T.reinterpret("int16x16", T.broadcast(w_data[j, rr, cg_], 8)))
        elif method == "vnni":
            for cg_ in T.unroll(cg):
                for rr in T.unroll(r):
                    acc[rr, T.ramp(a0, 1, 16)] = T.call_llvm_pure_intrin(
                        "int32x16", "llvm.x86.avx512.vpdpbusd.512",
                        acc[rr, T.ramp(a0, 1, 16)],
                        T.reinterpret("int8x64",
                                      x[b, w_indices[j] * cg + cg_, T.ramp((p0 + a0) * 4, 1, 64)]),
                        T.reinterpret("int8x64", T.broadcast(w_data[j, rr, cg_], 16)))
        else:
            for cg_ in T.unroll(cg):
                for rr in T.unroll(r):
                    acc[rr, T.ramp(a0, 1, 4)] = T.call_llvm_pure_intrin(
                        "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8",
                        acc[rr, T.ramp(a0, 1, 4)],
                        x[b, w_indices[j] * cg + cg_, T.ramp((p0 + a0) * 4, 1, 16)],
                        T.reinterpret("int8x16", T.broadcast(w_data[j, rr, cg_], 4)))

    @T.macro
    def product_scalar(acc, x, w_data, raw, w_indices, j, b, p0, wd):
        # Any layout, any width: the int32 path (and the ragged P tail of madd / sdot).
        for cc in T.unroll(c):
            for rr in T.unroll(r):
                for pp in T.vectorized(wd):
                    if method == "int32":
                        if ragged_cols:
                            acc[rr, pp] = acc[rr, pp] + T.Cast("int32", w_data[j, rr, cc]) * \
                                T.Cast("int32", x[b, T.min(w_indices[j] * c + cc, k - 1), p0 + pp])
                        else:
                            acc[rr, pp] = acc[rr, pp] + T.Cast("int32", w_data[j, rr, cc]) * \
                                T.Cast("int32", x[b, w_indices[j] * c + cc, p0 + pp])
                    else:
                        acc[rr, pp] = acc[rr, pp] + T.Cast("int32", raw[j, rr, cc]) * T.Cast(
                            "int32", x[b, w_indices[j] * cg + cc // group,
                                       (p0 + pp) * group + cc % group])

    @T.macro
    def tile(x, w_data, raw, w_indices, w_indptr, w_bias, w_mult, zero_point, y, bi, b, p0, wt):
        acc = T.decl_buffer((r, wt), "int32", scope="local")
        for rr in T.unroll(r):
            for pp in T.vectorized(wt):
                acc[rr, pp] = 0
        for j in range(w_indptr[bi], w_indptr[bi + 1]):
            if method == "int32" or wt % width != 0:
                product_scalar(acc, x, w_data, raw, w_indices, j, b, p0, wt)
            else:
                for v in T.unroll(wt // width):
                    product(acc, x, w_data, w_indices, j, b, p0, v * width)
        for rr in T.unroll(r):
            if not ragged_rows or bi * r + rr < n:
                for pp in T.vectorized(wt):
                    if out_dtype == "int8":
                        y[b, bi * r + rr, p0 + pp] = T.Cast("int8", T.max(T.min(
                            T.Cast("int32", T.nearbyint(
                                T.Cast("float32", acc[rr, pp] + w_bias[bi * r + rr])
                                * w_mult[bi * r + rr])) + zero_point[0], 127),
                            zero_point[0] if relu else -128))
                    elif relu:
                        y[b, bi * r + rr, p0 + pp] = T.max(
                            T.Cast("float32", acc[rr, pp] + w_bias[bi * r + rr])
                            * w_mult[bi * r + rr] + zero_point[bi * r + rr], T.float32(0))
                    else:
                        y[b, bi * r + rr, p0 + pp] = \
                            T.Cast("float32", acc[rr, pp] + w_bias[bi * r + rr]) \
                            * w_mult[bi * r + rr] + zero_point[bi * r + rr]

    @T.prim_func
    def bsr_int8(X: T.Buffer(x_shape, x_dtype), data: T.Buffer((nnzb, r, c // group), w_dtype),
                 R: T.Buffer((nnzb, r, c), "int8"),
                 indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
                 B: T.Buffer((n,), "int32"), M: T.Buffer((n,), "float32"),
                 Z: T.Buffer(z_shape, z_dtype), Y: T.Buffer((batch, n, p), out_dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for b in range(batch):
            for bi in T.parallel(nb):
                for t in range(tiles):
                    tile(X, data, R, indices, indptr, B, M, Z, Y, bi, b, t * tp, tp)
                if rest > 0:
                    tile(X, data, R, indices, indptr, B, M, Z, Y, bi, b, tiles * tp, rest)

    return bsr_int8, data
