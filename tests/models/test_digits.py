"""The shipped digits model: loads, is what the README says, and is accurate on held-back data."""

import numpy as np
import onnx

from models.digits import MODEL_PATH, calibration_npz, evaluate, load_splits


def test_model_is_valid_with_the_documented_interface():
    model = onnx.load(MODEL_PATH)
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 1, 8, 8]
    assert out.name == "logits" and [d.dim_value for d in out.type.tensor_type.shape.dim] == [1, 10]
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "BatchNormalization", "Add", "Gemm"} <= ops


def test_test_split_accuracy():
    assert evaluate(MODEL_PATH) >= 97.0


def test_splits_are_deterministic_and_disjoint():
    a, b = load_splits(), load_splits()
    np.testing.assert_array_equal(a.x_test, b.x_test)
    train_rows = {row.tobytes() for row in a.x_train}
    overlap = sum(row.tobytes() in train_rows for row in a.x_test)
    assert overlap <= 2  # sklearn digits holds a couple of exact duplicate images
    assert len(a.x_test) == 360 and len(a.x_calib) == 128


def test_calibration_npz_format(tmp_path):
    path = calibration_npz(tmp_path / "c.npz", n=16)
    with np.load(path) as data:
        assert data.files == ["input"]
        assert data["input"].shape == (16, 1, 8, 8) and data["input"].dtype == np.float32
