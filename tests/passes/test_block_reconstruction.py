"""Block-wise reconstruction: where the blocks are cut, that tuning lowers the error on inputs
it did not see while the zeros stay, that a step too large leaves a block as it was, and the
sparsify option end to end."""

import numpy as np
import pytest

import ir
import passes
from ir.shape_inference import infer_shapes
from passes.block_reconstruction import TunedLayer, _BlockFit, find_blocks, reconstruct_blocks
from passes.calibration import CalibrationSet, capture
from passes.sparsify.layers import find_targets
from tests.passes.sparsify.graphs import residual_mlp

SPARSE = "sparsify:pattern=nm:nm=2of4:method=magnitude:min_size=0"


def _sparse_pair(seed=0, **shape):
    """The dense residual MLP and a 2:4 magnitude-sparsified copy (fc_in and fc_out stay
    dense: first and last layers)."""
    proto = residual_mlp(seed=seed, up_bias=True, **shape)
    reference = ir.load_model(proto)
    model = ir.load_model(proto)
    passes.compress(model, SPARSE)
    for m in (reference, model):
        infer_shapes(m)
    return reference, model


def _tuned(model):
    layers = []
    for target in find_targets(model.graph, ["MatMul"]):
        found = target.node.output.sole_add()
        bias = found[0].input(found[1]) if found else None
        bias = bias if bias is not None and bias.is_constant else None
        keep = target.weight.const != 0 if "sparsity" in target.weight.meta else None
        layers.append(TunedLayer(target.node, target.weight, bias, keep))
    return layers


def _feeds(count, seed, tokens=8, width=32):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, tokens, width)).astype(np.float32)}
            for _ in range(count)]


def _output_error(model, reference, feeds):
    calib = CalibrationSet({"x": np.concatenate([f["x"] for f in feeds])[:, None]})
    got = np.concatenate(capture(model, ["y"], calib)["y"])
    want = np.concatenate(capture(reference, ["y"], calib)["y"])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_blocks_end_at_the_layer_norms_and_start_at_the_first_sparse_layer():
    _, model = _sparse_pair(blocks=3)
    blocks = find_blocks(model, _tuned(model))
    assert [b.outputs for b in blocks] == [["s1"], ["s2"], ["s3"]]
    # The dense first layer's output is read as it is; the dense last layer after the last
    # sparse block is not tuned.
    assert [b.inputs for b in blocks] == [["s0"], ["s1"], ["s2"]]
    assert [[layer.node.name for layer in b.layers] for b in blocks] == [
        ["up0", "down0"], ["up1", "down1"], ["up2", "down2"]]
    assert [b.nodes[-1].name for b in blocks] == ["ln0", "ln1", "ln2"]


def test_a_stretch_without_layers_joins_the_block_before_up_to_the_graph_output():
    # Only some layers are candidates: after up2 nothing else is, so the last block runs on to
    # the graph output and is compared there.
    _, model = _sparse_pair(blocks=3)
    layers = [layer for layer in _tuned(model) if layer.node.name in ("up1", "down1", "up2")]
    blocks = find_blocks(model, layers)
    assert [b.inputs for b in blocks] == [["s1"], ["s2"]]
    assert [b.outputs for b in blocks] == [["s2"], ["y"]]
    assert blocks[-1].nodes[-1].name == "fc_out"


def test_a_dense_stretch_between_sparse_blocks_runs_untuned():
    proto = residual_mlp(blocks=3, up_bias=True)
    model = ir.load_model(proto)
    passes.compress(model, SPARSE + ":exclude=up1+down1")
    blocks = find_blocks(model, _tuned(model))
    assert [b.outputs for b in blocks] == [["s1"], ["s2"], ["s3"]]
    assert [[layer.node.name for layer in b.layers] for b in blocks] == [
        ["up0", "down0"], [], ["up2", "down2"]]
    reference = ir.load_model(proto)
    dense_before = model.graph.initializers["w_up1"].const.copy()
    records = reconstruct_blocks(model, reference, _feeds(48, seed=3), _tuned(model), epochs=1,
                                 step=0.01, held_out=16)
    assert len(records) == 2
    np.testing.assert_array_equal(model.graph.initializers["w_up1"].const, dense_before)


def test_reconstruction_lowers_the_error_on_unseen_inputs_and_keeps_the_zeros():
    reference, model = _sparse_pair(blocks=3, hidden=64)
    layers = _tuned(model)
    zeros = {layer.weight.name: layer.weight.const == 0 for layer in layers}
    unseen = _feeds(32, seed=7)
    before = _output_error(model, reference, unseen)
    records = reconstruct_blocks(model, reference, _feeds(160, seed=1), layers, epochs=4,
                                 step=0.01, held_out=32)
    after = _output_error(model, reference, unseen)
    assert after < 0.8 * before, (before, after)
    assert len(records) == 3
    for record in records:
        start, best = record["held_out_error"]
        assert best < start and record["epoch_kept"] >= 1
    for layer in layers:
        if layer.keep is not None:
            assert (layer.weight.const[zeros[layer.weight.name]] == 0).all()
            assert layer.weight.const.dtype == np.float32


def test_a_block_that_only_gets_worse_keeps_its_weights():
    reference, model = _sparse_pair(blocks=2)
    layers = _tuned(model)
    before = {p.name: p.const.copy() for layer in layers for p in layer.parameters()}
    records = reconstruct_blocks(model, reference, _feeds(64, seed=2), layers, epochs=2,
                                 step=0.9, held_out=16)
    assert all(r["epoch_kept"] == 0 for r in records)
    for layer in layers:
        for p in layer.parameters():
            np.testing.assert_array_equal(p.const, before[p.name])


def test_the_sparsify_option_lowers_the_output_error_at_the_same_density():
    proto = residual_mlp(width=32, hidden=64, blocks=3, tokens=8)
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((160, 1, 8, 32)).astype(np.float32)}
    unseen = _feeds(32, seed=9)
    base = "sparsify:pattern=nm:nm=2of4:method=sparsegpt:min_size=0:samples=160"
    errors = {}
    for label, extra in (("plain", ""), ("tuned", ":reconstruct=true:reconstruct_step=0.01:"
                                                  "reconstruct_epochs=4")):
        model = ir.load_model(proto)
        report = passes.compress(model, base + extra, calibration=calib)
        details = report.passes[0].details
        assert all(layer["density"] == 0.5 for layer in details["layers"])
        assert ("reconstruction" in details) == (label == "tuned")
        errors[label] = _output_error(model, ir.load_model(proto), unseen)
        for value in model.graph.initializers.values():
            if "sparsity" in value.meta:
                assert (value.const != 0).mean() == 0.5
    assert errors["tuned"] < 0.9 * errors["plain"], errors


@pytest.mark.parametrize("extra,message", [
    ("reconstruct_step=0", "reconstruct_step"),
    ("reconstruct_step=2", "reconstruct_step"),
    ("reconstruct_epochs=0", "reconstruct_epochs"),
    ("reconstruct_samples=0", "reconstruct_samples"),
])
def test_bad_reconstruction_options_are_refused(extra, message):
    with pytest.raises(passes.OptionError, match=message):
        passes.apply(residual_mlp(), f"sparsify:method=sparsegpt:reconstruct=true:{extra}",
                     calibration={"x": np.zeros((4, 1, 8, 32), np.float32)})


def test_padding_tokens_do_not_count_in_the_error():
    _, model = _sparse_pair(blocks=1)
    block, = find_blocks(model, _tuned(model))
    fit = _BlockFit(model, block, ir.to_onnx(model))
    feed = {"s0": np.random.default_rng(4).standard_normal((1, 8, 32)).astype(np.float32)}
    wanted = {name: value.copy() for name, value in fit.outputs(feed).items()}
    wanted[block.outputs[0]][0, 6:] += 100.0  # the two padding tokens
    mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.int64)
    assert fit.error(feed, wanted, mask) < 1e-10
    assert fit.error(feed, wanted, None) > 1.0
    assert not np.abs(fit.gradients(feed, wanted, mask)[block.layers[0].weight.name]).any()


def test_a_block_without_gradient_rules_is_skipped_unchanged(monkeypatch):
    from passes import vjp
    monkeypatch.delitem(vjp.VJP_RULES, "Relu")
    reference, model = _sparse_pair(blocks=2)
    layers = _tuned(model)
    before = {p.name: p.const.copy() for layer in layers for p in layer.parameters()}
    records = reconstruct_blocks(model, reference, _feeds(32, seed=5), layers, epochs=1,
                                 step=0.01, held_out=8)
    assert len(records) == 2 and all("Relu" in r["skipped"] for r in records)
    for layer in layers:
        for p in layer.parameters():
            np.testing.assert_array_equal(p.const, before[p.name])


def test_conv_layers_are_left_as_they_are_with_a_note():
    from tests.passes.sparsify.graphs import conv_net
    calib = {"x": np.random.default_rng(0).standard_normal((8, 1, 4, 8, 8)).astype(np.float32)}
    model = ir.load_model(conv_net())
    report = passes.compress(model, "sparsify:method=sparsegpt:min_size=0:samples=8:"
                                    "include_first_last=true:reconstruct=true", calibration=calib)
    result = report.passes[0]
    assert any("no sparse MatMul/Gemm layer" in note for note in result.notes)
    assert result.details["reconstruction"] == []


def test_a_dense_layer_in_a_block_with_a_sparse_one_is_tuned_with_it():
    model = ir.load_model(residual_mlp(blocks=2, up_bias=True))
    passes.compress(model, SPARSE + ":exclude=up0")
    blocks = find_blocks(model, _tuned(model))
    assert [[(layer.node.name, layer.keep is not None) for layer in b.layers] for b in blocks] \
        == [[("up0", False), ("down0", True)], [("up1", True), ("down1", True)]]
    assert blocks[0].inputs == ["s0"]  # fc_in, dense and alone before them, is not tuned
