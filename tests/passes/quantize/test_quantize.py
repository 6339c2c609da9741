"""The quantize pass on small graphs: QDQ structure, per-channel scales, numerics vs float,
opset upgrade, metadata, composition with sparsify, and the accuracy tools."""


import numpy as np
import onnx
import pytest

import ir
import passes
from passes.core import OptionError
from passes.quantize import quantization_of
from tests.helpers import run_onnx
from tests.passes.quantize.graphs import calibration, conv_chain, matmul_gemm


def _quantize(proto, spec, calib):
    model = ir.load_model(proto)
    report = passes.compress(model, spec, calibration=calib)
    out = ir.to_onnx(model)
    onnx.checker.check_model(out)
    return model, out, report


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def _relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_conv_chain_becomes_qdq_and_stays_close_to_float():
    proto, calib = conv_chain(), calibration([1, 4, 8, 8])
    model, out, _ = _quantize(proto, "quantize", calib)
    ops = _ops(out)
    # Each conv: one Q/DQ pair on its input and one DQ on its int8 weight.
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    for conv in (n for n in out.graph.node if n.op_type == "Conv"):
        dq_x, dq_w = (next(p for p in out.graph.node if name in p.output) for name in conv.input[:2])
        assert dq_x.op_type == dq_w.op_type == "DequantizeLinear"
        assert {a.name: a.i for a in dq_w.attribute}["axis"] == 0
    weights = {i.name: i for i in out.graph.initializer}
    assert weights["w1_quantized"].data_type == onnx.TensorProto.INT8
    x = calib["x"][:4]
    for i in range(4):
        ref, = run_onnx(proto, {"x": x[i:i + 1]})
        got, = run_onnx(out, {"x": x[i:i + 1]})
        # 8-bit steps through three layers: a few percent of the output range at most.
        assert _relative_error(got, ref) < 0.05


def test_per_channel_weight_scales_match_numpy():
    proto, calib = conv_chain(), calibration([1, 4, 8, 8])
    model, out, _ = _quantize(proto, "quantize", calib)
    w1 = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w1"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    expected_scale = np.abs(w1).reshape(8, -1).max(axis=1) / 127
    np.testing.assert_allclose(inits["w1_scale"], expected_scale, rtol=1e-6)
    np.testing.assert_array_equal(
        inits["w1_quantized"], np.round(w1 / expected_scale[:, None, None, None]).astype(np.int8))
    assert np.abs(inits["w1_quantized"]).max() == 127
    assert model.graph.initializers["w1_quantized"].meta["quant"]["axis"] == 0


def test_matmul_axis_is_last_and_gemm_axis_follows_trans_b():
    for trans_b, gemm_axis in ((0, 1), (1, 0)):
        proto = matmul_gemm(trans_b=trans_b)
        model, out, _ = _quantize(proto, "quantize", calibration([1, 5, 16]))
        table = quantization_of(out)
        assert table["weights"]["w_quantized"]["axis"] == 1
        assert len(table["weights"]["w_quantized"]["scale"]) == 24
        assert table["weights"]["gw_quantized"]["axis"] == gemm_axis
        assert len(table["weights"]["gw_quantized"]["scale"]) == 12
        x = calibration([1, 5, 16], n=1, seed=7)["x"]
        assert _relative_error(run_onnx(out, {"x": x})[0], run_onnx(proto, {"x": x})[0]) < 0.05


def test_activation_records_and_int8_option():
    proto, calib = conv_chain(), calibration([1, 4, 8, 8])
    model, out, _ = _quantize(proto, "quantize:activations=int8", calib)
    table = quantization_of(out)
    assert len(table["activations"]) == 3 and table["activation_dtype"] == "int8"
    for record in table["activations"].values():
        assert record["dtype"] == "int8" and record["zero_point"] == 0 and record["axis"] is None
    # The graph input x of N(0,1) samples: minmax scale = max|x| / 127.
    x_record = table["activations"][next(k for k in table["activations"] if k.startswith("x"))]
    np.testing.assert_allclose(x_record["scale"], np.abs(calib["x"]).max() / 127, rtol=1e-5)
    _, out_u8, _ = _quantize(proto, "quantize", calib)
    u8 = quantization_of(out_u8)["activations"]
    relu_record = next(v for k, v in u8.items() if k.startswith("r1"))
    assert relu_record["dtype"] == "uint8" and relu_record["zero_point"] == 0  # Relu output >= 0


def test_opset_11_input_is_upgraded_and_runs():
    proto, calib = conv_chain(opset=11), calibration([1, 4, 8, 8])
    model, out, report = _quantize(proto, "quantize", calib)
    assert model.opset >= 13
    assert any("upgraded" in n for n in report.notes)
    ref, = run_onnx(proto, {"x": calib["x"][:1]})
    got, = run_onnx(out, {"x": calib["x"][:1]})
    assert _relative_error(got, ref) < 0.05


def test_calibration_methods_all_run_and_percentile_clips_outliers():
    proto = conv_chain()
    calib = calibration([1, 4, 8, 8])
    calib["x"][0, 0, 0, 0] = 1000.0  # one outlier among 16k values
    scales = {}
    for method in ("minmax", "percentile", "entropy", "mse"):
        _, out, _ = _quantize(proto, f"quantize:method={method}", calib)
        acts = quantization_of(out)["activations"]
        scales[method] = next(v for k, v in acts.items() if k.startswith("x"))["scale"]
    assert scales["minmax"] > 1000 / 255 * 0.99
    for method in ("percentile", "entropy"):
        assert scales[method] < scales["minmax"] / 10, method
    # MSE weighs the outlier's squared clipping error (~1000^2 / 16k values) against the rounding
    # error of everything else and rightly keeps it here; it must never widen the range.
    assert scales["mse"] <= scales["minmax"] * 1.0001


def test_sparse_zeros_and_record_survive_quantization():
    from passes.sparsify import sparsity_of
    proto = matmul_gemm()
    _, out, _ = _quantize(proto, "sparsify:sparsity=0.5:min_size=0:include_first_last=true,"
                          "quantize", calibration([1, 5, 16]))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    q = inits["w_sparse_quantized"] if "w_sparse_quantized" in inits else next(
        v for k, v in inits.items() if k.startswith("w") and k.endswith("_quantized"))
    assert q.dtype == np.int8 and abs(np.mean(q == 0) - 0.5) < 0.05
    recorded = sparsity_of(out)
    assert any(name.endswith("_quantized") for name in recorded)


def test_equalize_keeps_float_outputs_and_balances_ranges():
    for depthwise in (False, True):
        proto = conv_chain(depthwise=depthwise)
        x = calibration([1, 4, 8, 8], n=1)["x"]
        _, out, report = _quantize(proto, "equalize", None)
        np.testing.assert_allclose(run_onnx(out, {"x": x})[0], run_onnx(proto, {"x": x})[0],
                                   rtol=1e-4, atol=1e-4)
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
        w1 = next(v for k, v in inits.items() if k.startswith("w1"))
        before = onnx.numpy_helper.to_array(proto.graph.initializer[0])
        spread = lambda w: np.ptp(np.log(np.abs(w).reshape(w.shape[0], -1).max(axis=1)))
        assert spread(w1) < spread(before) / 2


def test_bias_correction_removes_mean_shift():
    # Inputs with a large common offset make the weight rounding error show up as a mean shift.
    proto = matmul_gemm(seed=3)
    calib = calibration([1, 5, 16], n=64, offset=3.0)
    x = calibration([1, 5, 16], n=32, seed=9, offset=3.0)["x"]
    shifts = {}
    for flag in ("false", "true"):
        _, out, report = _quantize(proto, f"quantize:bias_correction={flag}:ops=MatMul", calib)
        diff = np.stack([run_onnx(out, {"x": x[i:i + 1]})[0] - run_onnx(proto, {"x": x[i:i + 1]})[0]
                         for i in range(len(x))])
        shifts[flag] = float(np.abs(diff.mean(axis=(0, 1))).mean())
    assert shifts["true"] < shifts["false"] * 0.7


def test_max_drop_keeps_sensitive_layers_float_and_reports_each_layer():
    proto, calib = conv_chain(), calibration([1, 4, 8, 8], n=16)
    # A generous budget keeps everything int8 and tells the all-int8 drop and sensitivities.
    _, _, loose = _quantize(proto, "quantize:max_drop=50", calib)
    scan = loose.passes[-1].details["mixed_precision"]
    assert [layer["node"] for layer in scan["layers"]] == ["conv1", "conv2", "conv3"]
    assert all(layer["precision"] == "int8" for layer in scan["layers"])
    assert scan["all_int8_drop"] > 0

    budget = scan["all_int8_drop"] / 2
    _, out, report = _quantize(proto, f"quantize:max_drop={budget}", calib)
    details = report.passes[-1].details["mixed_precision"]
    assert details["final_drop"] <= budget
    floats = {layer["node"] for layer in details["layers"] if layer["precision"] == "float"}
    most_sensitive = max(scan["layers"], key=lambda layer: layer["sensitivity_drop"])["node"]
    assert most_sensitive in floats and len(floats) < 3
    assert set(quantization_of(out)["float_layers"]) == floats
    # The float layers keep their float weight input.
    convs = {n.name: n for n in out.graph.node if n.op_type == "Conv"}
    inits = {i.name: i for i in out.graph.initializer}
    for name in floats:
        assert inits[convs[name].input[1]].data_type == onnx.TensorProto.FLOAT


def test_bad_options_raise():
    with pytest.raises(OptionError):
        passes.apply(conv_chain(), "quantize:method=magic")
    with pytest.raises(OptionError):
        passes.apply(conv_chain(), "quantize:ops=Relu")


def test_conv_transpose_weight_scales_on_axis_1_and_runs():
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 6, 3, 3)).astype(np.float32)  # [C_in, C_out, kH, kW]
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 11, 11])],
        [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    calib = calibration([1, 4, 5, 5])
    model, out, _ = _quantize(proto, "quantize", calib)
    record = quantization_of(out)["weights"]["w_quantized"]
    assert record["axis"] == 1
    np.testing.assert_allclose(record["scale"], np.abs(w).max(axis=(0, 2, 3)) / 127, rtol=1e-6)
    x = calib["x"][:1]
    assert _relative_error(run_onnx(out, {"x": x})[0], run_onnx(proto, {"x": x})[0]) < 0.03


def test_records_survive_a_file_round_trip(tmp_path):
    from passes.quantize import restore_quant_meta
    _, out, _ = _quantize(conv_chain(), "quantize", calibration([1, 4, 8, 8]))
    onnx.save(out, tmp_path / "q.onnx")
    loaded = ir.load_model(str(tmp_path / "q.onnx"))
    assert restore_quant_meta(loaded) == 6  # 3 weights + 3 activations
    record = loaded.graph.initializers["w2_quantized"].meta["quant"]
    assert record["dtype"] == "int8" and len(record["scale"]) == 8


def test_outputs_option_quantizes_layer_outputs_after_relu_for_onnxruntime_fusion():
    proto, calib = conv_chain(), calibration([1, 4, 8, 8])
    _, out, _ = _quantize(proto, "quantize:outputs=true", calib)
    producers = {o: n for n in out.graph.node for o in n.output}
    # conv1 and conv2 are followed by Relu: the Relu output is quantized (not the conv output);
    # conv3's output y is the graph output, which stays float and is not re-quantized.
    quantized = {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized == {"x", "r1", "r2"}
    for relu in ("relu1", "relu2"):
        node = next(n for n in out.graph.node if n.name == relu)
        assert producers[node.input[0]].op_type == "Conv"
    x = calib["x"][:1]
    assert _relative_error(run_onnx(out, {"x": x})[0], run_onnx(proto, {"x": x})[0]) < 0.05
    # MatMul -> Add(bias) -> Relu: the tensor after the bias and the Relu is quantized.
    proto2 = matmul_gemm()
    _, out2, _ = _quantize(proto2, "quantize:outputs=true", calibration([1, 5, 16]))
    assert {n.input[0] for n in out2.graph.node if n.op_type == "QuantizeLinear"} == \
        {"x", "r", "flat"}


def test_activation_matmuls_option_quantizes_attention_scores_and_context():
    from tests.passes.quantize.graphs import attention
    proto, calib = attention(), calibration([1, 12, 16])
    _, plain, _ = _quantize(proto, "quantize", calib)
    _, out, report = _quantize(proto, "quantize:activation_matmuls=true", calib)
    # default: only the four weight MatMuls; with the option the two activation MatMuls too
    assert _ops(plain).count("QuantizeLinear") == 2            # x (shared) and the context
    assert _ops(out).count("QuantizeLinear") == 2 + 4
    records = report.passes[-1].details["activation_matmuls"]
    assert [r["node"] for r in records] == ["scores", "context"]
    assert all(r["first_dtype"] == "uint8" and r["second_dtype"] == "int8" for r in records)
    produced = {o: n for n in out.graph.node for o in n.output}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    for node in (n for n in out.graph.node if n.name in ("scores", "context")):
        first, second = (produced[name] for name in node.input)
        assert first.op_type == second.op_type == "DequantizeLinear"
        # the second operand is symmetric int8 (zero point 0), what vpdpbusd's signed side needs
        zero_point = inits[second.input[2]]
        assert zero_point.dtype == np.int8 and zero_point == 0
    for i in range(4):
        x = calib["x"][i:i + 1]
        ref, = run_onnx(proto, {"x": x})
        got, = run_onnx(out, {"x": x})
        without, = run_onnx(plain, {"x": x})
        assert _relative_error(got, ref) < 0.05
        assert not np.allclose(got, without)                    # the extra rounding is real
    _, excluded, _ = _quantize(proto, "quantize:activation_matmuls=true:exclude=scores", calib)
    assert _ops(excluded).count("QuantizeLinear") == 2 + 2
