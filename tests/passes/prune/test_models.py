"""prune-channels on real models: valid ONNX, runs, same output shapes, MACs reduced as reported;
the digits model keeps its accuracy at half the MACs with reconstruction."""

import numpy as np
import onnx
import pytest

import ir
import passes
from models import digits
from models.onnx_zoo import light_model_path
from passes.calibration import make_session

FAST = ["resnet50", "densenet121", "inception_v1", "inception_v2", "squeezenet", "shufflenet"]
SLOW = ["vgg19", "bvlc_alexnet", "zfnet512"]


def _check(path, ratio):
    original = ir.load_model(path)
    passes.prepare(original)
    shapes = [v.shape for v in original.graph.outputs]
    model = ir.load_model(path)
    report = passes.compress(model, f"cleanup,prune-channels:ratio={ratio}")
    proto = ir.to_onnx(model)
    onnx.checker.check_model(proto)
    value = model.graph.inputs[0]
    x = np.random.default_rng(0).standard_normal(value.shape).astype(np.float32)
    outputs = make_session(proto).run(None, {value.name: x})
    assert [o.shape for o in outputs] == shapes
    assert [v.name for v in model.graph.outputs] == [v.name for v in original.graph.outputs]
    # The report's MACs are the pruned graph's MACs, recomputed independently here.
    fresh = ir.load_model(proto)
    ir.infer_shapes(fresh)
    assert ir.graph_cost(fresh.graph).macs == report.after["macs"]
    return report


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", FAST)
def test_light_models(name, ratio):
    report = _check(light_model_path(name), ratio)
    cleaned = report.passes[0].after["macs"]
    if name == "shufflenet":  # grouped convs + channel shuffle: every group frozen, and said so
        assert report.after["macs"] == cleaned
        assert report.passes[-1].details["frozen_groups"]
    else:
        assert report.after["macs"] < (1 - ratio * 0.6) * cleaned


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", SLOW)
def test_large_light_models(name, ratio):
    report = _check(light_model_path(name), ratio)
    assert report.after["macs"] < report.passes[0].after["macs"]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_digits_shapes_and_macs(ratio):
    _check(digits.MODEL_PATH, ratio)


def test_digits_half_macs_with_reconstruction_within_one_point(tmp_path):
    calib = digits.calibration_npz(tmp_path / "calib.npz")
    model = ir.load_model(digits.MODEL_PATH)
    report = passes.compress(model, "cleanup,prune-channels:target_macs=0.5:reconstruct=true",
                             calibration=calib)
    assert report.after["macs"] <= 0.5 * report.before["macs"]
    pruned = digits.evaluate(ir.to_onnx(model).SerializeToString())
    assert digits.evaluate(digits.MODEL_PATH) - pruned <= 1.0
