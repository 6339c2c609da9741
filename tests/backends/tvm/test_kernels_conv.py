"""General Conv (kxk, stride, padding, dilation) through im2col into our BSR kernel, the
MetaSchedule-tunable blocked-ELL kernel, and the per-layer report of the format each sparsity
pattern maps onto. Numbers against numpy / onnxruntime at awkward shapes (channels not multiples
of the block, odd spatial sizes, stride 2, asymmetric padding, dilation) and densities 0.05-0.5.

Tolerance: 1e-4 relative + 1e-4 absolute (float32 sums in another order than the reference)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

tvm = pytest.importorskip("tvm")

import ir  # noqa: E402
from backends.tvm.kernels import kernel_choice, to_bsr  # noqa: E402
from backends.tvm.kernels.ell import ell_matmul_kn, to_ell, tune_ell  # noqa: E402
from backends.tvm.kernels.im2col import ConvGeometry, im2col_ref, im2col_te  # noqa: E402
from passes.api import compress  # noqa: E402

from .conftest import make_model, ort_run  # noqa: E402

F = np.float32
HOST = {"kind": "llvm"}

# (C, H, W, kernel, strides, pads (t, l, b, r), dilations)
GEOMETRIES = [
    (5, 9, 7, (3, 3), (2, 2), (1, 0, 2, 1), (1, 1)),
    (3, 8, 8, (3, 3), (1, 1), (1, 1, 1, 1), (2, 2)),
    (6, 7, 5, (1, 3), (1, 2), (0, 1, 0, 1), (1, 1)),
    (4, 6, 6, (2, 2), (2, 2), (0, 0, 0, 0), (1, 1)),
]


def _block_sparse(rng, n, k, block, density):
    r, c = block
    keep = rng.random((-(-n // r), -(-k // c))) < density
    mask = np.repeat(np.repeat(keep, r, 0), c, 1)[:n, :k]
    return (rng.standard_normal((n, k)) * mask).astype(F)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_im2col_matches_numpy(geometry):
    from tvm import te
    g = ConvGeometry(*geometry)
    rng = np.random.default_rng(g.channels)
    x = rng.standard_normal((2, g.channels, g.height, g.width)).astype(F)
    xt = te.placeholder(x.shape, "float32", name="x")
    cols = im2col_te(xt, g, pad_value=0.5)
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([xt, cols])}),
                      tvm.target.Target(HOST))
    out = tvm.runtime.tensor(np.zeros([int(d) for d in cols.shape], F))
    lib["main"](tvm.runtime.tensor(x), out)
    ref = im2col_ref(x, g, pad_value=0.5)
    np.testing.assert_array_equal(out.numpy().reshape(ref.shape), ref)
    # and the column matrix is what makes a conv a matrix product
    w = rng.standard_normal((3, g.channels) + g.kernel).astype(F)
    y = np.einsum("ok,bkp->bop", w.reshape(3, -1), im2col_ref(x, g))
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=list(g.pads),
                                         strides=list(g.strides), dilations=list(g.dilations))],
                       [("x", F, list(x.shape))], [("y", F, None)], {"w": w})
    np.testing.assert_allclose(y.reshape(2, 3, g.out_height, g.out_width),
                               ort_run(proto, {"x": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group,dtype", [(2, "int16"), (4, "int8")])
def test_packed_im2col_matches_numpy(group, dtype):
    """The int8 kernels' activations straight from uint8 x: shifted by 128, halo = zero point,
    K (5 * 9 = 45) padded with zeros to whole groups, pairs / quads innermost."""
    from tvm import te

    from backends.tvm.kernels.im2col import im2col_packed_te
    from backends.tvm.kernels.int8 import pack_activations
    g = ConvGeometry(*GEOMETRIES[0])
    rng = np.random.default_rng(group)
    x = rng.integers(0, 256, (1, g.channels, g.height, g.width)).astype(np.uint8)
    k_padded = -(-g.k // 4) * 4
    xt = te.placeholder(x.shape, "uint8", name="x")
    out_t = im2col_packed_te(xt, g, -9, group, k_padded, dtype, offset=128)
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([xt, out_t])}),
                      tvm.target.Target(HOST))
    out = tvm.runtime.tensor(np.zeros([int(d) for d in out_t.shape], dtype))
    lib["main"](tvm.runtime.tensor(x), out)
    cols = im2col_ref(x.astype(np.int32) - 128, g, pad_value=-9)
    cols = np.pad(cols, ((0, 0), (0, k_padded - g.k), (0, 0)))
    ref = pack_activations(cols, "madd" if group == 2 else "sdot")
    np.testing.assert_array_equal(out.numpy().reshape(ref.shape), ref)


# -- through the lowering -------------------------------------------------------------------------
def _lower_and_run(proto, feeds, sparsity: dict, **lower_options):
    from tvm import relax

    from backends.tvm.build import build_module
    from backends.tvm.lower import lower_model
    from backends.tvm.targets import parse_target

    model = ir.load_model(proto)
    compress(model, "cleanup")
    for name, info in sparsity.items():
        model.graph.initializers[name].meta["sparsity"] = info
    lowered = lower_model(model, **lower_options)
    executable, _ = build_module(lowered, parse_target("host"))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[name]) for name, _, _ in lowered.inputs]
    args += [tvm.runtime.tensor(lowered.params[n]) for n in lowered.param_names]
    return [r.numpy() for r in vm["main"](*args)], lowered


@pytest.fixture
def always_sparse(monkeypatch):
    """Break-even densities above 1, so even a density-0.5 weight takes the sparse kernel (the
    point is the kernel's numbers, not the cost model's choice)."""
    from backends.tvm.kernels import choice
    monkeypatch.setitem(choice.BREAK_EVEN_DENSITY, "x86",
                        {"vector": 1.01, "narrow": 1.01, "im2col": 1.01})


CONV_CASES = [  # geometry index, out channels, block, density, bias, tunable
    (0, 13, (4, 1), 0.3, True, False),
    (1, 7, (1, 1), 0.05, False, False),
    (2, 9, (3, 5), 0.5, True, False),
    (3, 16, (8, 4), 0.2, True, False),
    (0, 13, (4, 1), 0.5, True, True),
    (1, 6, (1, 1), 0.1, False, True),
]


@pytest.mark.parametrize("index,out_channels,block,density,bias,tunable", CONV_CASES)
def test_sparse_conv_matches_onnxruntime(always_sparse, index, out_channels, block, density,
                                         bias, tunable):
    g = ConvGeometry(*GEOMETRIES[index])
    rng = np.random.default_rng(index * 10 + out_channels)
    w = _block_sparse(rng, out_channels, g.k, block, density).reshape(
        (out_channels, g.channels) + g.kernel)
    inits = {"w": w}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = rng.standard_normal(out_channels).astype(F)
        inputs.append("b")
    proto = make_model([helper.make_node("Conv", inputs, ["y"], pads=list(g.pads),
                                         strides=list(g.strides), dilations=list(g.dilations))],
                       [("x", F, [2, g.channels, g.height, g.width])], [("y", F, None)], inits)
    feeds = {"x": rng.standard_normal((2, g.channels, g.height, g.width)).astype(F)}
    (out,), lowered = _lower_and_run(
        proto, feeds, {"w": {"pattern": "block", "block": list(block), "density": density}},
        tunable_kernels=tunable)
    np.testing.assert_allclose(out, ort_run(proto, feeds)[0], rtol=1e-4, atol=1e-4)
    record = lowered.weight_meta["w"]["kernel"]
    assert record["kernel"] == ("ell" if tunable else "bsr")
    assert record["im2col"] is True and record["block"] == list(block)


def _conv_net(rng, sparse_w):
    """conv 3x3 (dense) -> relu -> conv 3x3 stride 2 (sparse) -> relu -> pool -> gemm."""
    w1 = rng.standard_normal((12, 3, 3, 3)).astype(F) * 0.3
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1)]
    inits = {"w1": w1, "b1": rng.standard_normal(12).astype(F) * 0.1, "w2": sparse_w,
             "b2": rng.standard_normal(20).astype(F) * 0.1,
             "w3": rng.standard_normal((10, 20)).astype(F)}
    return make_model(nodes, [("x", F, [1, 3, 15, 13])], [("y", F, None)], inits)


@pytest.mark.parametrize("tunable", [False, True])
def test_conv_net_with_sparsified_3x3_conv(tunable):
    """End to end at the real break-even densities: a 90%-sparse 4x1-block 3x3 conv is chosen
    sparse (im2col + BSR, or the tunable ELL kernel untuned) and the net matches onnxruntime."""
    rng = np.random.default_rng(11)
    w2 = _block_sparse(rng, 20, 12 * 9, (4, 1), 0.1).reshape(20, 12, 3, 3)
    proto = _conv_net(rng, w2)
    feeds = {"x": rng.standard_normal((1, 3, 15, 13)).astype(F)}
    (out,), lowered = _lower_and_run(
        proto, feeds, {"w2": {"pattern": "block", "block": [4, 1], "density": 0.1}},
        tunable_kernels=tunable)
    np.testing.assert_allclose(out, ort_run(proto, feeds)[0], rtol=1e-4, atol=1e-4)
    record = lowered.weight_meta["w2"]["kernel"]
    assert record["kernel"] == ("ell" if tunable else "bsr") and record["im2col"]
    assert "via im2col" in record["reason"]
    assert ("ell_padding" in record) == tunable
    assert "w1" not in lowered.weight_meta              # no metadata: plain dense lowering
    assert any(n.endswith("_ell_indices" if tunable else "_bsr_indptr")
               for n in lowered.param_names)


# -- formats per pattern: what the per-layer report says ------------------------------------------
def _nm_weight(rng, n, k, keep, m):
    w = rng.standard_normal((n, k)).astype(F)
    scores = rng.random((n, k // m, m))
    drop = np.argsort(scores, axis=2)[:, :, : m - keep]
    mask = np.ones((n, k // m, m), bool)
    np.put_along_axis(mask, drop, False, axis=2)
    return w * mask.reshape(n, k)


def test_nm_and_unstructured_formats_in_the_report():
    rng = np.random.default_rng(2)
    two_four = kernel_choice({"sparsity": {"pattern": "n:m", "n": 2, "m": 4}},
                             _nm_weight(rng, 32, 64, 2, 4), HOST).as_dict()
    assert two_four["kernel"] == "dense" and two_four["pattern"] == "2:4"
    assert two_four["block"] == [1, 1] and two_four["block_density"] == pytest.approx(0.5)
    assert "CSR" in two_four["reason"] and "mma.sp" in two_four["reason"]
    one_four = kernel_choice({"sparsity": {"pattern": "n:m", "n": 1, "m": 4}},
                             _nm_weight(rng, 32, 64, 1, 4), HOST).as_dict()
    assert (one_four["kernel"], one_four["format"]) == ("bsr", "bsr 1x1")
    w = (rng.standard_normal((32, 64)) * (rng.random((32, 64)) < 0.2)).astype(F)
    unstructured = kernel_choice({"sparsity": {"pattern": "unstructured"}}, w, HOST).as_dict()
    assert unstructured["format"] == "bsr 1x1" and unstructured["pattern"] == "unstructured"
    assert "CSR" in unstructured["reason"]
    # a 3x3 conv weight through im2col has its own, lower break-even
    conv = kernel_choice({"sparsity": {"pattern": "block", "block": [4, 1]}},
                         _block_sparse(rng, 32, 64, (4, 1), 0.4), HOST, im2col=True)
    plain = kernel_choice({"sparsity": {"pattern": "block", "block": [4, 1]}},
                          _block_sparse(rng, 32, 64, (4, 1), 0.4), HOST)
    assert conv.threshold <= plain.threshold and conv.im2col and not plain.im2col


def test_nm_weight_reported_through_the_lowering():
    rng = np.random.default_rng(8)
    w = _nm_weight(rng, 24, 32, 2, 4)
    proto = make_model([helper.make_node("Gemm", ["a", "w"], ["y"], transB=1)],
                       [("a", F, [3, 32])], [("y", F, None)], {"w": w})
    feeds = {"a": rng.standard_normal((3, 32)).astype(F)}
    (out,), lowered = _lower_and_run(proto, feeds, {"w": {"pattern": "n:m", "n": 2, "m": 4,
                                                          "density": 0.5}})
    np.testing.assert_allclose(out, ort_run(proto, feeds)[0], rtol=1e-4, atol=1e-4)
    record = lowered.weight_meta["w"]["kernel"]
    assert record["pattern"] == "2:4" and record["kernel"] == "dense"
    assert "BSR 1x1 (CSR)" in record["reason"]


# -- the MetaSchedule-tunable kernel ------------------------------------------------------------
@pytest.mark.parametrize("block,density", [((4, 1), 0.3), ((1, 1), 0.05), ((3, 5), 0.5)])
def test_ell_kernel_matches_numpy_with_any_indices(block, density):
    """Default-scheduled ELL kernel equals numpy; garbage indices (what a tuner's runner passes)
    stay in bounds."""
    from backends.tvm.schedule import default_schedule_pass
    rng = np.random.default_rng(int(density * 100))
    n, k, p = 37, 29, 13
    w = _block_sparse(rng, n, k, block, density)
    ell = to_ell(to_bsr(w, block))
    assert ell.slots == max(1, int(np.diff(to_bsr(w, block).indptr).max()))
    target = tvm.target.Target(HOST)
    mod = tvm.IRModule({"main": ell_matmul_kn(ell, 2, p, relu=True)})
    with target:
        mod = default_schedule_pass(target)(mod)
    lib = tvm.compile(mod, target)
    x = rng.standard_normal((2, k, p)).astype(F)
    bias = rng.standard_normal(n).astype(F)
    out = tvm.runtime.tensor(np.zeros((2, n, p), F))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(ell.data),
                tvm.runtime.tensor(ell.indices), tvm.runtime.tensor(bias), out)
    ref = np.maximum(np.einsum("nk,bkp->bnp", w, x) + bias[:, None], 0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)
    garbage = rng.integers(-2**31, 2**31 - 1, ell.indices.shape).astype(np.int32)
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(ell.data),
                tvm.runtime.tensor(garbage), tvm.runtime.tensor(bias), out)
    assert np.all(np.isfinite(out.numpy()))


@pytest.mark.slow
def test_metaschedule_tunes_the_ell_kernel(tmp_path):
    """MetaSchedule (tune_tir, a handful of trials) tunes the ELL kernel and the tuned kernel
    still equals numpy. Slow: every trial builds and runs in a fresh worker process."""
    from tvm.s_tir import meta_schedule as ms
    rng = np.random.default_rng(3)
    n, k, p = 40, 36, 24
    w = _block_sparse(rng, n, k, (4, 1), 0.2)
    ell = to_ell(to_bsr(w, (4, 1)))
    x = rng.standard_normal((1, k, p)).astype(F)
    bias = rng.standard_normal(n).astype(F)
    arrays = [x, ell.data, ell.indices, bias, np.zeros((1, n, p), F)]
    target = {"kind": "llvm", "num-cores": 1}
    tuned = tune_ell(ell_matmul_kn(ell, 1, p), target, str(tmp_path), 4, arrays)
    assert tuned is not None
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    assert any(r.run_secs for r in database.get_all_tuning_records())   # trials really ran
    lib = tvm.compile(tuned, tvm.target.Target(target))
    out = tvm.runtime.tensor(np.zeros((1, n, p), F))
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays[:-1]], out)
    np.testing.assert_allclose(out.numpy()[0], w @ x[0] + bias[:, None], rtol=1e-4, atol=1e-4)


def test_tunable_lowering_gives_metaschedule_a_task():
    """With tunable_kernels the sparse layer's PrimFunc is not marked scheduled (the tuner skips
    marked ones) and its extents are constant (MetaSchedule can count its FLOPs); without it, it
    is our pre-scheduled BSR kernel."""
    from tvm import tirx
    from tvm.s_tir.analysis import estimate_tir_flops

    from backends.tvm.lower import lower_model
    rng = np.random.default_rng(12)
    w = _block_sparse(rng, 24, 32, (4, 1), 0.1)
    proto = make_model([helper.make_node("Gemm", ["a", "w"], ["y"], transB=1)],
                       [("a", F, [5, 32])], [("y", F, None)], {"w": w})
    for tunable, prefix in ((True, "ell_"), (False, "bsr_")):
        model = ir.load_model(proto)
        compress(model, "cleanup")
        model.graph.initializers["w"].meta["sparsity"] = {"pattern": "block", "block": [4, 1]}
        mod = lower_model(model, tunable_kernels=tunable).mod
        (gvar, func), = [(g, f) for g, f in mod.functions.items()
                         if isinstance(f, tirx.PrimFunc) and g.name_hint.startswith(prefix)]
        scheduled = func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled"))
        assert scheduled != tunable
        if tunable:
            slots = to_ell(to_bsr(w, (4, 1))).slots
            assert float(estimate_tir_flops(tvm.IRModule({"main": func}))) >= 2 * 24 * slots * 5
