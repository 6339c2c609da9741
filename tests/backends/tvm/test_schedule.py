"""The default CPU schedule: conv and matmul get the register tile (a local accumulator), other
reductions the single-row schedule, and results stay exact."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from backends.tvm.schedule import _vector_width, default_schedule_pass  # noqa: E402
from backends.tvm.targets import parse_target  # noqa: E402


def _conv_module(channels=16, size=14):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, channels, size, size], "float32"))
    w = relax.Var("w", relax.TensorType([channels, channels, 3, 3], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _scheduled(mod):
    target = parse_target("host").tvm_target()
    with target:
        mod = relax.get_pipeline("zero")(mod)
        return default_schedule_pass(target)(mod), target


def test_conv_gets_register_tile_and_matches_numpy():
    mod, target = _scheduled(_conv_module())
    conv = [f for _, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in f.script()]
    assert conv and '"local"' in conv[0].script()  # the accumulator tile
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 14, 14)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    want = np.maximum(np.einsum("nchwij,kcij->nkhw", windows, w), 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extent,lanes,width", [(56, 8, 8), (14, 8, 14), (7, 8, 7),
                                                (28, 8, 14), (1, 8, None), (12, 4, 4)])
def test_vector_width(extent, lanes, width):
    assert _vector_width(extent, lanes) == width


def _primfuncs(mod, word):
    return [f for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and word in gv.name_hint]


@pytest.mark.parametrize("columns", [1, 2, 7, 16, 20])
def test_softmax_rows_any_row_length_matches_numpy(columns):
    from backends.tvm.fast_math import softmax_rows
    lib = tvm.compile(tvm.IRModule({"main": softmax_rows(3, columns)}),
                      target=parse_target("host").tvm_target())
    x = np.random.default_rng(columns).standard_normal((3, columns)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), y)
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    np.testing.assert_allclose(y.numpy(), e / e.sum(1, keepdims=True), rtol=2e-6, atol=1e-7)


def test_softmax_rows_is_parallel_vectorized_with_one_exp_per_element():
    from backends.tvm.fast_math import softmax_rows
    func = softmax_rows(6, 48)
    script = func.script()
    assert "T.parallel" in script and "T.vectorized" in script
    # fast_exp is a polynomial (no libm exp call), evaluated in one block (exp(x - max) stored
    # once, then scaled by 1 / sum), not recomputed for the sum and the output.
    assert "T.exp(" not in script and script.count("T_fast_exp[") > 0
    assert sum(line.strip().startswith("T_fast_exp[") for line in script.splitlines()) == 1
    target = parse_target("host").tvm_target()
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    x = np.random.default_rng(0).standard_normal((6, 48)).astype(np.float32) * 4
    x[1, :40] = -3.4e38                # a masked row (attention mask), and -inf entries
    x[2, :5] = -np.inf
    y = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), y)
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    np.testing.assert_allclose(y.numpy(), e / e.sum(1, keepdims=True), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("columns,lanes", [(128, 16), (20, 4), (7, 1), (48, 16), (16, 8),
                                           (2, 1)])
def test_softmax_lanes(columns, lanes):
    from backends.tvm.fast_math import softmax_lanes
    assert softmax_lanes(columns) == lanes


def _module(build, *shapes):
    bb = relax.BlockBuilder()
    args = [relax.Var(f"a{i}", relax.TensorType(list(s), "float32")) for i, s in enumerate(shapes)]
    with bb.function("main", args):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *args))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, target, *arrays):
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def test_value_read_twice_is_not_inlined_and_matches_numpy():
    """exp(x) read twice by its consumer (e * e + e) stays one block: inlined, exp would be
    evaluated twice per element."""
    def build(bb, x):
        e = bb.emit(relax.op.exp(x))
        return relax.op.add(relax.op.multiply(e, e), e)
    mod, target = _scheduled(_module(build, (4, 32)))
    funcs = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1
    assert funcs[0].script().count("T.exp(") == 1
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    e = np.exp(x)
    np.testing.assert_allclose(_run(mod, target, x), e * e + e, rtol=1e-5)


def test_one_operation_read_twice_is_inlined_and_matches_numpy():
    """A bias add read twice by its consumer ((x + b) * exp(x + b)) is recomputed instead of
    being written to memory and read back: no intermediate buffer is left."""
    def build(bb, x):
        a = bb.emit(relax.op.add(x, relax.const(np.float32(0.5))))
        return relax.op.multiply(a, relax.op.exp(a))
    mod, target = _scheduled(_module(build, (4, 32)))
    funcs = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1
    assert "alloc_buffer" not in funcs[0].script()
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(mod, target, x), (x + 0.5) * np.exp(x + 0.5), rtol=1e-5)


@pytest.mark.parametrize("a_shape,b_shape", [((1, 64, 96), (96, 80)),
                                             ((2, 3, 16, 8), (2, 3, 8, 40))])
def test_matmul_register_tile_matches_numpy(a_shape, b_shape):
    """Matmuls (weights and batched attention-style) keep the register tile with the column
    blocks outside the row blocks; results match numpy."""
    mod, target = _scheduled(_module(lambda bb, a, b: relax.op.matmul(a, b), a_shape, b_shape))
    matmul = _primfuncs(mod, "matmul")
    assert matmul and '"local"' in matmul[0].script() and "T.parallel" in matmul[0].script()
    rng = np.random.default_rng(0)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    np.testing.assert_allclose(_run(mod, target, a, b), a @ b, rtol=1e-4, atol=1e-4)
