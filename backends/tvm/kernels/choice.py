"""Which kernel a weight gets (a small cost model), and emitting our kernels into a Relax module.

Cost model. Our BSR kernel does `block_density` of the dense kernel's multiply-adds, each a little
dearer (an index load per block, a row loop per block row). It wins when

    block_density < threshold[target family][block class]

The thresholds are break-even block densities measured with `bench/sparse_kernels.py` (MiniLM FFN
and ResNet 1x1 shapes, ours sparse vs ours dense, x86 AVX2, bench/results/sparse_kernels.md),
rounded down: 4x1 blocks were 1.5-2.2x faster than dense at density 0.5 (0.9x for a K = 64 conv)
-> 0.45; 1x1 blocks (CSR) broke even near 0.5 (0.8-1.0x) and gave 1.7-2x at 0.3 -> 0.3. ARM
values are not measured (no board here): they reuse the x86 numbers. The CUDA kernel
(`cuda.py`) is compile-checked only, so GPU targets always get dense.

Formats (`storage_format`): "block" patterns keep their R x C blocks; "unstructured" weights use
1x1 blocks (plain CSR, the nearest format that keeps their zeros); N:M (2:4) keeps N of every M
consecutive inputs, so every block of a CPU-friendly shape stays nonzero: it maps to dense on CPU
(its only efficient form is NVIDIA's sparse tensor cores, `mma.sp`, which TVM does not schedule).
The choice, its reason and the numbers are recorded per layer (`KernelChoice.as_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .bsr import BSR, bsr_matmul_kn, cpu_schedule, to_bsr

__all__ = ["KernelChoice", "BREAK_EVEN_DENSITY", "storage_format", "kernel_choice",
           "choose_kernel", "emit_sparse_matmul", "emit_sparse_conv1x1", "target_family"]

# target family -> block class -> largest block density at which BSR is still chosen.
# "vector": blocks with >= 4 output rows (each weight feeds a 4+ row register tile);
# "narrow": 1 or 2 output rows (CSR-like; more index loads per multiply-add).
BREAK_EVEN_DENSITY = {
    "x86": {"vector": 0.45, "narrow": 0.3},
    "arm": {"vector": 0.45, "narrow": 0.3},
    "cuda": {"vector": 0.0, "narrow": 0.0},
}


@dataclass
class KernelChoice:
    kernel: str                      # "bsr" | "dense"
    format: str                      # "bsr RxC" | "dense"
    block: tuple[int, int] | None
    block_density: float | None      # measured on the weight with that block
    threshold: float | None
    reason: str

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


def storage_format(meta: dict | None) -> tuple[str, tuple[int, int] | None, str]:
    """(format, block, why) for a weight's `meta["sparsity"]` (see module doc)."""
    sparsity = (meta or {}).get("sparsity") or {}
    pattern = sparsity.get("pattern")
    if pattern == "block":
        r, c = (int(v) for v in sparsity.get("block", (4, 1)))
        return "bsr", (r, c), f"block {r}x{c} pattern kept as BSR {r}x{c}"
    if pattern == "unstructured":
        return "bsr", (1, 1), "unstructured zeros stored as BSR 1x1 (CSR)"
    if pattern == "n:m":
        n, m = sparsity.get("n", 2), sparsity.get("m", 4)
        return "dense", None, (f"{n}:{m} leaves every block nonzero; its efficient form is "
                               f"sparse tensor cores (mma.sp), not scheduled by TVM: dense")
    return "dense", None, "no sparsity recorded"


def kernel_choice(weight_meta: dict | None, weight: np.ndarray | None, target,
                  shape: tuple[int, ...] | None = None) -> KernelChoice:
    """The kernel for a weight W[N, K] (out x in) under `weight_meta` on `target`. The block
    density is measured on `weight` when given (what the kernel will do), else taken from the
    recorded density (an estimate for blocks: recorded zeros may not fill whole blocks)."""
    fmt, block, why = storage_format(weight_meta)
    if fmt == "dense":
        return KernelChoice("dense", "dense", None, None, None, why)
    family = target_family(target)
    threshold = BREAK_EVEN_DENSITY[family]["vector" if block[0] >= 4 else "narrow"]
    if weight is not None:
        density = to_bsr(np.asarray(weight).reshape(weight.shape[0], -1), block).block_density
    else:
        density = float((weight_meta.get("sparsity") or {}).get("density", 1.0))
    if family == "cuda":
        return KernelChoice("dense", "dense", block, density, threshold,
                            f"{why}; no BSR kernel scheduled for GPU targets: dense")
    if density < threshold:
        return KernelChoice("bsr", f"bsr {block[0]}x{block[1]}", block, density, threshold,
                            f"{why}; block density {density:.3f} < break-even {threshold} "
                            f"on {family}")
    return KernelChoice("dense", "dense", block, density, threshold,
                        f"{why}; block density {density:.3f} >= break-even {threshold} on "
                        f"{family}: dense is faster")


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


def emit_sparse_matmul(bb, x_expr, weight_np, bias_np, meta, target, *, relu: bool = False,
                       name: str = "matmul", make_param=None):
    """Emit Y[..., N] = X[..., K] @ W^T (+ bias) (ReLU) with our BSR kernel, W = weight_np[N, K]
    (out x in). X is transposed to K-major ([1, K, M]) for the kernel and the result back; both
    are plain Relax ops. Returns the Relax expression of Y. `make_param(name, array)` turns the
    BSR arrays into expressions (default: Relax constants)."""
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
    y3 = _call_bsr(bb, xt, bsr, bias_np, relu, target, make_param, name)
    y2 = bb.emit(relax.op.permute_dims(relax.op.reshape(y3, [n, m]), [1, 0]))
    return bb.emit(relax.op.reshape(y2, shape[:-1] + [n]))


def emit_sparse_conv1x1(bb, x_expr, weight_np, bias_np, meta, target, *, relu: bool = False,
                        name: str = "conv1x1", make_param=None):
    """Emit a 1x1 Conv (stride 1, no padding, group 1) on NCHW X[B, I, H, W] with W[O, I(,1,1)]:
    Y[b] = W @ X[b] viewed as [I, H*W], no transposes. Returns Y[B, O, H, W]."""
    from tvm import relax

    make_param = make_param or _const_maker(bb)
    weight = np.asarray(weight_np, np.float32)
    o = weight.shape[0]
    weight = weight.reshape(o, -1)
    batch, i, h, w = _static_shape(x_expr)
    _, block, _ = storage_format(meta)
    bsr = to_bsr(weight, block or (4, 1))
    x3 = bb.emit(relax.op.reshape(x_expr, [batch, i, h * w]))
    y3 = _call_bsr(bb, x3, bsr, bias_np, relu, target, make_param, name)
    return bb.emit(relax.op.reshape(y3, [batch, o, h, w]))
