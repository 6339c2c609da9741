"""A QDQ MatMul of two activations (attention's scores and context) on the batched AVX-512 VNNI
kernel (kernels/qdq_pair.py, vnni.int8_batch_matmul_vnni): the kernel exact against numpy at
awkward shapes, and the quantize pass's `activation_matmuls=true` attention graph lowered and run
against the QDQ graph in onnxruntime, including the shapes that must stay on the float path."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from backends.tvm.kernels.vnni import (has_vnni, int8_batch_matmul_vnni,  # noqa: E402
                                       int8_matmul_ref, pack_weight_vnni)
from backends.tvm.targets import parse_target  # noqa: E402

needs_vnni = pytest.mark.skipif(not has_vnni(parse_target("host").config),
                                reason="host CPU has no AVX-512 VNNI")


def test_batched_kernel_compiles_to_vpdpbusd_for_znver4():
    asm = tvm.compile(tvm.IRModule({"main": int8_batch_matmul_vnni(3, 7, 12, 20)}),
                      tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
                      ).mod.inspect_source("asm")
    assert "vpdpbusd" in asm


@needs_vnni
@pytest.mark.parametrize("batch, m, k, n", [
    (3, 7, 12, 5),          # partial row tile and a partial vector only
    (2, 13, 40, 33),        # ragged rows and a partial last vector
    (12, 128, 32, 128),     # MiniLM scores: 12 heads, Q [128, 32] . K^T [32, 128]
])
def test_batched_kernel_matches_numpy_per_batch(batch, m, k, n):
    rng = np.random.default_rng(batch * m + n)
    x = rng.integers(0, 256, (batch, m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (batch, n, k)).astype(np.int8)
    b = rng.integers(-5000, 5000, (batch, n)).astype(np.int32)
    s = rng.uniform(1e-4, 1e-3, n).astype(np.float32)
    f = rng.standard_normal(n).astype(np.float32)
    lib = tvm.compile(tvm.IRModule({"main": int8_batch_matmul_vnni(batch, m, k, n)}),
                      parse_target("host").tvm_target())
    out = tvm.runtime.tensor(np.full((batch, m, n), np.nan, np.float32))
    packed = np.stack([pack_weight_vnni(w[i]) for i in range(batch)])
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, packed, b, s, f)], out)
    ref = np.stack([int8_matmul_ref(x[i], w[i], b[i], s, f) for i in range(batch)])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-5)


@needs_vnni
@pytest.mark.parametrize("seq, activations, routed", [
    (12, "uint8", ["context", "scores"]),  # both products: K = head dim 8 and K = seq 12
    (12, "int8", ["context", "scores"]),   # int8 first operands are shifted up to uint8
    (10, "uint8", ["scores"]),             # probabilities . V has K = 10: stays float
])
def test_attention_activation_matmuls_run_on_vnni(monkeypatch, seq, activations, routed):
    from backends.tvm.lower import LoweringContext, lower_model
    from tests.passes.quantize.graphs import attention, calibration

    from .test_kernels_int8 import _quantized_with_reference, _run_lowered

    monkeypatch.setattr(LoweringContext, "target", parse_target("host"), raising=False)
    spec = f"quantize:activation_matmuls=true:activations={activations}"
    calib = {"x": calibration([1, seq, 16], n=16)["x"][:, None]}      # 16 samples [1, seq, 16]
    model, feeds, ref = _quantized_with_reference(attention(seq=seq), calib, spec)
    lowered = lower_model(model)
    kernels = [v["kernel"] for v in lowered.weight_meta.values() if "kernel" in v]
    pairs = sorted(k["node"] for k in kernels if k["kernel"] == "int8-activations")
    assert pairs == routed
    assert sum(k["kernel"] == "int8-dense" for k in kernels) == 4
    out = _run_lowered(lowered, feeds)
    # integer products are exact; what differs is the order of float operations (measured ~2e-7
    # of the output range)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
