"""Channel-group rules for transformers and the other ops: attention heads are pruned whole
across Q/K/V, the head Reshapes and the output projection; FFN hidden units through an erf GELU;
Softmax/Slice/LayerNorm axes are frozen. Heads or units whose weights are zero are the ones
removed, so the pruned model's outputs must equal the original's."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import passes
from passes.prune import analyze_groups
from tests.helpers import run_onnx

RNG = np.random.default_rng(1)
S, HEADS, HEAD, HIDDEN, FFN = 4, 4, 8, 32, 64


def _attention_ffn_model(dead_heads=(), dead_units=()):
    """x[1,S,32] -> 4-head self-attention (+ residual) -> FFN 32->64 (erf GELU) -> 32 -> y.

    Heads in `dead_heads` have zero value columns (their context is 0); FFN units in
    `dead_units` have zero up-projection columns and bias (GELU(0) = 0)."""
    w = {name: RNG.standard_normal(shape).astype(np.float32) * 0.3 for name, shape in {
        "wq": (HIDDEN, HIDDEN), "wk": (HIDDEN, HIDDEN), "wv": (HIDDEN, HIDDEN),
        "wo": (HIDDEN, HIDDEN), "bq": (HIDDEN,), "bk": (HIDDEN,), "bv": (HIDDEN,),
        "up": (HIDDEN, FFN), "bup": (FFN,), "down": (FFN, HIDDEN)}.items()}
    for head in dead_heads:
        w["wv"][:, head * HEAD:(head + 1) * HEAD] = 0
        w["bv"][head * HEAD:(head + 1) * HEAD] = 0
    for unit in dead_units:
        w["up"][:, unit] = 0
        w["bup"][unit] = 0
    w["split"] = np.array([1, S, HEADS, HEAD], np.int64)
    w["merge"] = np.array([1, S, HIDDEN], np.int64)
    w["sqrt2"], w["one"], w["half"] = (np.array(v, np.float32) for v in (np.sqrt(2), 1, .5))
    w["scale"] = np.array(np.sqrt(HEAD), np.float32)
    nodes = []
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}m"]),
                  helper.make_node("Add", [f"{p}m", f"b{p}"], [f"{p}a"]),
                  helper.make_node("Reshape", [f"{p}a", "split"], [f"{p}r"]),
                  helper.make_node("Transpose", [f"{p}r"], [f"{p}t"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["qt", "kt"], ["scores"]),
              helper.make_node("Div", ["scores", "scale"], ["scaled"]),
              helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vt"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctxt", "merge"], ["ctxr"]),
              helper.make_node("MatMul", ["ctxr", "wo"], ["attn"]),
              helper.make_node("Add", ["attn", "x"], ["h"]),
              helper.make_node("MatMul", ["h", "up"], ["u"]),
              helper.make_node("Add", ["u", "bup"], ["ub"]),
              helper.make_node("Div", ["ub", "sqrt2"], ["ud"]),
              helper.make_node("Erf", ["ud"], ["ue"]),
              helper.make_node("Add", ["ue", "one"], ["u1"]),
              helper.make_node("Mul", ["ub", "u1"], ["ug"]),
              helper.make_node("Mul", ["ug", "half"], ["act"]),
              helper.make_node("MatMul", ["act", "down"], ["d"]),
              helper.make_node("Add", ["d", "h"], ["y"])]
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, HIDDEN])],
        [numpy_helper.from_array(a, n) for n, a in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _groups(proto):
    model = ir.load_model(proto)
    passes.prepare(model)
    return analyze_groups(model.graph)


def _dims(proto):
    return {t.name.split("_")[0]: list(t.dims) for t in proto.graph.initializer}


def test_heads_and_ffn_units_form_prunable_groups_and_residual_dim_is_frozen():
    groups = {g.size: g for g in _groups(_attention_ffn_model()) if g.sources}
    assert groups[HEADS].kind == "heads" and groups[HEADS].prunable
    members = groups[HEADS].describe()["members"]
    assert {m.split(":")[1] for m in members} == {"source", "sink", "param"}
    assert groups[FFN].prunable and groups[FFN].kind == "channels"
    assert not groups[HIDDEN].prunable and "graph input" in groups[HIDDEN].frozen


def test_dead_heads_removed_exactly_and_reshapes_follow():
    original = _attention_ffn_model(dead_heads=[1, 3])
    pruned = passes.apply(original, "prune-channels:ratio=0:head_ratio=0.5:criterion=l1")
    dims = _dims(pruned)
    assert dims["wq"] == [HIDDEN, 2 * HEAD] and dims["wo"] == [2 * HEAD, HIDDEN]
    x = RNG.standard_normal((1, S, HIDDEN)).astype(np.float32)
    # The V columns of heads 1 and 3 are zero, so their context is 0 and removing them (with
    # their Q/K columns, which only shape their own attention) must not change y.
    np.testing.assert_allclose(run_onnx(pruned, {"x": x})[0], run_onnx(original, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_dead_ffn_units_removed_exactly_through_gelu():
    dead = RNG.choice(FFN, 32, replace=False)
    original = _attention_ffn_model(dead_units=dead)
    pruned = passes.apply(original, "prune-channels:ratio=0.5:head_ratio=0:criterion=l2")
    assert _dims(pruned)["down"] == [32, HIDDEN] and _dims(pruned)["wq"] == [HIDDEN, HIDDEN]
    x = RNG.standard_normal((1, S, HIDDEN)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(pruned, {"x": x})[0], run_onnx(original, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_show_groups_reports_heads_and_frozen_reasons(capsys):
    model = ir.load_model(_attention_ffn_model())
    report = passes.compress(model, "show-groups")
    groups = report.passes[-1].details["groups"]
    assert any(g["kind"] == "heads" and g["prunable"] for g in groups)
    assert any(not g["prunable"] and g["frozen"] for g in groups)
    assert "prunable" in capsys.readouterr().out


def _conv_chain(mid_nodes, mid_shape_c=16):
    w1 = RNG.standard_normal((16, 3, 1, 1)).astype(np.float32)
    w1[8:] = 0  # channels 8..15 are dead: pruning them must be exact wherever it is allowed
    inits = {"w1": w1, "w2": RNG.standard_normal((4, mid_shape_c, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"]), *mid_nodes,
             helper.make_node("Conv", ["m", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("mid", [
    [helper.make_node("MaxPool", ["c"], ["m"], kernel_shape=[2, 2])],
    [helper.make_node("Resize", ["c", "", "scales"], ["m"], mode="nearest")],
    [helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
     helper.make_node("Transpose", ["t"], ["m"], perm=[0, 3, 1, 2])],
    [helper.make_node("HardSwish", ["c"], ["h"]), helper.make_node("Mul", ["h", "h"], ["m"])],
    [helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=1)],
], ids=["pool", "resize", "transpose", "hardswish-mul-self", "reduce-spatial"])
def test_pass_through_rules_prune_exactly(mid):
    proto = _conv_chain(mid)
    if any(n.op_type == "Resize" for n in mid):
        proto.graph.initializer.append(numpy_helper.from_array(
            np.array([1, 1, 2, 2], np.float32), "scales"))
    pruned = passes.apply(proto, "prune-channels:ratio=0.5")
    assert _dims(pruned)["w2"][1] == 8
    x = RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(pruned, {"x": x})[0], run_onnx(proto, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mid,reason", [
    ([helper.make_node("Softmax", ["c"], ["m"], axis=1)], "Softmax"),
    ([helper.make_node("ReduceMean", ["c"], ["r"], axes=[1], keepdims=1),
      helper.make_node("Add", ["c", "r"], ["m"])], "ReduceMean"),
])
def test_axis_mixing_ops_freeze_the_channel_axis(mid, reason):
    groups = [g for g in _groups(_conv_chain(mid)) if g.sources and g.size == 16]
    assert len(groups) == 1 and not groups[0].prunable
    assert any(reason in r for r in groups[0].frozen)


def test_partial_slice_freezes_channels():
    proto = _conv_chain([helper.make_node("Slice", ["c", "st", "en", "ax"], ["m"])], 8)
    for name, value in (("st", 0), ("en", 8), ("ax", 1)):
        proto.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    (group,) = [g for g in _groups(proto) if g.sources and g.size == 16]
    assert not group.prunable and any("Slice" in r for r in group.frozen)


def test_minilm_heads_and_ffn_pruned_valid_and_smaller(tmp_path):
    from models.minilm import model_path
    path = model_path(seq_len=32)
    model = ir.load_model(path)
    report = passes.compress(model, "prune-channels:ratio=0.3:head_ratio=0.25:criterion=l2")
    details = report.passes[-1].details
    assert details["groups_pruned"] == 12  # 6 layers x (heads, FFN units)
    proto = ir.to_onnx(model)
    heads = {tuple(t.dims) for t in proto.graph.initializer if "query.weight" in t.name}
    ffn = {tuple(t.dims) for t in proto.graph.initializer if "intermediate.dense.weight" in t.name}
    assert heads == {(384, 9 * 32)} and ffn == {(384, 1072)}  # 9 of 12 heads, 1536*0.7 -> x8
    feed = {"input_ids": np.full((1, 32), 101, np.int64),
            "attention_mask": np.ones((1, 32), np.int64)}
    outputs = run_onnx(proto, feed)
    assert [o.shape for o in outputs] == [(1, 384), (1, 32, 384)]
    assert report.after["macs"] < 0.75 * report.before["macs"]


def test_sensitivity_schedule_spreads_ratios_unevenly():
    dead = RNG.choice(FFN, 32, replace=False)
    proto = _attention_ffn_model(dead_units=dead)
    model = ir.load_model(proto)
    report = passes.compress(model, "prune-channels:ratio=0.25:schedule=sensitivity:round_to=1")
    assert report.passes[-1].details["groups_pruned"] >= 1
    assert report.after["macs"] < report.before["macs"]


def test_compensation_is_exact_for_constant_channels():
    """Channels with zero weights but a positive bias output a constant after ReLU: removing them
    loses a constant that `compensate` must put back into the next layer's bias exactly."""
    w1 = RNG.standard_normal((16, 3, 1, 1)).astype(np.float32)
    b1 = RNG.standard_normal(16).astype(np.float32)
    w1[8:], b1[8:] = 0, np.abs(b1[8:]) + 0.5
    inits = {"w1": w1, "b1": b1, "w2": RNG.standard_normal((4, 16, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"]),
             helper.make_node("Relu", ["c"], ["m"]),
             helper.make_node("Conv", ["m", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)
    for compensate, exact in ((False, False), (True, True)):
        pruned = passes.apply(proto, f"prune-channels:ratio=0.5:criterion=l1:"
                                     f"compensate={str(compensate).lower()}")
        assert _dims(pruned)["w2"] == [4, 8, 1, 1]
        same = np.allclose(run_onnx(pruned, {"x": x})[0], run_onnx(proto, {"x": x})[0],
                           rtol=1e-5, atol=1e-5)
        assert same == exact
