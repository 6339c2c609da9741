"""Which kernel a weight gets (a small cost model), and emitting our kernels into a Relax module.

Cost model. Our BSR kernel does `block_density` of the dense kernel's multiply-adds, each a little
dearer (an index load per block, a row loop per block row). It wins when

    block_density < threshold[target family][block class]

The thresholds are break-even block densities measured with `bench/sparse_kernels.py` (MiniLM FFN
and ResNet 1x1 shapes, ours sparse vs ours dense, x86 AVX2, bench/results/sparse_kernels.md),
rounded down: 4x1 blocks were 1.5-2.2x faster than dense at density 0.5 (0.9x for a K = 64 conv)
-> 0.45; 1x1 blocks (CSR) broke even near 0.5 (0.8-1.0x) and gave 1.7-2x at 0.3 -> 0.3.
A Conv that is not pointwise runs as im2col + BSR (`im2col.py`) against TVM's own conv2d (with
our default schedule's register tile), with an extra im2col pass: its own class "im2col", and
the lower of the two thresholds applies. Measured with `bench/sparse_kernels.py --conv` (3x3
ResNet convs, whole lowered modules): 4x1 blocks gave 0.87-3.9x of dense at block density 0.5
and 1.36-5.4x at 0.3 -> 0.4; 1x1 blocks (CSR) 0.36-2.05x at 0.5 and 1.44-1.86x at 0.3, so
their own 0.3 applies. ARM values are not measured (no board here): they
reuse the x86 numbers. The CUDA kernel (`cuda.py`) is compile-checked only, so GPU targets
always get dense.

Formats (`storage_format`), the nearest efficient format for each recorded pattern:
- "block" R x C: BSR with the same R x C blocks.
- "unstructured": BSR with 1x1 blocks (CSR), the only block shape that keeps all its zeros;
  it pays below the "narrow" threshold (0.3 on x86), so an 80% unstructured weight runs sparse
  and a 50% one dense.
- N:M (2:4): N nonzeros in every M consecutive inputs of a row. Every block of a CPU-friendly
  shape (4x1, 1x4, ...) keeps a nonzero, so the nearest format that keeps its zeros is again
  CSR (1x1) at density N/M: 2:4 (0.5) is above the CSR break-even and runs dense, 1:4 (0.25)
  runs as CSR. Its truly efficient form, NVIDIA's sparse tensor cores (`mma.sp`), is not
  scheduled by TVM, so GPU targets get dense.
The choice, the pattern, the format, the reason and the numbers are recorded per layer
(`KernelChoice.as_dict`, in the manifest's `weight_meta[...]["kernel"]`).

With `tunable=True` the sparse choice emits the blocked-ELL kernel (`ell.py`, kernel "ell")
that MetaSchedule can tune, instead of our pre-scheduled BSR kernel (kernel "bsr"); the
thresholds are the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .bsr import BSR, bsr_matmul_kn, cpu_schedule, to_bsr

__all__ = ["KernelChoice", "BREAK_EVEN_DENSITY", "storage_format", "kernel_choice",
           "choose_kernel", "emit_sparse_matmul", "emit_sparse_conv1x1", "emit_sparse_conv",
           "pattern_name", "target_family"]

# target family -> block class -> largest block density at which BSR is still chosen.
# "vector": blocks with >= 4 output rows (each weight feeds a 4+ row register tile);
# "narrow": 1 or 2 output rows (CSR-like; more index loads per multiply-add);
# "im2col": a kxk / strided / padded Conv through im2col (see module doc).
BREAK_EVEN_DENSITY = {
    "x86": {"vector": 0.45, "narrow": 0.3, "im2col": 0.4},
    "arm": {"vector": 0.45, "narrow": 0.3, "im2col": 0.4},
    "cuda": {"vector": 0.0, "narrow": 0.0, "im2col": 0.0},
}


@dataclass
class KernelChoice:
    kernel: str                      # "bsr" | "ell" (tunable BSR) | "dense"
    format: str                      # "bsr RxC" | "ell RxC" | "dense"
    block: tuple[int, int] | None
    block_density: float | None      # measured on the weight with that block
    threshold: float | None
    reason: str
    pattern: str = "none"            # the recorded sparsity pattern: "block 4x1", "2:4", ...
    im2col: bool = False             # a Conv run as im2col + matrix product

    def as_dict(self) -> dict:
        out = asdict(self)
        out["block"] = list(self.block) if self.block else None
        return out


def target_family(target) -> str:
    """"cuda" | "arm" | "x86" from a target dict / tvm.target.Target / None (host)."""
    if target is None:
        return "x86"
    if isinstance(target, dict):
        kind, triple, mcpu = target.get("kind"), target.get("mtriple", ""), target.get("mcpu", "")
    else:
        kind = target.kind.name
        triple = str(target.attrs.get("mtriple", "")) if "mtriple" in target.attrs else ""
        mcpu = str(target.attrs.get("mcpu", "")) if "mcpu" in target.attrs else ""
    if kind in ("cuda", "rocm", "vulkan", "opencl", "metal"):
        return "cuda"
    if str(triple).startswith(("aarch64", "arm")) or "cortex" in str(mcpu):
        return "arm"
    return "x86"


def pattern_name(meta: dict | None) -> str:
    """The recorded pattern in words: "block 4x1", "2:4", "unstructured" or "none"."""
    sparsity = (meta or {}).get("sparsity") or {}
    pattern = sparsity.get("pattern")
    if pattern == "block":
        r, c = (int(v) for v in sparsity.get("block", (4, 1)))
        return f"block {r}x{c}"
    if pattern == "n:m":
        return f"{int(sparsity.get('n', 2))}:{int(sparsity.get('m', 4))}"
    return pattern or "none"


def storage_format(meta: dict | None) -> tuple[str, tuple[int, int] | None, str]:
    """(format, block, why) for a weight's `meta["sparsity"]`: the nearest efficient format
    (see module doc)."""
    sparsity = (meta or {}).get("sparsity") or {}
    pattern = sparsity.get("pattern")
    if pattern == "block":
        r, c = (int(v) for v in sparsity.get("block", (4, 1)))
        return "bsr", (r, c), f"block {r}x{c} pattern kept as BSR {r}x{c}"
    if pattern == "unstructured":
        return "bsr", (1, 1), "unstructured zeros stored as BSR 1x1 (CSR)"
    if pattern == "n:m":
        n, m = int(sparsity.get("n", 2)), int(sparsity.get("m", 4))
        return "bsr", (1, 1), (f"{n}:{m} leaves a nonzero in every CPU-sized block: nearest "
                               f"format BSR 1x1 (CSR); its tensor-core form (mma.sp) is not "
                               f"scheduled by TVM")
    return "dense", None, "no sparsity recorded"


def kernel_choice(weight_meta: dict | None, weight: np.ndarray | None, target,
                  shape: tuple[int, ...] | None = None, *, im2col: bool = False,
                  tunable: bool = False) -> KernelChoice:
    """The kernel for a weight W[N, K] (out x in) under `weight_meta` on `target`. The block
    density is measured on `weight` when given (what the kernel will do), else taken from the
    recorded density (an estimate for blocks: recorded zeros may not fill whole blocks).
    `im2col`: the weight is a non-pointwise Conv's; `tunable`: a sparse choice is the
    MetaSchedule-tunable ELL kernel."""
    fmt, block, why = storage_format(weight_meta)
    pattern = pattern_name(weight_meta)
    if fmt == "dense":
        return KernelChoice("dense", "dense", None, None, None, why, pattern, im2col)
    family = target_family(target)
    thresholds = BREAK_EVEN_DENSITY[family]
    threshold = thresholds["vector" if block[0] >= 4 else "narrow"]
    if im2col:
        threshold = min(threshold, thresholds["im2col"])
    if weight is not None:
        density = to_bsr(np.asarray(weight).reshape(weight.shape[0], -1), block).block_density
    else:
        density = float((weight_meta.get("sparsity") or {}).get("density", 1.0))
    via = " via im2col" if im2col else ""
    if family == "cuda":
        return KernelChoice("dense", "dense", block, density, threshold,
                            f"{why}; no BSR kernel scheduled for GPU targets: dense", pattern,
                            im2col)
    if density < threshold:
        kernel = "ell" if tunable else "bsr"
        return KernelChoice(kernel, f"{kernel} {block[0]}x{block[1]}", block, density,
                            threshold, f"{why}; block density {density:.3f} < break-even "
                            f"{threshold} on {family}{via}"
                            + ("; blocked-ELL, tunable by MetaSchedule" if tunable else ""),
                            pattern, im2col)
    return KernelChoice("dense", "dense", block, density, threshold,
                        f"{why}; block density {density:.3f} >= break-even {threshold} on "
                        f"{family}{via}: dense is faster", pattern, im2col)


def choose_kernel(weight_meta: dict | None, shape, target, weight: np.ndarray | None = None) -> str:
    """"bsr" | "dense" for a weight with metadata `weight_meta` (see `kernel_choice`)."""
    return kernel_choice(weight_meta, weight, target, shape).kernel


# -- emitting into Relax --------------------------------------------------------------------------
def _static_shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def _const_maker(bb):
    from tvm import relax

    def make(name, array):
        return relax.const(np.ascontiguousarray(array))
    return make


def _call_bsr(bb, x3, bsr: BSR, bias, relu, target, make_param, name):
    """call_tir of the BSR kernel on x3 = [batch, K, P]; returns [batch, N, P]."""
    from tvm import relax

    batch, _, p = _static_shape(x3)
    n = bsr.shape[0]
    func = bsr_matmul_kn(bsr, batch, p, relu=relu, schedule=cpu_schedule(target))
    # TVMScript names every kernel "bsr_kn"; without the symbol, TVM names it after the GlobalVar
    # that add_func makes unique.
    gvar = bb.add_func(func.without_attr("global_symbol"), f"bsr_{name}")
    bias = np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(n)
    args = [x3, make_param(f"{name}_bsr_data", bsr.data.astype(np.float32)),
            make_param(f"{name}_bsr_indices", bsr.indices),
            make_param(f"{name}_bsr_indptr", bsr.indptr),
            make_param(f"{name}_bias", bias)]
    return bb.emit(relax.call_tir(gvar, args, out_ty=relax.TensorType([batch, n, p], "float32")))


def _call_ell(bb, x3, bsr: BSR, bias, relu, target, make_param, name):
    """The same product as `_call_bsr` through the schedulable blocked-ELL kernel (`ell.py`):
    MetaSchedule can tune it; untuned it gets the default CPU schedule."""
    from tvm import relax

    from .ell import ell_matmul_kn, to_ell

    batch, _, p = _static_shape(x3)
    n = bsr.shape[0]
    ell = to_ell(bsr)
    func = ell_matmul_kn(ell, batch, p, relu=relu)
    gvar = bb.add_func(func.without_attr("global_symbol"), f"ell_{name}")
    bias = np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(n)
    args = [x3, make_param(f"{name}_ell_data", ell.data.astype(np.float32)),
            make_param(f"{name}_ell_indices", ell.indices), make_param(f"{name}_bias", bias)]
    return bb.emit(relax.call_tir(gvar, args, out_ty=relax.TensorType([batch, n, p], "float32")))


def emit_sparse_matmul(bb, x_expr, weight_np, bias_np, meta, target, *, relu: bool = False,
                       name: str = "matmul", make_param=None, tunable: bool = False):
    """Emit Y[..., N] = X[..., K] @ W^T (+ bias) (ReLU) with our BSR kernel, W = weight_np[N, K]
    (out x in). X is transposed to K-major ([1, K, M]) for the kernel and the result back; both
    are plain Relax ops. Returns the Relax expression of Y. `make_param(name, array)` turns the
    BSR arrays into expressions (default: Relax constants). `tunable` emits the blocked-ELL
    kernel MetaSchedule can tune instead of our pre-scheduled BSR kernel."""
    from tvm import relax

    make_param = make_param or _const_maker(bb)
    weight = np.asarray(weight_np, np.float32)
    n, k = weight.shape
    _, block, _ = storage_format(meta)
    bsr = to_bsr(weight, block or (4, 1))
    shape = _static_shape(x_expr)
    m = int(np.prod(shape[:-1]))
    x2 = bb.emit(relax.op.reshape(x_expr, [m, k]))
    xt = bb.emit(relax.op.reshape(relax.op.permute_dims(x2, [1, 0]), [1, k, m]))
    y3 = (_call_ell if tunable else _call_bsr)(bb, xt, bsr, bias_np, relu, target, make_param,
                                               name)
    y2 = bb.emit(relax.op.permute_dims(relax.op.reshape(y3, [n, m]), [1, 0]))
    return bb.emit(relax.op.reshape(y2, shape[:-1] + [n]))


def emit_sparse_conv1x1(bb, x_expr, weight_np, bias_np, meta, target, *, relu: bool = False,
                        name: str = "conv1x1", make_param=None):
    """Emit a 1x1 Conv (stride 1, no padding, group 1) on NCHW X[B, I, H, W] with W[O, I(,1,1)]:
    Y[b] = W @ X[b] viewed as [I, H*W], no transposes. Returns Y[B, O, H, W]."""
    from .im2col import ConvGeometry

    batch, i, h, w = _static_shape(x_expr)
    geometry = ConvGeometry(i, h, w, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1))
    return emit_sparse_conv(bb, x_expr, weight_np, bias_np, meta, target, geometry, relu=relu,
                            name=name, make_param=make_param)


def emit_sparse_conv(bb, x_expr, weight_np, bias_np, meta, target, geometry, *,
                     relu: bool = False, name: str = "conv", make_param=None,
                     tunable: bool = False):
    """Emit a Conv (group 1, any kernel / stride / padding / dilation: `geometry`) on NCHW
    X[B, C, H, W] with W[O, C, kh, kw] as W[O, K] @ im2col(X)[b] (`im2col.py`; a pointwise conv
    reads X as it is). Returns Y[B, O, OH, OW]."""
    from tvm import relax

    from .im2col import emit_im2col

    make_param = make_param or _const_maker(bb)
    weight = np.asarray(weight_np, np.float32)
    o = weight.shape[0]
    weight = weight.reshape(o, -1)
    batch = _static_shape(x_expr)[0]
    _, block, _ = storage_format(meta)
    bsr = to_bsr(weight, block or (4, 1))
    x3 = emit_im2col(bb, x_expr, geometry)
    call = _call_ell if tunable else _call_bsr
    y3 = call(bb, x3, bsr, bias_np, relu, target, make_param, name)
    return bb.emit(relax.op.reshape(y3, [batch, o, geometry.out_height, geometry.out_width]))
