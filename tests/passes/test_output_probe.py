"""OutputProbe: the relative change of a model's outputs with some constants replaced."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
from passes.calibration import CalibrationSet
from passes.output_probe import OutputProbe
from tests.passes.sparsify.graphs import mlp, run

RNG = np.random.default_rng(3)


def _masked_linear():
    """y[1, 4, 8] = x @ w, plus an int64 input `attention_mask` [1, 4] passed through."""
    w = RNG.standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
         helper.make_node("Identity", ["attention_mask"], ["mask_out"], name="keep_mask")],
        "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8]),
         helper.make_tensor_value_info("mask_out", TensorProto.INT64, [1, 4])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w


def test_error_is_the_relative_squared_output_change():
    proto = mlp(seed=4)
    model = ir.load_model(proto)
    x = RNG.standard_normal((6, 4, 16)).astype(np.float32)
    w1 = model.graph.values()["w1"]
    probe = OutputProbe(model, [w1], CalibrationSet({"x": x}), samples=6)
    assert probe.error() == 0.0
    halved = w1.const * 0.5
    changed = proto.__deepcopy__()
    for tensor in changed.graph.initializer:
        if tensor.name == "w1":
            tensor.CopyFrom(numpy_helper.from_array(halved, "w1"))
    before = np.concatenate([run(proto, {"x": x[i:i + 1]})[0] for i in range(6)]).astype(float)
    after = np.concatenate([run(changed, {"x": x[i:i + 1]})[0] for i in range(6)]).astype(float)
    expected = ((after - before) ** 2).sum() / (before ** 2).sum()
    assert probe.error({"w1": halved}) == pytest.approx(expected, rel=1e-5)
    assert probe.error() == 0.0  # a trial leaves nothing behind
    with pytest.raises(KeyError):
        probe.error({"w2": halved})


def test_padding_rows_and_integer_outputs_are_left_out():
    proto, w = _masked_linear()
    model = ir.load_model(proto)
    x = RNG.standard_normal((2, 4, 16)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=np.int64)
    calibration = CalibrationSet({"x": x, "attention_mask": mask})
    probe = OutputProbe(model, [model.graph.values()["w"]], calibration, 2, "attention_mask")
    assert probe.outputs == ["y"]
    changed = w.copy()
    changed[:, 0] = 0.0
    y, y_new = x @ w, x @ changed
    real = mask.astype(bool)
    expected = ((y_new - y)[real] ** 2).sum() / (y[real] ** 2).sum()
    assert probe.error({"w": changed}) == pytest.approx(expected, rel=1e-5)
    unmasked = OutputProbe(model, [model.graph.values()["w"]], calibration, 2)
    assert unmasked.error({"w": changed}) != pytest.approx(expected, rel=1e-3)


def test_only_the_named_outputs_are_compared():
    w1, w2 = (RNG.standard_normal((16, 8)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="fc1"),
         helper.make_node("MatMul", ["x", "w2"], ["y2"], name="fc2")], "two_heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8]) for n in ("y1", "y2")],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = ir.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                            ir_version=8))
    calibration = CalibrationSet({"x": RNG.standard_normal((4, 4, 16)).astype(np.float32)})
    weights = [model.graph.values()["w1"], model.graph.values()["w2"]]
    both = OutputProbe(model, weights, calibration, 4)
    first = OutputProbe(model, weights, calibration, 4, outputs=["y1"])
    assert both.outputs == ["y1", "y2"] and first.outputs == ["y1"]
    assert first.error({"w2": np.zeros_like(w2)}) == 0.0
    assert both.error({"w2": np.zeros_like(w2)}) == pytest.approx(0.5, rel=1e-6)  # mean of 0, 1
    with pytest.raises(KeyError, match="not a float graph output"):
        OutputProbe(model, weights, calibration, 4, outputs=["y3"])
