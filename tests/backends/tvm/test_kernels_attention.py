"""The fused attention kernel (kernels/attention.py): against numpy at awkward shapes, and the
lowering's pattern match on ONNX attention graphs (fused only when every intermediate is used
once; results match onnxruntime either way)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

tvm = pytest.importorskip("tvm")

from backends.tvm.kernels.attention import attention_kernel, attention_ref  # noqa: E402
from backends.tvm.targets import parse_target  # noqa: E402

from .conftest import make_model, ort_run, tvm_run  # noqa: E402

F = np.float32


@pytest.mark.parametrize("b, h, sq, sk, d, e, mask_shape, transposed, lanes", [
    (1, 2, 5, 16, 8, 16, None, False, 16),            # fewer rows than a tile, no mask
    (2, 3, 13, 32, 7, 32, (2, 1, 1, 32), True, 16),   # ragged row tiles, mask per batch
    (1, 2, 9, 48, 4, 16, (1, 2, 9, 48), False, 16),   # a full mask, odd E vector count
    (1, 1, 20, 24, 5, 8, (1, 1, 20, 1), True, 8),     # AVX2 width, mask broadcast over keys
])
def test_attention_kernel_matches_numpy(b, h, sq, sk, d, e, mask_shape, transposed, lanes):
    rng = np.random.default_rng(sq * sk)
    q = rng.standard_normal((b, h, sq, d)).astype(F)
    kt = rng.standard_normal((b, h, d, sk)).astype(F)
    v = rng.standard_normal((b, h, sk, e)).astype(F)
    mask = (rng.standard_normal(mask_shape) * 3).astype(F) if mask_shape else None
    func = attention_kernel(b, h, sq, sk, d, e, 0.3, mask_shape, transposed, lanes=lanes)
    lib = tvm.compile(tvm.IRModule({"main": func}), parse_target("host").tvm_target())
    out_shape = (b, sq, h, e) if transposed else (b, h, sq, e)
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, F))
    lib["main"](*[tvm.runtime.tensor(a) for a in
                  (q, kt, v, mask if mask is not None else np.zeros((1, 1, 1, 1), F))], out)
    np.testing.assert_allclose(out.numpy(), attention_ref(q, kt, v, mask, 0.3, transposed),
                               rtol=1e-5, atol=1e-5)


def _attention_graph(scale_op="Div", mask=True, transpose=True, scores_output=False):
    """x [1, 16, 32] -> Q, K, V projections -> 2 heads of 16 -> attention -> [1, 16, 32]
    (16 keys and 16 values per head: whole vectors at any CPU's width)."""
    rng = np.random.default_rng(3)
    nodes, inits = [], {"shape4": np.array([1, 16, 2, 16]), "shape3": np.array([1, 16, 32]),
                        "scale": np.array(4.0 if scale_op == "Div" else 0.25, F)}
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        inits[f"w{name}"] = rng.standard_normal((32, 32)).astype(F) * 0.3
        nodes += [helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}p"]),
                  helper.make_node("Reshape", [f"{name}p", "shape4"], [f"{name}r"]),
                  helper.make_node("Transpose", [f"{name}r"], [f"{name}t"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["qt", "kt"], ["s"]),
              helper.make_node(scale_op, ["s", "scale"], ["ss"])]
    scores = "ss"
    inputs = [("x", F, [1, 16, 32])]
    if mask:
        nodes.append(helper.make_node("Add", ["ss", "mask"], ["sm"]))
        inputs.append(("mask", F, [1, 1, 1, 16]))
        scores = "sm"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vt"], ["o"])]
    out = "o"
    if transpose:
        nodes += [helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["ot", "shape3"], ["y"])]
        out = "y"
    outputs = [(out, F, None)] + ([("s", F, None)] if scores_output else [])
    feeds = {"x": rng.standard_normal((1, 16, 32)).astype(F)}
    if mask:
        feeds["mask"] = np.where(np.arange(16) < 11, 0, -1e4).astype(F).reshape(1, 1, 1, 16)
    return make_model(nodes, inputs, outputs, inits), feeds


def _lowered_script(proto) -> str:
    import ir
    from backends.tvm.lower import lower_model
    from passes.api import compress
    model = ir.load_model(proto)
    compress(model, "cleanup")
    return lower_model(model, target=parse_target("host")).mod.script()


@pytest.mark.parametrize("scale_op, mask, transpose", [
    ("Div", True, True), ("Mul", False, False), ("Div", True, False)])
def test_attention_graph_is_fused_and_matches_onnxruntime(scale_op, mask, transpose):
    proto, feeds = _attention_graph(scale_op, mask, transpose)
    script = _lowered_script(proto)
    assert script.count("call_tir(cls.attention") == 1 and "softmax_rows" not in script
    np.testing.assert_allclose(tvm_run(proto, feeds)[0], ort_run(proto, feeds)[0],
                               rtol=1e-4, atol=1e-5)


def test_scores_used_elsewhere_are_not_fused():
    """The scores are also a graph output: the kernel would not produce them, so the ops stay
    separate and both outputs still match."""
    proto, feeds = _attention_graph(scores_output=True)
    assert "cls.attention" not in _lowered_script(proto)
    for got, want in zip(tvm_run(proto, feeds), ort_run(proto, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
