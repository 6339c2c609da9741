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
from tests.passes.sparsify.graphs import conv_net, mlp, run

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


def _quiet_branch_net():
    """fc0 -> Relu -> (fcA + 0.01 * fcB) -> fc_out: fcA and fcB are alike, but fcB's output
    reaches y at 1/100 of the scale."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(11)
    shapes = {"w0": (16, 32), "wa": (32, 32), "wb": (32, 32), "wo": (32, 8)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32),
                                     n) for n, s in shapes.items()]
    inits.append(numpy_helper.from_array(np.array(0.01, np.float32), "quiet"))
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["m0"], name="fc0"),
             helper.make_node("Relu", ["m0"], ["h0"], name="relu0"),
             helper.make_node("MatMul", ["h0", "wa"], ["a"], name="fcA"),
             helper.make_node("MatMul", ["h0", "wb"], ["b"], name="fcB"),
             helper.make_node("Mul", ["b", "quiet"], ["b_small"], name="scale"),
             helper.make_node("Add", ["a", "b_small"], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "wo"], ["y"], name="fc_out")]
    graph = helper.make_graph(
        nodes, "quiet_branch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_output_scan_sparsifies_what_the_output_does_not_see(method):
    # Both middle layers have the same own error at any sparsity; only the output scan sees
    # that fcB's output is scaled by 0.01 before it reaches y, so fcB takes the sparsity.
    model, report = _compress(_quiet_branch_net(), f"sparsify:sparsity=0.5:schedule=output:"
                                                  f"method={method}:min_size=0:scan_samples=8")
    details = report.passes[0].details
    scan = details["sensitivity"]
    assert set(scan) == {"fcA", "fcB"}
    assert details["sensitivity_grid"][0] == 0.0
    assert scan["fcB"]["sparsity"] >= 0.8 and scan["fcA"]["sparsity"] <= 0.3
    assert scan["fcB"]["errors"][-1] < scan["fcA"]["errors"][1]
    assert all(np.all(np.diff(scan[n]["errors"]) >= 0) for n in scan)
    layers = {layer["node"]: layer for layer in details["layers"]}
    assert 1 - layers["fcB"]["density"] == pytest.approx(scan["fcB"]["sparsity"], abs=0.02)
    zeros = sum(layer["size"] * (1 - layer["density"]) for layer in layers.values())
    assert zeros / sum(layer["size"] for layer in layers.values()) >= 0.5 - 0.02
    # A grid of the user's: 0 is added, the points come back sorted.
    _, report = _compress(_quiet_branch_net(), f"sparsify:sparsity=0.5:schedule=output:"
                                               f"method={method}:min_size=0:scan_grid=0.8+0.3")
    assert report.passes[0].details["sensitivity_grid"] == [0.0, 0.3, 0.8]
    assert report.passes[0].details["sensitivity"]["fcB"]["sparsity"] == 0.8
    # The layer-wise scan cannot tell the two apart.
    _, report = _compress(_quiet_branch_net(), f"sparsify:sparsity=0.5:schedule=sensitivity:"
                                               f"method={method}:min_size=0")
    layer_scan = report.passes[0].details["sensitivity"]
    assert abs(layer_scan["fcA"]["sparsity"] - layer_scan["fcB"]["sparsity"]) <= 0.2


@pytest.mark.parametrize("pattern", ["sparsity=0.5", "pattern=nm:nm=2of4"])
def test_admm_lowers_the_layer_errors_of_refit(pattern):
    spec = f"sparsify:{pattern}:method=sparsegpt:min_size=0:include_first_last=true"
    errors = {}
    for option in ("refit=true", "admm=true"):
        model, report = _compress(mlp(seed=3), f"{spec}:{option}")
        layers = report.passes[0].details["layers"]
        errors[option] = sum(layer["output_error"] for layer in layers)
        assert all(layer["density"] == pytest.approx(0.5, abs=0.01) for layer in layers)
        if "nm" in pattern:
            assert all((nm_group_nonzeros(info_weight, 4) <= 2).all()
                       for info_weight in _sparse_weights(model))
    assert errors["admm=true"] < errors["refit=true"], errors


def _sparse_weights(model):
    """The sparsified weights in their [out, in] view (MatMul stores [in, out])."""
    return [v.const.T for v in model.graph.values().values()
            if v.is_constant and "sparsity" in (v.meta or {})]


def _output_error(proto, model) -> float:
    """Relative squared change of y on the calibration inputs."""
    before = np.concatenate([run(proto, {"x": x[None]}) for x in CALIB["x"]])
    after = np.concatenate([run(ir.to_onnx(model), {"x": x[None]}) for x in CALIB["x"]])
    return float(((after - before) ** 2).sum() / (before ** 2).sum())


@pytest.mark.parametrize("pattern", ["sparsity=0.5", "pattern=nm:nm=2of4"])
def test_output_metric_lowers_the_output_error(pattern):
    # Only fc1 is sparsified; fc2 reads its 32 outputs down to 4, so most directions of fc1's
    # output never reach y. The full metric sees which; the diagonal one only sees how much
    # each channel matters.
    proto = mlp(widths=(16, 32, 32, 4), seed=5)
    spec = f"sparsify:{pattern}:method=sparsegpt:admm=true:min_size=0:scan_samples=16"
    errors = {}
    for metric in ("none", "diagonal", "full"):
        model, report = _compress(proto, f"{spec}:output_metric={metric}")
        layers = report.passes[0].details["layers"]
        assert [layer["node"] for layer in layers] == ["fc1"]
        assert layers[0]["density"] == pytest.approx(0.5, abs=0.01)
        if "nm" in pattern:
            assert (nm_group_nonzeros(_sparse_weights(model)[0], 4) <= 2).all()
        errors[metric] = _output_error(proto, model)
    assert errors["full"] < 0.7 * errors["none"], errors
    if "nm" not in pattern:  # N:M fixes every row's count: row weights change nothing there
        assert errors["diagonal"] < errors["none"], errors


def test_output_metric_on_convs():
    # Conv outputs carry their channels on axis 1, and the grouped conv c2 takes the metric
    # block of each group's rows; every layer stays exactly at its target.
    proto = conv_net()
    x = np.random.default_rng(2).standard_normal((16, 1, 4, 8, 8)).astype(np.float32)
    dense = np.concatenate([run(proto, {"x": s})[0] for s in x])
    errors = {}
    for metric in ("none", "full"):
        model, report = _compress(proto, "sparsify:sparsity=0.5:method=sparsegpt:admm=true:"
                                         "min_size=0:include_first_last=true:scan_samples=16:"
                                         f"output_metric={metric}", {"x": x})
        assert [layer["density"] for layer in report.passes[0].details["layers"]] == [0.5] * 4
        out = np.concatenate([run(ir.to_onnx(model), {"x": s})[0] for s in x])
        errors[metric] = float(((out - dense) ** 2).sum() / (dense ** 2).sum())
    assert errors["full"] < errors["none"], errors


def test_bad_options_raise_option_error():
    for spec in ("sparsify:sparsity=1.5", "sparsify:pattern=diagonal", "sparsify:kernels=3by3",
                 "sparsify:token_mask=nope:method=wanda",
                 "sparsify:schedule=output:scan_samples=0", "sparsify:admm=true",
                 "sparsify:schedule=output:scan_outputs=nope",
                 "sparsify:schedule=output:scan_grid=0.5+1.5",
                 "sparsify:schedule=output:scan_grid=x", "sparsify:output_metric=rows",
                 "sparsify:output_metric=full:scan_outputs=nope"):
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
