"""prune-layers: residual blocks and transformer layers are found, the least important ones are
removed (a block whose branch is exactly zero must be the one chosen, and removing it must not
change the outputs), and the model stays valid."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import passes
from models import digits
from passes.prune import find_blocks
from tests.helpers import run_onnx

RNG = np.random.default_rng(2)


def _residual_stack(zero_block: int, blocks: int = 3):
    """x[1,8,4,4] -> `blocks` x (y = x + Conv(Relu(Conv(x)))) -> GAP -> y; one branch is 0."""
    nodes, inits, x = [], {}, "x"
    for i in range(blocks):
        w1 = RNG.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
        w2 = RNG.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
        if i == zero_block:
            w2[:] = 0
        inits.update({f"w{i}a": w1, f"w{i}b": w2})
        nodes += [helper.make_node("Conv", [x, f"w{i}a"], [f"a{i}"], pads=[1] * 4),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
                  helper.make_node("Conv", [f"r{i}", f"w{i}b"], [f"b{i}"], pads=[1] * 4),
                  helper.make_node("Add", [x, f"b{i}"], [f"s{i}"], name=f"block{i}")]
        x = f"s{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"]))
    graph = helper.make_graph(
        nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 1, 1])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("criterion", ["change", "output"])
def test_zero_branch_block_is_removed_and_outputs_unchanged(criterion):
    original = _residual_stack(zero_block=1)
    model = ir.load_model(original)
    passes.prepare(model)
    assert [b.name for b in find_blocks(model.graph, ("residual",))] == ["block0", "block1",
                                                                          "block2"]
    report = passes.compress(model, f"prune-layers:count=1:criterion={criterion}")
    assert report.passes[-1].details["removed"] == ["block1"]
    pruned = ir.to_onnx(model)
    assert {n.name for n in pruned.graph.node if n.op_type == "Add"} == {"block0", "block2"}
    x = RNG.standard_normal((1, 8, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(pruned, {"x": x})[0], run_onnx(original, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_adjacent_blocks_can_both_go():
    model = ir.load_model(_residual_stack(zero_block=0))
    passes.compress(model, "prune-layers:ratio=0.67:criterion=change")
    proto = ir.to_onnx(model)
    onnx.checker.check_model(proto)
    assert sum(n.op_type == "Add" for n in proto.graph.node) == 1


def test_projection_shortcut_is_not_a_residual_block():
    model = ir.load_model(digits.MODEL_PATH)
    passes.compress(model, "cleanup")
    names = [b.name for b in find_blocks(model.graph, ("residual",))]
    assert len(names) == 3 and not any("layers.2" in n for n in names)  # layers.2 downsamples


def test_digits_drop_one_block(tmp_path):
    calib = digits.calibration_npz(tmp_path / "calib.npz")
    model = ir.load_model(digits.MODEL_PATH)
    report = passes.compress(model, "cleanup,prune-layers:count=1:samples=8", calibration=calib)
    assert report.after["macs"] < 0.8 * report.before["macs"]
    proto = ir.to_onnx(model)
    onnx.checker.check_model(proto)
    assert digits.evaluate(proto.SerializeToString()) > 90.0


def test_removing_every_block_is_refused():
    with pytest.raises(passes.OptionError):
        passes.compress(ir.load_model(_residual_stack(0)), "prune-layers:count=3")


@pytest.mark.slow
def test_minilm_two_transformer_layers(tmp_path):
    from models.minilm import calibration_npz, cosine_to_reference, model_path
    path = model_path(seq_len=32)
    calib = calibration_npz(tmp_path / "calib.npz", n=16, seq_len=32)
    model = ir.load_model(path)
    report = passes.compress(model, "prune-layers:count=2:kind=transformer:criterion=change",
                             calibration=calib)
    assert len(report.passes[-1].details["blocks_found"]) == 6
    assert report.after["macs"] < 0.7 * report.before["macs"]
    assert cosine_to_reference(ir.to_onnx(model), path)["cosine_mean"] > 0.5
