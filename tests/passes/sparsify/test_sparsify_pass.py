"""The sparsify pass on small graphs: layer selection, metadata, schedules, ONNX round trip."""

import json
import subprocess
import sys

import numpy as np
import pytest

import ir
import passes
from passes.core import OptionError
from passes.sparsify import METADATA_KEY, restore_sparsity_meta, sparsity_of
from passes.sparsify.patterns import nm_group_nonzeros
from tests.passes.sparsify.graphs import mlp, run

CALIB = {"x": np.random.default_rng(7).standard_normal((32, 4, 16)).astype(np.float32)}


def _compress(proto, spec, calibration=CALIB):
    model = ir.load_model(proto)
    report = passes.compress(model, spec, calibration=calibration)
    return model, report


def test_first_and_last_layers_stay_dense_by_default():
    model, report = _compress(mlp(), "sparsify:min_size=0")
    nodes = sorted(info["node"] for info in sparsity_of(model).values())
    assert nodes == ["fc1", "fc2"]
    skipped = report.passes[0].details["skipped"]
    assert skipped == {"first layer": ["fc0"], "last layer": ["fc3"]}
    model, _ = _compress(mlp(), "sparsify:min_size=0:include_first_last=true")
    assert len(sparsity_of(model)) == 4


def test_exclude_by_name_glob_and_op_type():
    model, _ = _compress(mlp(), "sparsify:min_size=0:include_first_last=true:exclude=fc1+w2")
    assert sorted(i["node"] for i in sparsity_of(model).values()) == ["fc0", "fc3"]
    model, _ = _compress(mlp(gemm_head=True),
                         "sparsify:min_size=0:include_first_last=true:exclude=MatMul")
    assert [i["node"] for i in sparsity_of(model).values()] == ["fc3"]
    model, _ = _compress(mlp(), "sparsify:min_size=0:include_first_last=true:exclude=fc*")
    assert sparsity_of(model) == {}


def test_meta_recorded_on_new_constant_and_survives_onnx_round_trip():
    model, _ = _compress(mlp(), "sparsify:min_size=0:pattern=nm:nm=2of4:method=sparsegpt")
    table = sparsity_of(model)
    assert len(table) == 2
    for name, info in table.items():
        value = model.graph.initializers[name]
        assert value.meta["sparsity"] == info
        assert name.endswith("_sparse") and info["pattern"] == "n:m"
        assert (info["n"], info["m"], info["layout"], info["transposed"]) == (2, 4, "out_in", True)
        view = value.const.T  # MatMul [K, N] viewed as [N, K]
        assert (nm_group_nonzeros(view, 4) <= 2).all()
        assert info["density"] == pytest.approx(np.count_nonzero(value.const) / value.const.size)
    assert "w1" not in model.graph.initializers  # the dense original is gone
    proto = ir.to_onnx(model)
    assert json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY]) == table
    assert sparsity_of(proto) == table
    loaded = ir.load_model(proto.SerializeToString())
    assert restore_sparsity_meta(loaded) == 2
    assert all(loaded.graph.initializers[n].meta["sparsity"] == i for n, i in table.items())


@pytest.mark.parametrize("spec", [
    "sparsify:sparsity=0.6",
    "sparsify:sparsity=0.6:method=wanda:pattern=block:block=4x1",
    "sparsify:sparsity=0.6:method=sparsegpt:pattern=block:block=1x4",
    "sparsify:pattern=nm:nm=4of8:method=wanda",
    "sparsify:sparsity=0.6:method=wanda:schedule=global",
    "sparsify:sparsity=0.6:method=magnitude:schedule=sensitivity",
    "sparsify:sparsity=0.6:method=sparsegpt:sequential=true",
])
def test_result_runs_in_onnxruntime_and_meets_target(spec):
    proto = mlp(seed=1)
    model, report = _compress(proto, spec + ":min_size=0")
    layers = report.passes[0].details["layers"]
    zeros = sum(layer["size"] * (1 - layer["density"]) for layer in layers)
    total = sum(layer["size"] for layer in layers)
    expected = 0.5 if "nm=" in spec else 0.6
    assert zeros / total == pytest.approx(expected, abs=0.06)
    x = CALIB["x"][:1]
    out, = run(ir.to_onnx(model), {"x": x})
    ref, = run(proto, {"x": x})
    assert out.shape == ref.shape and np.isfinite(out).all()


def test_sensitivity_scan_meets_target():
    # The scan records each layer's relative output error per grid sparsity (non-decreasing)
    # and the greedy allocation reaches the average target.
    proto = mlp(seed=2)
    model = ir.load_model(proto)
    report = passes.compress(model, "sparsify:sparsity=0.5:schedule=sensitivity:method=wanda:"
                                    "min_size=0", calibration=CALIB)
    scan = report.passes[0].details["sensitivity"]
    assert set(scan) == {"fc1", "fc2"}
    allocated = [scan[n]["sparsity"] for n in ("fc1", "fc2")]
    assert np.mean(allocated) >= 0.5 - 1e-9
    assert all(np.all(np.diff(scan[n]["errors"]) >= 0) for n in scan)


def test_bad_options_raise_option_error():
    for spec in ("sparsify:sparsity=1.5", "sparsify:pattern=diagonal", "sparsify:kernels=3by3",
                 "sparsify:token_mask=nope:method=wanda"):
        with pytest.raises(OptionError):
            _compress(mlp(), spec + ":min_size=0")


def test_cli_spec_with_nm(tmp_path):
    src, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    src.write_bytes(mlp().SerializeToString())
    done = subprocess.run([sys.executable, "-m", "passes.run", str(src), "--passes",
                           "sparsify:pattern=nm:nm=2of4:min_size=0", "-o", str(out),
                           "--report", str(report)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    import onnx
    assert len(sparsity_of(onnx.load(str(out)))) == 2


def test_composes_with_quantize():
    proto = mlp(seed=3)
    model, _ = _compress(proto, "sparsify:sparsity=0.5:min_size=0,quantize")
    out, = run(ir.to_onnx(model), {"x": CALIB["x"][:1]})
    assert np.isfinite(out).all()
    assert sparsity_of(ir.to_onnx(model))  # the record survives quantization
