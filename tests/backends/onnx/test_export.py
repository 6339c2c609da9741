"""ONNX export: dense-with-zeros by default, sparse initializers on request, both run in ORT."""

import numpy as np
import onnx

import ir
import passes
from backends.onnx import export_onnx
from passes.sparsify import sparsity_of
from tests.passes.sparsify.graphs import mlp, run

CALIB = {"x": np.random.default_rng(0).standard_normal((16, 4, 16)).astype(np.float32)}


def _sparse_model(sparsity=0.8):
    model = ir.load_model(mlp(widths=(16, 64, 64, 64, 8)))
    passes.compress(model, f"sparsify:sparsity={sparsity}:min_size=0", calibration=CALIB)
    return model


def test_dense_export_keeps_zeros_and_metadata(tmp_path):
    model = _sparse_model()
    proto = export_onnx(model, tmp_path / "dense.onnx")
    assert not proto.graph.sparse_initializer
    loaded = onnx.load(str(tmp_path / "dense.onnx"))
    assert sparsity_of(loaded) == sparsity_of(model) and len(sparsity_of(model)) == 2


def test_sparse_initializers_load_and_match_dense(tmp_path):
    model = _sparse_model()
    dense = export_onnx(model, tmp_path / "dense.onnx")
    sparse = export_onnx(model, tmp_path / "sparse.onnx", sparse_initializers=True)
    names = {t.values.name for t in sparse.graph.sparse_initializer}
    assert names == set(sparsity_of(model))
    onnx.checker.check_model(sparse)
    assert (tmp_path / "sparse.onnx").stat().st_size < (tmp_path / "dense.onnx").stat().st_size
    x = CALIB["x"][:1]
    out_sparse, = run(sparse, {"x": x})
    out_dense, = run(dense, {"x": x})
    np.testing.assert_array_equal(out_sparse, out_dense)
    # our own loader densifies them back, and the record is still there
    back = ir.load_model(str(tmp_path / "sparse.onnx"))
    for name in names:
        np.testing.assert_array_equal(back.graph.initializers[name].const,
                                      model.graph.initializers[name].const)
    assert sparsity_of(back) == sparsity_of(model)


def test_density_threshold_keeps_dense_weights_dense(tmp_path):
    model = _sparse_model(sparsity=0.3)  # density 0.7 > threshold 0.5
    proto = export_onnx(model, tmp_path / "m.onnx", sparse_initializers=True)
    assert not proto.graph.sparse_initializer
