"""int8 BSR / dense kernels with fused requantization against numpy (bit-exact: integer
accumulation, the same float32 multiply and round-half-even on both sides), for every inner
product method the host can run, at awkward shapes; the ARM sdot variant is compile-checked
(cross-compiled, its assembly must use `sdot`)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from backends.tvm.kernels.bsr import to_bsr  # noqa: E402
from backends.tvm.kernels.int8 import (bsr_int8_kn, int8_method_for,  # noqa: E402
                                       pack_activations, quantize_params, requantize_ref)
from backends.tvm.kernels.vnni import has_vnni  # noqa: E402
from backends.tvm.targets import parse_target  # noqa: E402

HOST = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"})


def _host_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


def _case(rng, n, k, p, block, density, batch):
    r, c = block
    nb, kb = -(-n // r), -(-k // c)
    keep = rng.random((nb, kb)) < density
    mask = np.repeat(np.repeat(keep, r, 0), c, 1)[:n, :k]
    w = (rng.integers(-127, 128, (n, k)) * mask).astype(np.int8)
    x = rng.integers(-128, 128, (batch, k, p)).astype(np.int8)
    return w, x


CASES = [  # n, k, p, block, density, batch
    (37, 30, 13, (4, 2), 0.3, 1),
    (64, 64, 40, (4, 4), 0.2, 2),
    (19, 12, 3, (1, 2), 0.5, 1),
    (24, 16, 9, (8, 4), 1.0, 1),      # dense weight: the dense int8 kernel
]


@pytest.mark.parametrize("method", ["int32", "madd"])
@pytest.mark.parametrize("n,k,p,block,density,batch", CASES)
def test_int8_kernel_matches_numpy(method, n, k, p, block, density, batch):
    if method == "madd" and not _host_has_avx2():
        pytest.skip("host has no AVX2")
    relu = density < 0.5              # half the cases fuse ReLU into the requantization
    rng = np.random.default_rng(n * 100 + k + p)
    w, x = _case(rng, n, k, p, block, density, batch)
    q = quantize_params(w, 0.05, 3, rng.uniform(0.001, 0.01, n), 2.0, -5,
                        rng.standard_normal(n) * 3, relu)
    bsr = to_bsr(w, block)
    func, data = bsr_int8_kn(bsr, batch, p, relu, method=method)
    lib = tvm.compile(tvm.IRModule({"main": func}), HOST)
    args = [pack_activations(x, method), data, bsr.data.astype(np.int8), bsr.indices,
            bsr.indptr, q.bias_q, q.mult, np.array([q.zy], np.int32),
            np.zeros((batch, n, p), np.int8)]
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    acc = np.einsum("nk,bkp->bnp", w.astype(np.int32), x.astype(np.int32))
    np.testing.assert_array_equal(tensors[-1].numpy(), requantize_ref(acc, q))


@pytest.mark.skipif(not has_vnni(parse_target("host").config),
                    reason="host CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("n,k,p,block,density,batch", [
    (37, 28, 13, (4, 4), 0.3, 1), (64, 64, 40, (4, 4), 0.2, 2), (19, 12, 3, (1, 4), 0.5, 1),
    (24, 16, 35, (8, 4), 1.0, 1)])
def test_vnni_kernel_matches_numpy(n, k, p, block, density, batch):
    """The K-major kernel with vpdpbusd: unsigned activations (uint8, not shifted), whole
    16-lane vectors plus the ragged P tail, exact requantization."""
    rng = np.random.default_rng(n + k + p)
    w, _ = _case(rng, n, k, p, block, density, batch)
    x = rng.integers(0, 256, (batch, k, p)).astype(np.uint8)
    q = quantize_params(w, 0.05, 130, rng.uniform(0.001, 0.01, n), 2.0, -5,
                        rng.standard_normal(n) * 3, density < 0.5)
    bsr = to_bsr(w, block)
    func, data = bsr_int8_kn(bsr, batch, p, density < 0.5, method="vnni")
    lib = tvm.compile(tvm.IRModule({"main": func}), parse_target("host").tvm_target())
    tensors = [tvm.runtime.tensor(a) for a in (
        pack_activations(x, "vnni"), data, bsr.data.astype(np.int8), bsr.indices, bsr.indptr,
        q.bias_q, q.mult, np.array([q.zy], np.int32), np.zeros((batch, n, p), np.int8))]
    lib["main"](*tensors)
    acc = np.einsum("nk,bkp->bnp", w.astype(np.int32), x.astype(np.int32))
    np.testing.assert_array_equal(tensors[-1].numpy(), requantize_ref(acc, q))


def test_int8_ragged_columns_with_int32_method():
    rng = np.random.default_rng(9)
    w, x = _case(rng, 21, 29, 11, (4, 3), 0.4, 1)
    q = quantize_params(w, 0.1, -2, 0.004, 1.5, 7)
    bsr = to_bsr(w, (4, 3))
    func, data = bsr_int8_kn(bsr, 1, 11, method="int32")
    lib = tvm.compile(tvm.IRModule({"main": func}), HOST)
    out = tvm.runtime.tensor(np.zeros((1, 21, 11), np.int8))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, data, bsr.data, bsr.indices, bsr.indptr,
                                                   q.bias_q, q.mult, np.array([q.zy], np.int32))],
                out)
    acc = np.einsum("nk,bkp->bnp", w.astype(np.int32), x.astype(np.int32))
    np.testing.assert_array_equal(out.numpy(), requantize_ref(acc, q))


def test_quantize_params_fold_zero_point_and_bias():
    w = np.array([[1, -2, 3], [0, 4, 0]], np.int8)
    q = quantize_params(w, 0.5, 2, [0.1, 0.2], 1.0, 0, bias=np.array([1.0, -1.0]))
    # bias / (sx * sw) = 20, -10; minus zx * row sums (2, 4)
    assert q.bias_q.tolist() == [20 - 2 * 2, -10 - 2 * 4]
    np.testing.assert_allclose(q.mult, [0.05, 0.1], rtol=1e-6)


def test_method_per_target():
    a76 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
           "mattr": ["+neon", "+dotprod"]}
    a72 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
           "mattr": ["+neon"]}
    assert int8_method_for(a76, 4, 64) == "sdot"
    assert int8_method_for(a76, 2, 64) == "int32"
    assert int8_method_for(a72, 4, 64) == "int32"
    assert int8_method_for({"kind": "llvm"}, 4, 64) == "madd"
    assert int8_method_for({"kind": "llvm"}, 1, 64) == "int32"


def test_sdot_kernel_cross_compiles_to_sdot():
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]})
    w = np.random.default_rng(0).integers(-3, 4, (37, 32)).astype(np.int8)
    func, _ = bsr_int8_kn(to_bsr(w, (4, 4)), 1, 19, True, method="sdot")
    asm = tvm.compile(tvm.IRModule({"main": func}), target).mod.inspect_source("asm")
    assert "sdot" in asm


@pytest.mark.parametrize("method", ["int32", "madd"])
def test_int8_kernel_float_output(method):
    """Dequantizing store: float32(acc - zx * rowsum) * sx * sw + bias, against numpy's float
    computation of the same QDQ product."""
    from backends.tvm.kernels.int8 import dequantize_params
    rng = np.random.default_rng(11)
    w, x = _case(rng, 30, 24, 19, (4, 2), 0.4, 1)
    sx, zx, sw = 0.02, -7, rng.uniform(0.001, 0.01, 30).astype(np.float32)
    bias = rng.standard_normal(30).astype(np.float32)
    b_q, mult = dequantize_params(w, sx, zx, sw)
    bsr = to_bsr(w, (4, 2))
    func, data = bsr_int8_kn(bsr, 1, 19, True, method=method, out_dtype="float32")
    lib = tvm.compile(tvm.IRModule({"main": func}), HOST)
    out = tvm.runtime.tensor(np.zeros((1, 30, 19), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (pack_activations(x, method), data, bsr.data,
                                                   bsr.indices, bsr.indptr, b_q, mult, bias)],
                out)
    ref = (w.astype(np.float32) * sw[:, None]) @ ((x[0].astype(np.float32) - zx) * sx)
    np.testing.assert_allclose(out.numpy()[0], np.maximum(ref + bias[:, None], 0),
                               rtol=1e-4, atol=1e-4)


def test_qdq_graph_runs_int8_kernels_through_the_lowering(monkeypatch):
    """quantize pass -> our lowering: MatMul, Gemm and a 1x1 Conv take the int8 kernel and match
    the QDQ graph's own semantics (onnxruntime with graph optimizations off: its fused QDQ
    kernels requantize differently)."""
    from onnx import helper

    from backends.tvm.lower import LoweringContext, lower_model
    from backends.tvm.targets import parse_target

    from .conftest import make_model

    # The int8 kernels need to know the target (their intrinsics are per ISA); the lowering
    # context carries it as `ctx.target` (a TargetSpec, dict or tvm Target).
    monkeypatch.setattr(LoweringContext, "target", parse_target("host"), raising=False)

    rng = np.random.default_rng(0)
    f32 = np.float32
    proto = make_model(
        [helper.make_node("Conv", ["x", "wc", "bc"], ["c1"]),
         helper.make_node("Reshape", ["c1", "s"], ["a"]),
         helper.make_node("MatMul", ["a", "w"], ["y"]), helper.make_node("Relu", ["y"], ["y1"]),
         helper.make_node("Gemm", ["y1", "w2", "c"], ["z"], transB=1)],
        [("x", f32, [1, 8, 2, 3])], [("z", f32, None)],
        {"wc": rng.standard_normal((40, 8, 1, 1)).astype(f32),
         "bc": rng.standard_normal(40).astype(f32),
         "s": np.array([6, 40]), "w": rng.standard_normal((40, 64)).astype(f32),
         "w2": rng.standard_normal((24, 64)).astype(f32), "c": rng.standard_normal(24).astype(f32)})
    calib = {"x": rng.standard_normal((8, 1, 8, 2, 3)).astype(f32)}
    model, feeds, ref = _quantized_with_reference(proto, calib)
    lowered = lower_model(model)
    kernels = {v["kernel"]["node"]: v["kernel"] for v in lowered.weight_meta.values()
               if "kernel" in v}
    if not _host_has_avx2():
        pytest.skip("host has no AVX2")
    # With VNNI, MatMul / Gemm take the row-layout kernel (test_kernels_vnni.py) and the Conv
    # the K-major kernel's vpdpbusd product; "vnni" either way.
    method = "vnni" if has_vnni(parse_target("host").config) else "madd"
    assert len(kernels) == 3 and {k["method"] for k in kernels.values()} == {method}
    out = _run_lowered(lowered, feeds)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_qdq_kxk_convs_run_int8_kernels_through_im2col(monkeypatch):
    """3x3 convs with stride 2, asymmetric padding and dilation (K = 5 * 9 = 45: padded to
    whole quads) through im2col into the int8 kernel; the halo reads the activation zero point.
    Against the QDQ graph's semantics (onnxruntime, graph optimizations off)."""
    from onnx import helper

    from backends.tvm.lower import LoweringContext, lower_model
    from backends.tvm.targets import parse_target

    from .conftest import make_model

    if not _host_has_avx2():
        pytest.skip("host has no AVX2")
    monkeypatch.setattr(LoweringContext, "target", parse_target("host"), raising=False)
    rng = np.random.default_rng(4)
    f32 = np.float32
    w2 = rng.standard_normal((8, 12, 3, 3)).astype(f32)
    w2[np.repeat(rng.random((2, 12 * 9)) < 0.8, 4, 0).reshape(8, 12, 3, 3)] = 0  # 4x1 blocks
    proto = make_model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 0, 2, 1]),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[2, 2, 2, 2], dilations=[2, 2])],
        [("x", f32, [1, 5, 11, 9])], [("y", f32, None)],
        {"w1": rng.standard_normal((12, 5, 3, 3)).astype(f32),
         "b1": rng.standard_normal(12).astype(f32), "w2": w2})
    calib = {"x": rng.standard_normal((8, 1, 5, 11, 9)).astype(f32)}
    model, feeds, ref = _quantized_with_reference(proto, calib)
    lowered = lower_model(model)
    kernels = [v["kernel"] for v in lowered.weight_meta.values() if "kernel" in v]
    method = "vnni" if has_vnni(parse_target("host").config) else "madd"
    assert len(kernels) == 2 and all(k["method"] == method and k["im2col"] for k in kernels)
    out = _run_lowered(lowered, feeds)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _quantized_with_reference(proto, calib: dict, spec: str = "quantize"):
    """Quantize `proto` with our pass (`spec`); the QDQ graph's own output on the first
    calibration sample (onnxruntime with graph optimizations off, so it does not fuse QDQ
    groups)."""
    import onnxruntime as ort

    import ir
    import passes
    model = ir.load_model(proto)
    passes.compress(model, spec, calibration=calib)
    feeds = {"x": calib["x"][0]}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_onnx(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return model, feeds, session.run(None, feeds)[0]


def _run_lowered(lowered, feeds: dict) -> np.ndarray:
    """Build a lowered module for the host and run it on `feeds["x"]`."""
    from tvm import relax

    from backends.tvm.build import build_module
    from backends.tvm.targets import parse_target
    executable, _ = build_module(lowered, parse_target("host"))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(feeds["x"])]
    args += [tvm.runtime.tensor(lowered.params[n]) for n in lowered.param_names]
    return vm["main"](*args)[0].numpy()
