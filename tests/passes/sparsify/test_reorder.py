"""Channel reordering for N:M sparsity (`sparsify:reorder=true`, passes/sparsify/permute.py):
the search keeps more saliency than the identity order; the reordered model, and one whose
heads took new orthogonal bases, computes the same function; the analysis refuses head-size
axes that a constant or a nonlinear op reads; the pass loses less output than without
reordering, selects the same layers, and refuses magnitude masks."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

import ir
import passes
from passes.prune.apply import reorder_channels
from passes.sparsify.layers import find_targets
from passes.sparsify.patterns import nm_group_nonzeros
from passes.sparsify.permute import kept_saliency, nm_order, reorder_candidates
from tests.helpers import run_onnx
from tests.passes.prune.test_heads_and_rules import HEAD, HEADS, HIDDEN, S, _attention_ffn_model
from tests.passes.sparsify.graphs import mlp


def test_order_spreads_clustered_strong_columns_over_the_groups():
    # Columns 0-3 strong, 4-7 weak in every row: the identity 2:4 mask keeps 10+10+1+1; an
    # order putting two strong columns in each group keeps 10+10+10+10.
    saliency = np.tile(np.array([10.0] * 4 + [1.0] * 4), (3, 1))
    order = nm_order(saliency, 2, 4)
    assert sorted(order) == list(range(8))
    assert kept_saliency(saliency, 2, 4) == 3 * 22
    assert kept_saliency(saliency[:, order], 2, 4) == 3 * 40


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_order_never_keeps_less_than_the_identity(n, m):
    rng = np.random.default_rng(n * 10 + m)
    saliency = rng.gamma(0.5, size=(16, 64)) * rng.gamma(1.0, size=64)[None, :]
    order = nm_order(saliency, n, m)
    assert sorted(order) == list(range(64))
    assert kept_saliency(saliency[:, order], n, m) > kept_saliency(saliency, n, m)


def _model(proto):
    model = ir.load_model(proto)
    passes.prepare(model)
    return model


def test_candidates_are_the_ffn_units_and_the_entries_inside_heads():
    model = _model(_attention_ffn_model())
    candidates = reorder_candidates(model.graph, find_targets(model.graph, ["MatMul"]), 4)
    by_kind = {c.within_heads: c for c in candidates}
    assert set(by_kind) == {True, False}
    assert [t.weight.const.shape for t in by_kind[False].consumers] == [(64, HIDDEN)]
    assert [t.weight.const.shape for t in by_kind[True].consumers] == [(HIDDEN, HIDDEN)]
    assert by_kind[True].blocks == HEADS


def test_reordered_model_computes_the_same_outputs():
    proto = _attention_ffn_model()
    model = _model(proto)
    candidates = reorder_candidates(model.graph, find_targets(model.graph, ["MatMul"]), 4)
    rng = np.random.default_rng(0)
    orders = []
    for c in candidates:
        width = c.group.size * (c.group.unit_span if c.within_heads else 1)
        if c.within_heads:  # a different order inside every head
            order = np.concatenate([h * HEAD + rng.permutation(HEAD) for h in range(HEADS)])
        else:
            order = rng.permutation(width)
        orders.append((c.group, order, c.within_heads))
    reorder_channels(model.graph, orders)
    reordered = ir.to_onnx(model)
    changed = {t.name for t in reordered.graph.initializer if t.name.endswith("_reordered")}
    assert len(changed) >= 6  # wv, bv, wq, bq, wk, bk, wo; up, bup, down
    x = rng.standard_normal((1, S, HIDDEN)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(reordered, {"x": x})[0], run_onnx(proto, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def _orthogonal_bases(rng):
    return np.stack([np.linalg.qr(rng.standard_normal((HEAD, HEAD)))[0] for _ in range(HEADS)])


def test_new_basis_inside_heads_computes_the_same_outputs():
    proto = _attention_ffn_model()
    model = _model(proto)
    candidates = reorder_candidates(model.graph, find_targets(model.graph, ["MatMul"]), 4)
    heads = next(c for c in candidates if c.within_heads)
    assert heads.rotatable
    rng = np.random.default_rng(2)
    reorder_channels(model.graph, [], [(heads.group, _orthogonal_bases(rng))])
    x = rng.standard_normal((1, S, HIDDEN)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(ir.to_onnx(model), {"x": x})[0],
                               run_onnx(proto, {"x": x})[0], rtol=1e-4, atol=1e-4)


def _with_op_after_value_split(proto, op_type):
    """The attention model with `op_type` applied to V right after its head split."""
    graph = proto.graph
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] == "vr":
            node.input[0] = "vr_op"
    split = next(i for i, node in enumerate(graph.node) if node.output[0] == "vr")
    graph.node.insert(split + 1, helper.make_node(op_type, ["vr"], ["vr_op"]))
    return proto


def test_a_nonlinear_op_on_the_head_entries_allows_reordering_but_no_new_basis():
    # Relu treats entries alike (a reordering commutes with it) but not a rotation.
    proto = _with_op_after_value_split(_attention_ffn_model(), "Relu")
    model = _model(proto)
    candidates = reorder_candidates(model.graph, find_targets(model.graph, ["MatMul"]), 4)
    heads = next(c for c in candidates if c.within_heads)
    assert not heads.rotatable
    report = passes.compress(ir.load_model(proto), "sparsify:pattern=nm:nm=2of4:method=wanda:"
                             "samples=8:include_first_last=true:min_size=1:reorder=true")
    kinds = {r["kind"] for r in report.passes[-1].details["reordered"]}
    assert kinds == {"channels", "entries within heads"}


def test_a_constant_on_the_head_size_axis_keeps_the_entries_in_place():
    # A rotary-like per-entry scale on Q's head-size axis: reordering the entries would have
    # to reorder that constant too, which the analysis does not model, so it must refuse.
    proto = _attention_ffn_model()
    graph = proto.graph
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] == "qr":
            node.input[0] = "qr_scaled"
    split = next(i for i, node in enumerate(graph.node) if node.output[0] == "qr")
    graph.node.insert(split + 1, helper.make_node("Mul", ["qr", "entry_scale"], ["qr_scaled"]))
    graph.initializer.append(numpy_helper.from_array(
        np.linspace(0.5, 1.5, HEAD).astype(np.float32), "entry_scale"))
    model = _model(proto)
    candidates = reorder_candidates(model.graph, find_targets(model.graph, ["MatMul"]), 4)
    assert [c.within_heads for c in candidates] == [False]
    # show-groups says which heads groups allow it.
    for variant, reorderable in ((_attention_ffn_model(), True), (proto, False)):
        groups = passes.compress(ir.load_model(variant), "show-groups").passes[-1].details
        heads = [g for g in groups["groups"] if g["kind"] == "heads"]
        assert [g["entries_reorderable"] for g in heads] == [reorderable]


def test_pass_reorders_then_sparsifies_with_less_output_error():
    # fc1 reads 32 hidden units whose first half is 10x stronger: in the identity order each
    # group of 4 holds four strong or four weak inputs, and 2:4 drops half the strong ones;
    # reordered, every group pairs two strong with two weak inputs.
    proto = mlp(widths=(16, 32, 8), seed=5)
    w0 = next(t for t in proto.graph.initializer if t.name == "w0")
    scaled = numpy_helper.to_array(w0) * np.repeat([10.0, 0.1], 16)[None, :]
    w0.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), "w0"))
    x = np.random.default_rng(6).standard_normal((1, 4, 16)).astype(np.float32)
    spec = ("sparsify:pattern=nm:nm=2of4:method=wanda:samples=8:include_first_last=true:"
            "min_size=1:exclude=fc0")  # only fc1's mask depends on the order
    errors = []
    for options in ("", ":reorder=true"):
        sparse = passes.apply(proto, spec + options)
        for tensor in sparse.graph.initializer:
            if tensor.name.startswith("w1"):
                assert nm_group_nonzeros(numpy_helper.to_array(tensor).T, 4).max() <= 2
        got, want = run_onnx(sparse, {"x": x})[0], run_onnx(proto, {"x": x})[0]
        errors.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    assert errors[1] < 0.2 * errors[0]


def test_reorder_report_and_non_nm_patterns():
    proto = _attention_ffn_model()
    model = ir.load_model(proto)
    report = passes.compress(model, "sparsify:pattern=nm:nm=2of4:method=wanda:samples=8:"
                                    "include_first_last=true:min_size=1:reorder=true")
    records = report.passes[-1].details["reordered"]
    # With calibration data the heads get a new basis (their head-size axes meet linear ops).
    assert {r["kind"] for r in records} == {"channels", "basis within heads"}
    assert all(r["kept_after"] >= r["kept_before"] for r in records)
    # Unstructured masks do not depend on the order: nothing is reordered.
    model = ir.load_model(proto)
    report = passes.compress(model, "sparsify:sparsity=0.5:method=wanda:samples=8:min_size=1:"
                                    "reorder=true")
    assert "reordered" not in report.passes[-1].details
    assert any("reorder=true only changes N:M masks" in note for note in report.passes[-1].notes)
    # A magnitude mask ignores activations: reordering for it is refused with one line.
    with pytest.raises(passes.OptionError, match="reorder=true needs method=wanda"):
        passes.compress(ir.load_model(proto), "sparsify:pattern=nm:reorder=true")


def _pointwise_net(middle_kernel: int):
    """x[1,8,6,6] -> Conv3x3(16) -> Relu -> Conv kxk(32) -> Relu -> Conv1x1(8) -> y."""
    rng = np.random.default_rng(3)
    shapes = {"c1": (16, 8, 3, 3), "c2": (32, 16, middle_kernel, middle_kernel),
              "c3": (8, 32, 1, 1)}
    nodes, current = [], "x"
    for name, shape in shapes.items():
        pad = shape[2] // 2
        out = "y" if name == "c3" else f"{name}_out"
        nodes.append(helper.make_node("Conv", [current, f"{name}_w", f"{name}_b"], [out],
                                      name=name, pads=[pad] * 4))
        if name != "c3":
            nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"]))
            current = f"{name}_relu"
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), f"{n}_w")
             for n, s in shapes.items()]
    inits += [numpy_helper.from_array(rng.standard_normal(s[0]).astype(np.float32), f"{n}_b")
              for n, s in shapes.items()]
    graph = helper.make_graph(
        nodes, "pointwise", [helper.make_tensor_value_info("x", 1, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", 1, [1, 8, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("middle_kernel,reordered", [(1, ["c2", "c3"]), (3, ["c3"])])
def test_conv_channels_are_reordered_only_for_pointwise_consumers(middle_kernel, reordered):
    # A 3x3 consumer's N:M groups run over kernel positions across channels, so the channels
    # feeding it keep their order; the channels feeding the 1x1 conv are reordered.
    proto = _pointwise_net(middle_kernel)
    model = ir.load_model(proto)
    report = passes.compress(model, "sparsify:pattern=nm:nm=2of4:method=wanda:samples=8:"
                                    "include_first_last=true:min_size=1:reorder=true")
    records = report.passes[-1].details["reordered"]
    assert sorted(name for r in records for name in r["consumers"]) == reordered
    assert all(r["kept_after"] > r["kept_before"] for r in records)
    # Reordering alone (the same orders on the dense model) keeps the function.
    dense = ir.load_model(proto)
    passes.prepare(dense)
    candidates = reorder_candidates(dense.graph, find_targets(dense.graph, ["Conv"]), 4)
    rng = np.random.default_rng(4)
    reorder_channels(dense.graph, [(c.group, rng.permutation(c.group.size), False)
                                   for c in candidates])
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(ir.to_onnx(dense), {"x": x})[0],
                               run_onnx(proto, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_layers_excluded_by_weight_name_stay_dense_after_reordering():
    # Reordering the FFN units for `down` rewrites (and renames) `up`'s columns too; the
    # selection must not be redone by name, or the excluded `up` would be sparsified.
    proto = _attention_ffn_model()
    report = passes.compress(ir.load_model(proto), "sparsify:pattern=nm:nm=2of4:method=wanda:"
                             "samples=8:include_first_last=true:min_size=1:reorder=true:"
                             "exclude=up")
    details = report.passes[-1].details
    assert {r["kind"] for r in details["reordered"]} == {"channels", "basis within heads"}
    weights = [layer["weight"] for layer in details["layers"]]
    assert len(weights) == 5 and not any(name.startswith("up") for name in weights)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_consumers_in_either_weight_layout(trans_b):
    # x[4,16] -> Gemm(32) -> Relu -> Gemm(8): the hidden units feed the second Gemm, whose
    # weight is [in, out] (transB=0) or [out, in] (transB=1); the first half of the units is 10x
    # stronger, so only a reordering lets 2:4 keep every strong input.
    rng = np.random.default_rng(7)
    w1 = (rng.standard_normal((16, 32)) * np.repeat([10.0, 0.1], 16)[None, :]).astype(np.float32)
    w2 = rng.standard_normal((32, 8)).astype(np.float32)
    layouts = {"w1": w1.T if trans_b else w1, "w2": w2.T if trans_b else w2}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=trans_b, name="g1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=trans_b, name="g2")]
    inits = [numpy_helper.from_array(a, n) for n, a in layouts.items()]
    inits.append(numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"))
    graph = helper.make_graph(nodes, "gemms", [helper.make_tensor_value_info("x", 1, [4, 16])],
                              [helper.make_tensor_value_info("y", 1, [4, 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    spec = ("sparsify:pattern=nm:nm=2of4:method=wanda:samples=8:include_first_last=true:"
            "min_size=1:exclude=g1")
    errors = []
    for options in ("", ":reorder=true"):
        sparse = passes.apply(proto, spec + options)
        got, want = run_onnx(sparse, {"x": x})[0], run_onnx(proto, {"x": x})[0]
        errors.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    assert errors[1] < 0.2 * errors[0]


def test_a_constant_read_twice_along_the_group_is_reordered_once():
    # The same bias constant is added twice to the hidden units (exporters dedupe identical
    # initializers): the group acts on it twice, and it must still be reordered once.
    rng = np.random.default_rng(8)
    inits = {"w0": rng.standard_normal((8, 16)), "b": rng.standard_normal(16),
             "w1": rng.standard_normal((16, 4))}
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r"]),
             helper.make_node("Add", ["r", "b"], ["a2"]),
             helper.make_node("MatMul", ["a2", "w1"], ["y"])]
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("x", 1, [2, 8])],
        [helper.make_tensor_value_info("y", 1, [2, 4])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = _model(proto)
    [candidate] = reorder_candidates(model.graph, find_targets(model.graph, ["MatMul"]), 4)
    reorder_channels(model.graph, [(candidate.group, rng.permutation(16), False)])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(ir.to_onnx(model), {"x": x})[0],
                               run_onnx(proto, {"x": x})[0], rtol=1e-5, atol=1e-5)
