"""quantize on the project's real models: digits top-1 drop <= 0.5 point, MiniLM cosine >= 0.99."""

import numpy as np
import onnx
import pytest

import passes
from passes.quantize import quantization_of


@pytest.fixture(scope="module")
def digits_calibration(tmp_path_factory):
    from models.digits import calibration_npz
    return calibration_npz(tmp_path_factory.mktemp("digits") / "calib.npz")


@pytest.mark.parametrize("spec", ["cleanup,quantize",
                                  "cleanup,quantize:bias_correction=true:activations=int8"])
def test_digits_int8_top1_drop_within_half_a_point(spec, digits_calibration):
    from models.digits import MODEL_PATH, evaluate
    quantized = passes.apply(str(MODEL_PATH), spec, calibration=digits_calibration)
    onnx.checker.check_model(quantized)
    table = quantization_of(quantized)
    assert len(table["weights"]) == 11  # the 10 Convs and the Gemm
    assert all(w["dtype"] == "int8" for w in table["weights"].values())
    assert evaluate(str(MODEL_PATH)) - evaluate(quantized) <= 0.5


@pytest.mark.slow
def test_minilm_int8_embedding_cosine(tmp_path):
    from models.minilm import calibration_npz, cosine_to_reference, model_path
    calib = calibration_npz(tmp_path / "calib.npz", n=32)
    quantized = passes.apply(str(model_path(128, 1)), "quantize", calibration=calib)
    path = tmp_path / "q.onnx"
    onnx.save(quantized, path)
    cosine = cosine_to_reference(str(path))
    assert len(quantization_of(quantized)["weights"]) == 36  # 6 layers x (Q, K, V, out, up, down)
    assert cosine["cosine_mean"] >= 0.99


def test_digits_prune_sparsify_quantize_pipeline_keeps_zeros(digits_calibration):
    from models.digits import MODEL_PATH, evaluate
    from passes.sparsify import sparsity_of
    base = "cleanup,prune-channels:ratio=0.1,sparsify:sparsity=0.3"
    float_model = passes.apply(str(MODEL_PATH), base, calibration=digits_calibration)
    quantized = passes.apply(str(MODEL_PATH), base + ",quantize", calibration=digits_calibration)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in quantized.graph.initializer}
    records = sparsity_of(quantized)
    assert records and all(name.endswith("_quantized") for name in records)
    for name, record in records.items():
        assert inits[name].dtype == np.int8
        assert abs(np.count_nonzero(inits[name]) / inits[name].size - record["density"]) < 1e-6
    assert evaluate(float_model) - evaluate(quantized) <= 0.5
