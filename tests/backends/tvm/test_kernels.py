"""Our BSR and dense kernels against numpy, at awkward shapes (nothing a multiple of the block or
of the register tile) and densities 0.05..0.5, and the dispatch hook through the real lowering
against onnxruntime.

Tolerance: 1e-4 relative + 1e-4 absolute (float32 sums of up to a few hundred terms in another
order than numpy's)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

tvm = pytest.importorskip("tvm")

import ir  # noqa: E402
from backends.tvm.kernels import (BSR, choose_kernel, dense_matmul_kn,  # noqa: E402
                                  kernel_choice, storage_format, to_bsr)
from backends.tvm.kernels.bsr import CpuSchedule, bsr_matmul_kn, cpu_schedule  # noqa: E402
from passes.api import compress  # noqa: E402

from .conftest import make_model, ort_run  # noqa: E402

F = np.float32
HOST = {"kind": "llvm"}


def _block_sparse(rng, n, k, block, density):
    r, c = block
    nb, kb = -(-n // r), -(-k // c)
    keep = rng.random((nb, kb)) < density
    mask = np.repeat(np.repeat(keep, r, 0), c, 1)[:n, :k]
    return (rng.standard_normal((n, k)) * mask).astype(F)


def _run(func, *arrays, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": func}), tvm.target.Target(HOST))
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, F))
    lib["main"](*args, out)
    return out.numpy()


@pytest.mark.parametrize("block", [(4, 1), (1, 1), (3, 5), (8, 4)])
def test_to_bsr_round_trip_keeps_block_density(block):
    rng = np.random.default_rng(1)
    w = _block_sparse(rng, 30, 23, block, 0.3)
    bsr = to_bsr(w, block)
    assert np.array_equal(bsr.to_dense(), w)
    assert bsr.indptr[-1] == bsr.nnz_blocks and np.all(np.diff(bsr.indptr) >= 0)
    r, c = block
    expected = np.count_nonzero(
        np.pad(w, ((0, -30 % r), (0, -23 % c))).reshape(-(-30 // r), r, -(-23 // c), c)
        .any(axis=(1, 3))) / (-(-30 // r) * -(-23 // c))
    assert bsr.block_density == pytest.approx(expected)


def test_to_bsr_all_zero_weight():
    bsr = to_bsr(np.zeros((5, 7), F), (4, 1))
    assert bsr.indptr.tolist() == [0, 0, 0] and np.array_equal(bsr.to_dense(), np.zeros((5, 7)))


# (N, K, P, batch, block, density, tile_p): awkward everywhere, then the register tile edge cases
BSR_CASES = [
    (37, 29, 13, 1, (4, 1), 0.3, None),
    (50, 33, 20, 2, (3, 5), 0.5, None),
    (64, 48, 17, 1, (8, 4), 0.05, None),
    (19, 11, 7, 1, (1, 1), 0.2, None),
    (96, 64, 40, 1, (16, 1), 0.1, 16),
    (33, 40, 1, 1, (4, 2), 0.4, None),
]


@pytest.mark.parametrize("n,k,p,batch,block,density,tile_p", BSR_CASES)
def test_bsr_kernel_matches_numpy(n, k, p, batch, block, density, tile_p):
    relu = n % 2 == 1                 # odd N cases also fuse ReLU into the store
    rng = np.random.default_rng(n * 1000 + k)
    w = _block_sparse(rng, n, k, block, density)
    x = rng.standard_normal((batch, k, p)).astype(F)
    bias = rng.standard_normal(n).astype(F)
    bsr = to_bsr(w, block)
    func = bsr_matmul_kn(bsr, batch, p, relu=relu, schedule=CpuSchedule(8, 16, tile_p))
    y = _run(func, x, bsr.data, bsr.indices, bsr.indptr, bias, out_shape=(batch, n, p))
    ref = np.einsum("nk,bkp->bnp", w, x) + bias[:, None]
    if relu:
        ref = np.maximum(ref, 0)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,k,p,rows", [(37, 29, 13, 4), (16, 8, 24, 4), (5, 3, 2, 8)])
def test_dense_kernel_matches_numpy(n, k, p, rows):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((n, k)).astype(F)
    x = rng.standard_normal((1, k, p)).astype(F)
    bias = rng.standard_normal(n).astype(F)
    y = _run(dense_matmul_kn(n, k, 1, p, rows=rows, relu=True), x, w, bias, out_shape=(1, n, p))
    np.testing.assert_allclose(y, np.maximum(w @ x[0] + bias[:, None], 0)[None],
                               rtol=1e-4, atol=1e-4)


def test_cpu_schedule_per_target():
    assert cpu_schedule({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                         "mcpu": "cortex-a72"}).lanes == 4
    assert cpu_schedule({"kind": "llvm", "mcpu": "core-avx2"}).lanes == 8
    assert cpu_schedule({"kind": "llvm", "mcpu": "skylake-avx512"}).lanes == 16
    # R x vectors accumulators fit in half the registers
    assert CpuSchedule(8, 16).tile_for(4, 128) == 16
    assert CpuSchedule(4, 32).tile_for(4, 128) == 16
    assert CpuSchedule(8, 16).tile_for(16, 128) == 8


def test_formats_and_choice():
    assert storage_format({"sparsity": {"pattern": "block", "block": [4, 1]}})[:2] == \
        ("bsr", (4, 1))
    assert storage_format({"sparsity": {"pattern": "unstructured"}})[:2] == ("bsr", (1, 1))
    # N:M keeps a nonzero in every CPU-sized block: its nearest format is CSR (1x1 blocks)
    assert storage_format({"sparsity": {"pattern": "n:m", "n": 2, "m": 4}})[:2] == \
        ("bsr", (1, 1))
    rng = np.random.default_rng(3)
    meta = {"sparsity": {"pattern": "block", "block": [4, 1]}}
    sparse = _block_sparse(rng, 64, 32, (4, 1), 0.1)
    dense = _block_sparse(rng, 64, 32, (4, 1), 0.9)
    assert choose_kernel(meta, sparse.shape, HOST, sparse) == "bsr"
    assert choose_kernel(meta, dense.shape, HOST, dense) == "dense"
    assert choose_kernel(meta, sparse.shape, {"kind": "cuda"}, sparse) == "dense"
    # without the array, the recorded density decides
    assert kernel_choice({"sparsity": {"pattern": "block", "block": [4, 1], "density": 0.1}},
                         None, HOST).kernel == "bsr"


# -- through the lowering: the hook backends.tvm.lower calls ------------------------------------
def _lower_and_run(proto, feeds, sparsity: dict):
    from tvm import relax

    from backends.tvm.build import build_module
    from backends.tvm.lower import lower_model
    from backends.tvm.targets import parse_target

    model = ir.load_model(proto)
    compress(model, "cleanup")
    for name, info in sparsity.items():
        model.graph.initializers[name].meta["sparsity"] = info
    lowered = lower_model(model)
    executable, _ = build_module(lowered, parse_target("host"))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[name]) for name, _, _ in lowered.inputs]
    args += [tvm.runtime.tensor(lowered.params[n]) for n in lowered.param_names]
    return [r.numpy() for r in vm["main"](*args)], lowered


def test_dispatch_matmul_and_gemm_match_onnxruntime():
    rng = np.random.default_rng(5)
    w = _block_sparse(rng, 70, 40, (1, 4), 0.2).T.copy()             # MatMul weight [K, N]
    w2 = (rng.standard_normal((24, 70)) * (rng.random((24, 70)) < 0.1)).astype(F)
    proto = make_model(
        [helper.make_node("MatMul", ["a", "w"], ["y"]),
         helper.make_node("Reshape", ["y", "s"], ["y2"]),
         helper.make_node("Gemm", ["y2", "w2", "c"], ["z"], transB=1, alpha=0.5, beta=2.0)],
        [("a", F, [2, 3, 40])], [("z", F, None)],
        {"w": w, "s": np.array([6, 70]), "w2": w2, "c": rng.standard_normal(24).astype(F)})
    feeds = {"a": rng.standard_normal((2, 3, 40)).astype(F)}
    (out,), lowered = _lower_and_run(proto, feeds, {
        "w": {"pattern": "block", "block": [1, 4], "density": 0.2},
        "w2": {"pattern": "unstructured", "density": 0.1}})
    np.testing.assert_allclose(out, ort_run(proto, feeds)[0], rtol=1e-4, atol=1e-4)
    assert lowered.weight_meta["w"]["kernel"]["kernel"] == "bsr"
    assert lowered.weight_meta["w2"]["kernel"]["format"] == "bsr 1x1"
    assert any(n.endswith("_bsr_indptr") for n in lowered.param_names)


def test_dispatch_conv1x1_and_dense_fallback():
    rng = np.random.default_rng(6)
    w = _block_sparse(rng, 22, 12, (4, 1), 0.2).reshape(22, 12, 1, 1)
    w3 = rng.standard_normal((5, 22, 3, 3)).astype(F)                # 3x3: dense lowering
    proto = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"]),
         helper.make_node("Conv", ["y", "w3"], ["z"], pads=[1, 1, 1, 1])],
        [("x", F, [1, 12, 5, 7])], [("z", F, None)],
        {"w": w, "b": rng.standard_normal(22).astype(F), "w3": w3})
    feeds = {"x": rng.standard_normal((1, 12, 5, 7)).astype(F)}
    (out,), lowered = _lower_and_run(proto, feeds, {
        "w": {"pattern": "block", "block": [4, 1], "density": 0.2},
        "w3": {"pattern": "unstructured", "density": 0.5}})
    np.testing.assert_allclose(out, ort_run(proto, feeds)[0], rtol=1e-4, atol=1e-4)
    assert lowered.weight_meta["w"]["kernel"]["kernel"] == "bsr"
    assert lowered.weight_meta["w3"]["kernel"]["kernel"] == "dense"


def test_bsr_type_is_exported():
    assert BSR is to_bsr(np.eye(4, dtype=F), (2, 2)).__class__


def test_cuda_bsr_kernel_compiles():
    """Compile-only (no GPU here): codegen through NVRTC/nvcc must accept the kernel."""
    from backends.tvm.kernels.cuda import bsr_matmul_kn_cuda
    w = _block_sparse(np.random.default_rng(2), 37, 29, (4, 3), 0.3)
    lib = _compile_cuda_or_skip(bsr_matmul_kn_cuda(to_bsr(w, (4, 3)), 2, 45, relu=True))
    source = lib.mod.imports[0].inspect_source()
    assert "__global__" in source and "bsr_kn_cuda_kernel" in source


def test_tune_bsr_picks_a_measured_tile():
    from backends.tvm.kernels.tune import tile_candidates, tune_bsr
    w = _block_sparse(np.random.default_rng(4), 32, 24, (4, 1), 0.3)
    bsr = to_bsr(w, (4, 1))
    schedule, timings = tune_bsr(bsr, 1, 20, HOST, number=2, repeat=1)
    assert set(timings) == set(tile_candidates(cpu_schedule(HOST), 4, 20)) == {8, 16, 20}
    assert schedule.tile_p == min(timings, key=timings.get)
    # the tuned schedule still computes the right thing
    x = np.random.default_rng(5).standard_normal((1, 24, 20)).astype(F)
    y = _run(bsr_matmul_kn(bsr, 1, 20, schedule=schedule), x, bsr.data, bsr.indices,
             bsr.indptr, np.zeros(32, F), out_shape=(1, 32, 20))
    np.testing.assert_allclose(y[0], w @ x[0], rtol=1e-4, atol=1e-4)


def _compile_cuda_or_skip(func):
    # CUDA code generation (not the CUDA runtime, which PyPI's TVM lacks) is what is checked.
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host={"kind": "llvm"})
    if tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        pytest.skip("TVM built without CUDA code generation")
    try:
        return tvm.compile(tvm.IRModule({"main": func}), target)
    except Exception as exc:  # noqa: BLE001 - a machine without nvcc/NVRTC cannot check
        if "nvcc" in str(exc) or "nvrtc" in str(exc).lower():
            pytest.skip(f"no CUDA compiler: {str(exc).splitlines()[-1]}")
        raise


def _dp4a_case(m, k, n):
    from backends.tvm.kernels.cuda import pack_weight_dp4a
    rng = np.random.default_rng(m * n)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    b = rng.integers(-999, 999, n).astype(np.int32)
    s = rng.uniform(1e-4, 1e-3, n).astype(F)
    f = rng.standard_normal(n).astype(F)
    ref = (x.astype(np.int64) @ w.astype(np.int64).T + b).astype(F) * s + f
    return [x, pack_weight_dp4a(w), b, s, f], np.maximum(ref, 0)


def test_cuda_dp4a_int8_kernel_compiles_to_dp4a():
    """Compile-only (no GPU here): the int8 MatMul kernel for CUDA uses __dp4a; its weight
    packing puts W[n, 4q:4q+4] in word [q, n]."""
    from backends.tvm.kernels.cuda import int8_matmul_dp4a, pack_weight_dp4a
    w = np.arange(3 * 8).reshape(3, 8).astype(np.int8)
    packed = pack_weight_dp4a(w)
    assert packed.shape == (2, 3) and packed.dtype == np.int32
    assert list(packed[1:2, 2:3].view(np.int8).reshape(-1)) == list(w[2, 4:8])
    lib = _compile_cuda_or_skip(int8_matmul_dp4a(13, 40, 33, relu=True))
    source = lib.mod.imports[0].inspect_source()
    assert "__dp4a(" in source and "__global__" in source


@pytest.mark.gpu
def test_cuda_dp4a_int8_kernel_matches_numpy():
    from backends.tvm.kernels.cuda import int8_matmul_dp4a
    args, ref = _dp4a_case(13, 40, 33)
    if not tvm.runtime.enabled("cuda") or not tvm.cuda(0).exist:
        pytest.skip("no CUDA runtime / GPU")
    lib = _compile_cuda_or_skip(int8_matmul_dp4a(13, 40, 33, relu=True))
    dev = tvm.cuda(0)
    out = tvm.runtime.tensor(np.zeros((13, 33), F), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in args], out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
