"""The row-layout AVX-512 VNNI int8 MatMul kernel (kernels/vnni.py): exact against numpy at
awkward shapes (ragged row tiles, N not a multiple of 16, a single row), its weight packing, the
target check, and a QDQ MatMul/Gemm graph routed to it by the lowering, against the QDQ graph's
own semantics in onnxruntime. Runs need a host with VNNI; the compile check runs anywhere."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from backends.tvm.kernels.vnni import (has_vnni, int8_matmul_ref, int8_matmul_vnni,  # noqa: E402
                                       pack_weight_vnni)
from backends.tvm.targets import parse_target  # noqa: E402

ZNVER4 = {"kind": "llvm", "mcpu": "znver4"}
HOST_HAS_VNNI = has_vnni(parse_target("host").config)
needs_vnni = pytest.mark.skipif(not HOST_HAS_VNNI, reason="host CPU has no AVX-512 VNNI")


def _operands(rng, m, k, n):
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    b = rng.integers(-5000, 5000, n).astype(np.int32)
    s = rng.uniform(1e-4, 1e-3, n).astype(np.float32)
    f = rng.standard_normal(n).astype(np.float32)
    return x, w, b, s, f


def test_pack_weight_layout():
    w = np.arange(20 * 8, dtype=np.int64).reshape(20, 8).astype(np.int8)
    packed = pack_weight_vnni(w)
    assert packed.shape == (2, 2, 64)
    # lane 3 of vector 1 is output channel 19; quad 1 holds its k = 4..7
    assert list(packed[1, 1, 12:16]) == list(w[19, 4:8])
    assert not packed[1, :, 16:].any()            # channels 20..31 are padding
    with pytest.raises(ValueError):
        pack_weight_vnni(np.zeros((4, 6), np.int8))


def test_has_vnni_per_target():
    assert has_vnni(ZNVER4)
    assert not has_vnni({"kind": "llvm", "mcpu": "haswell"})
    assert not has_vnni({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"})
    assert not has_vnni({"kind": "cuda"}) and not has_vnni(None)


def test_kernel_compiles_to_vpdpbusd_for_znver4():
    asm = tvm.compile(tvm.IRModule({"main": int8_matmul_vnni(13, 40, 33)}),
                      tvm.target.Target(ZNVER4)).mod.inspect_source("asm")
    assert "vpdpbusd" in asm


@needs_vnni
@pytest.mark.parametrize("m, k, n, relu, rows, col_vectors", [
    (1, 8, 16, False, 6, 4),         # a single row, one full vector
    (7, 12, 5, True, 6, 4),          # one partial row tile, a partial vector only
    (13, 40, 33, False, 6, 4),       # ragged rows and a partial last vector
    (50, 64, 100, True, 4, 2),       # several column groups with a partial group
    (128, 384, 1536, False, 6, 4),   # MiniLM FFN-up
])
def test_kernel_matches_numpy(m, k, n, relu, rows, col_vectors):
    x, w, b, s, f = _operands(np.random.default_rng(m + n), m, k, n)
    lib = tvm.compile(tvm.IRModule({"main": int8_matmul_vnni(m, k, n, relu, rows, col_vectors)}),
                      parse_target("host").tvm_target())
    out = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, pack_weight_vnni(w), b, s, f)], out)
    ref = int8_matmul_ref(x, w, b, s, f, relu)
    # integer accumulation is exact; the float epilogue is the same three operations
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-5)


@needs_vnni
@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_qdq_matmul_and_gemm_run_on_vnni(monkeypatch, activations):
    """quantize pass (uint8 or int8 activations) -> our lowering: a 3-D MatMul and a Gemm run
    on the VNNI kernel and match the QDQ graph (onnxruntime, optimizations off)."""
    from onnx import helper

    from backends.tvm.lower import LoweringContext, lower_model

    from .conftest import make_model
    from .test_kernels_int8 import _quantized_with_reference, _run_lowered

    monkeypatch.setattr(LoweringContext, "target", parse_target("host"), raising=False)
    rng = np.random.default_rng(5)
    f32 = np.float32
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["y1"]),
         helper.make_node("Reshape", ["y1", "s"], ["y2"]),
         helper.make_node("Gemm", ["y2", "w2", "c"], ["z"], transB=1)],
        [("x", f32, [2, 9, 20])], [("z", f32, None)],
        {"w": rng.standard_normal((20, 36)).astype(f32), "s": np.array([18, 36]),
         "w2": rng.standard_normal((21, 36)).astype(f32), "c": rng.standard_normal(21).astype(f32)})
    calib = {"x": rng.standard_normal((8, 2, 9, 20)).astype(f32)}
    spec = "quantize" if activations == "uint8" else "quantize:activations=int8"
    model, feeds, ref = _quantized_with_reference(proto, calib, spec)
    lowered = lower_model(model)
    kernels = [v["kernel"] for v in lowered.weight_meta.values() if "kernel" in v]
    assert len(kernels) == 2 and all(k["method"] == "vnni" for k in kernels)
    out = _run_lowered(lowered, feeds)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
