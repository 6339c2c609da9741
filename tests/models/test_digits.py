"""The shipped digits model: loads, is what the README says, is accurate on held-back data, and
its data helpers (splits, --calib file) keep their contracts."""

import numpy as np
import onnx
import pytest

from models.digits import MODEL_PATH, calibration_npz, evaluate, load_splits


def _dims(value_info):
    return [d.dim_value or d.dim_param for d in value_info.type.tensor_type.shape.dim]


def _with_batch(model: onnx.ModelProto, batch) -> onnx.ModelProto:
    """A copy whose input/output batch is `batch` (int: static, str: symbolic), as a compressed
    model may have; every op in the graph is batch-agnostic, so it still runs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        if isinstance(batch, int):
            dim.dim_value = batch
        else:
            dim.dim_param = batch
    return model


@pytest.fixture(scope="module")
def model():
    return onnx.load(MODEL_PATH)


def test_model_is_valid_with_the_documented_interface(model):
    assert MODEL_PATH.stat().st_size < 1 << 20
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8 and model.opset_import[0].version == 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and _dims(inp) == [1, 1, 8, 8]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.name == "logits" and _dims(out) == [1, 10]
    ops = [n.op_type for n in model.graph.node]
    assert set(ops) == {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool",
                        "Flatten", "Gemm"}
    # stem + 4 blocks x 2 + 1 projection shortcut, each Conv followed by its own unfolded BN
    assert ops.count("Conv") == ops.count("BatchNormalization") == 10
    assert ops.count("Add") == 4
    names = {n.name for n in model.graph.node} | {i.name for i in model.graph.initializer}
    assert {"stem.conv", "layers.0.conv1.weight", "layers.2.shortcut.conv", "fc"} <= names
    props = {p.key: p.value for p in model.metadata_props}
    assert props["dataset"] == "sklearn-digits" and float(props["test_top1"]) >= 97.0


def test_test_split_accuracy(model):
    top1 = evaluate(MODEL_PATH)
    assert top1 >= 97.0
    assert top1 == pytest.approx(float({p.key: p.value for p in model.metadata_props}["test_top1"]),
                                 abs=0.01)


@pytest.mark.parametrize("batch", [7, "N"])
def test_evaluate_handles_other_batch_sizes(model, batch):
    """A static batch that does not divide the 360 test samples, and a symbolic one."""
    assert evaluate(_with_batch(model, batch)) == evaluate(model.SerializeToString())


def test_splits_are_deterministic_and_disjoint():
    a, b = load_splits(), load_splits()
    for left, right in zip(a, b):
        np.testing.assert_array_equal(left, right)
    assert (len(a.x_train), len(a.x_calib), len(a.x_test)) == (1437, 128, 360)
    for x, y in ((a.x_train, a.y_train), (a.x_calib, a.y_calib), (a.x_test, a.y_test)):
        assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) and 0 <= x.min() <= x.max() <= 1
        assert y.dtype == np.int64 and len(y) == len(x)
    # sklearn's digits hold no duplicate images, so comparing pixels is comparing samples
    train_rows = {row.tobytes() for row in a.x_train}
    assert not any(row.tobytes() in train_rows for row in a.x_test)
    assert all(row.tobytes() in train_rows for row in a.x_calib)
    assert np.bincount(a.y_test).min() >= 35  # stratified: every class well represented


def test_calibration_npz_format(tmp_path):
    path = calibration_npz(tmp_path / "c.npz", n=16)
    with np.load(path) as data:
        assert data.files == ["input"]
        assert data["input"].shape == (16, 1, 8, 8) and data["input"].dtype == np.float32
        np.testing.assert_array_equal(data["input"], load_splits().x_calib[:16])
