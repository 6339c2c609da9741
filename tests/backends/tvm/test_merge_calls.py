"""MergeCallTIR: runs of call_tir bindings become one PrimFunc call, with the same numbers.

Merging only concatenates already-scheduled kernels, so merged and unmerged modules must agree
exactly (assert_array_equal); against onnxruntime the usual float tolerance applies."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

import ir  # noqa: E402
from backends.tvm.merge_calls import MergeCallTIR  # noqa: E402
from passes.api import compress  # noqa: E402

from .conftest import make_model, ort_run  # noqa: E402

F = np.float32


# -- hand-written Relax modules ---------------------------------------------------------------
# plus is plain TIR (like our hand-written kernels, int32 shapes), double is schedulable TIR
# with int64 shapes (like legalized ops): a run mixes both kinds. x = [0, 1, 2, 3] -> 10 x.
@I.ir_module
class Chain:
    @T.prim_func(private=True)
    def plus(x: T.Buffer((4,), "float32"), z: T.Buffer((4,), "float32"),
             y: T.Buffer((4,), "float32")):
        T.func_attr({"op_pattern": 8, "tirx.is_scheduled": True})  # as our kernels declare
        for i in T.vectorized(4):
            y[i] = x[i] + z[i]

    @T.prim_func(private=True, s_tir=True)
    def double(x: T.Buffer((T.int64(4),), "float32"), y: T.Buffer((T.int64(4),), "float32")):
        for i in range(T.int64(4)):
            with T.sblock("double"):
                vi = T.axis.spatial(T.int64(4), i)
                y[vi] = x[vi] * T.float32(2)

    @R.function
    def main(x: R.Tensor((4,), "float32")):
        cls = Chain
        with R.dataflow():
            a = R.call_tir(cls.plus, (x, x), out_ty=R.Tensor((4,), "float32"))
            b = R.call_tir(cls.double, (a,), out_ty=R.Tensor((4,), "float32"))
            c = R.call_tir(cls.plus, (b, x), out_ty=R.Tensor((4,), "float32"))
            d = R.call_tir(cls.double, (c,), out_ty=R.Tensor((4,), "float32"))
            R.output(d)
        return d


@I.ir_module
class Broken:
    """The chain of Chain with a tuple and a tuple access (not call_tir) in the middle, and a
    second output read from the first run."""

    @T.prim_func(private=True)
    def plus(x: T.Buffer((4,), "float32"), z: T.Buffer((4,), "float32"),
             y: T.Buffer((4,), "float32")):
        T.func_attr({"op_pattern": 8, "tirx.is_scheduled": True})  # as our kernels declare
        for i in T.vectorized(4):
            y[i] = x[i] + z[i]

    @T.prim_func(private=True, s_tir=True)
    def double(x: T.Buffer((T.int64(4),), "float32"), y: T.Buffer((T.int64(4),), "float32")):
        for i in range(T.int64(4)):
            with T.sblock("double"):
                vi = T.axis.spatial(T.int64(4), i)
                y[vi] = x[vi] * T.float32(2)

    @R.function
    def main(x: R.Tensor((4,), "float32")):
        cls = Broken
        with R.dataflow():
            a = R.call_tir(cls.plus, (x, x), out_ty=R.Tensor((4,), "float32"))
            b = R.call_tir(cls.double, (a,), out_ty=R.Tensor((4,), "float32"))
            t = (b, a)
            c = t[0]
            d = R.call_tir(cls.plus, (c, x), out_ty=R.Tensor((4,), "float32"))
            e = R.call_tir(cls.double, (d,), out_ty=R.Tensor((4,), "float32"))
            R.output(e, a)
        return (e, a)


@I.ir_module
class Reinterpret:
    """A plain-TIR kernel reading its uint8 input as int32 through a dtype view (what the int8
    VNNI kernel does), between two schedulable copies."""

    @T.prim_func(private=True, s_tir=True)
    def copy8(x: T.Buffer((T.int64(8),), "uint8"), y: T.Buffer((T.int64(8),), "uint8")):
        for i in range(T.int64(8)):
            with T.sblock("copy"):
                vi = T.axis.spatial(T.int64(8), i)
                y[vi] = x[vi]

    @T.prim_func(private=True)
    def as_words(x: T.Buffer((8,), "uint8"), y: T.Buffer((2,), "int32")):
        T.func_attr({"op_pattern": 8, "tirx.is_scheduled": True})
        x32 = x.view("int32")
        for i in range(2):
            y[i] = x32[i] + 1

    @T.prim_func(private=True, s_tir=True)
    def copy32(x: T.Buffer((T.int64(2),), "int32"), y: T.Buffer((T.int64(2),), "int32")):
        for i in range(T.int64(2)):
            with T.sblock("copy"):
                vi = T.axis.spatial(T.int64(2), i)
                y[vi] = x[vi]

    @R.function
    def main(x: R.Tensor((8,), "uint8")):
        cls = Reinterpret
        with R.dataflow():
            a = R.call_tir(cls.copy8, (x,), out_ty=R.Tensor((8,), "uint8"))
            b = R.call_tir(cls.as_words, (a,), out_ty=R.Tensor((2,), "int32"))
            c = R.call_tir(cls.copy32, (b,), out_ty=R.Tensor((2,), "int32"))
            R.output(c)
        return c


def _calls(mod) -> int:
    return mod["main"].script().count("R.call_tir")


def _run(mod, *arrays) -> list[np.ndarray]:
    executable = relax.build(mod, target="llvm", exec_mode="compiled")
    result = relax.VirtualMachine(executable, tvm.cpu())["main"](
        *[tvm.runtime.tensor(a) for a in arrays])
    return [r.numpy() for r in (result if not hasattr(result, "numpy") else [result])]


def test_chain_becomes_one_call():
    merged = MergeCallTIR()(Chain)
    assert _calls(Chain) == 4 and _calls(merged) == 1
    x = np.arange(4, dtype=F)
    (out,) = _run(merged, x)
    np.testing.assert_array_equal(out, 10 * x)
    np.testing.assert_array_equal(out, _run(Chain, x)[0])


def test_binding_that_is_not_call_tir_splits_runs():
    merged = MergeCallTIR()(Broken)
    assert _calls(merged) == 2  # a, b | (tuple, access) | d, e
    x = np.arange(4, dtype=F)
    e, a = _run(merged, x)
    np.testing.assert_array_equal(a, 2 * x)  # read after its run: exported from the first call
    np.testing.assert_array_equal(e, 10 * x)


def test_above_threshold_nothing_is_merged():
    # Chain's run keeps a, b and c inside (3 x 16 bytes); d is its output.
    assert MergeCallTIR(max_intermediate_bytes=47)(Chain).same_as(Chain)
    assert _calls(MergeCallTIR(max_intermediate_bytes=48)(Chain)) == 1


def test_dtype_view_kernel_merges():
    merged = MergeCallTIR()(Reinterpret)
    assert _calls(merged) == 1
    x = np.arange(1, 9, dtype=np.uint8)
    (out,) = _run(merged, x)
    np.testing.assert_array_equal(out, x.view(np.int32) + 1)


# -- through the lowering and build_module ----------------------------------------------------
def _residual_net(outputs=("y",)):
    """x[1,3,8,8] -> Conv(8) -> Relu (r) -> Conv(8) -> +r -> Relu (s) -> GAP -> Flatten -> Gemm(5)
    (y); `outputs` picks the graph outputs among r, s, y."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 3, 3, 3)).astype(F) * 0.3,
             "b1": rng.standard_normal(8).astype(F),
             "w2": rng.standard_normal((8, 8, 3, 3)).astype(F) * 0.2,
             "b2": rng.standard_normal(8).astype(F),
             "fc_w": rng.standard_normal((5, 8)).astype(F),
             "fc_b": rng.standard_normal(5).astype(F)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r"], ["a"]),
             helper.make_node("Relu", ["a"], ["s"]),
             helper.make_node("GlobalAveragePool", ["s"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1)]
    shapes = {"r": [1, 8, 8, 8], "s": [1, 8, 8, 8], "y": [1, 5]}
    return make_model(nodes, [("x", F, [1, 3, 8, 8])],
                      [(name, F, shapes[name]) for name in outputs], inits)


def _build_and_run(proto, x, spec="cleanup", **build_options) -> list[np.ndarray]:
    from backends.tvm.build import build_module
    from backends.tvm.lower import lower_model
    from backends.tvm.targets import parse_target

    model = ir.load_model(proto)
    compress(model, spec)
    lowered = lower_model(model)
    executable, _ = build_module(lowered, parse_target("host"), **build_options)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(lowered.params[n])
                                      for n in lowered.param_names]
    result = vm["main"](*args)
    return [r.numpy() for r in (result if not hasattr(result, "numpy") else [result])]


def _scheduled(proto, spec="cleanup"):
    """The module build_module hands to MergeCallTIR: legalized, fused and scheduled."""
    from backends.tvm.lower import lower_model
    from backends.tvm.schedule import default_schedule_pass
    from backends.tvm.targets import parse_target

    model = ir.load_model(proto)
    compress(model, spec)
    target = parse_target("host").tvm_target()
    with target:
        mod = relax.get_pipeline("zero")(lower_model(model).mod)
        return default_schedule_pass(target)(mod)


def test_conv_net_merges_to_one_call_with_identical_numbers():
    mod = _scheduled(_residual_net())
    assert _calls(mod) > 4 and _calls(MergeCallTIR()(mod)) == 1

    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(F)
    merged = _build_and_run(_residual_net(), x)
    plain = _build_and_run(_residual_net(), x, merge_calls=False)
    np.testing.assert_array_equal(merged[0], plain[0])
    np.testing.assert_allclose(merged[0], ort_run(_residual_net(), {"x": x})[0],
                               rtol=1e-4, atol=1e-5)


def test_several_outputs_identical():
    proto = _residual_net(outputs=("r", "y", "s"))
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(F)
    merged = _build_and_run(proto, x)
    plain = _build_and_run(proto, x, merge_calls=False)
    refused = _build_and_run(proto, x, max_merge_bytes=0)
    expected = ort_run(proto, {"x": x})
    assert len(merged) == 3
    for m, p, r, e in zip(merged, plain, refused, expected):
        np.testing.assert_array_equal(m, p)
        np.testing.assert_array_equal(r, p)
        np.testing.assert_allclose(m, e, rtol=1e-4, atol=1e-5)


def test_int8_net_identical():
    """The int8 kernels (plain TIR, and the VNNI kernel's dtype view where the CPU has it)
    merged with the quantize/dequantize chains around them."""
    proto = _residual_net()
    mod = _scheduled(proto, "cleanup,quantize:samples=8")
    assert _calls(mod) > 4 and _calls(MergeCallTIR()(mod)) == 1
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(F)
    merged = _build_and_run(proto, x, spec="cleanup,quantize:samples=8")
    plain = _build_and_run(proto, x, spec="cleanup,quantize:samples=8", merge_calls=False)
    np.testing.assert_array_equal(merged[0], plain[0])


def test_artifact_with_merge_matches_onnxruntime(tmp_path):
    from backends.tvm.build import compile_artifact
    from backends.tvm.run import load_artifact

    proto = _residual_net(outputs=("y", "s"))
    model = ir.load_model(proto)
    compress(model, "cleanup")
    compile_artifact(model, "host", tmp_path / "art")
    x = np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(F)
    outputs = load_artifact(tmp_path / "art").run(x)
    for out, expected in zip(outputs, ort_run(proto, {"x": x}), strict=True):
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_profiling_artifact_keeps_kernel_calls(tmp_path):
    """The default artifact runs one merged call in compiled mode, which a VM instrument does
    not see; merge_calls=False with exec_mode="bytecode" gives back one visible call per kernel
    (what bench/model_level.py --profile needs), with the same outputs."""
    from backends.tvm.build import compile_artifact
    from backends.tvm.run import load_artifact

    model = ir.load_model(_residual_net())
    compress(model, "cleanup")
    compile_artifact(model, "host", tmp_path / "fast")
    compile_artifact(model, "host", tmp_path / "profile", merge_calls=False,
                     exec_mode="bytecode")
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(F)
    seen = {}
    for name in ("fast", "profile"):
        artifact = load_artifact(tmp_path / name)
        calls = []
        artifact.vm.set_instrument(
            lambda func, symbol, before, ret, *args, calls=calls:
            calls.append(str(symbol)) if before else None)
        seen[name] = (artifact.run(x)[0], [c for c in calls if not c.startswith("vm.builtin")])
    np.testing.assert_array_equal(seen["fast"][0], seen["profile"][0])
    assert seen["fast"][1] == [] and len(seen["profile"][1]) >= 3  # conv, conv, pool, fc
