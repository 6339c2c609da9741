"""The Python API, the pass registry, spec parsing and the pass manager."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import ir
import passes
from passes import OptionError, PassManager, build_pipeline, parse_spec
from passes.graphsurgeon import apply_graphsurgeon, from_graphsurgeon, to_graphsurgeon
from tests.helpers import conv_bn_relu_gemm, run_onnx


def _x(seed=1):
    return np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)


def test_apply_is_onnx_in_onnx_out_and_preserves_numerics():
    original = conv_bn_relu_gemm()
    optimized = passes.apply(original, "cleanup")
    assert isinstance(optimized, onnx.ModelProto)
    onnx.checker.check_model(optimized)
    ops = [n.op_type for n in optimized.graph.node]
    assert "BatchNormalization" not in ops and "Identity" not in ops
    expected = run_onnx(original, {"x": _x()})[0]
    actual = run_onnx(optimized, {"x": _x()})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    props = {p.key: p.value for p in optimized.metadata_props}
    assert props == {"author": "tests", "purpose": "round trip"}


def test_compress_report_counts_before_and_after():
    model = ir.load_model(conv_bn_relu_gemm())
    report = passes.compress(model, "cleanup")
    assert report.before["nodes"] == 7 and report.after["nodes"] == 5
    # BN's 4x8 statistics disappear; conv weights/bias and fc stay.
    assert report.before["params"] - report.after["params"] == 32
    assert report.after["macs"] == report.before["macs"] == 8 * 8 * 8 * 27 + 4 * 8
    assert [r.name for r in report.passes] == ["cleanup"]
    assert set(report.to_json()) >= {"before", "after", "passes"}


def test_dynamic_input_needs_a_shape_and_accepts_one():
    with pytest.raises(ir.ShapeError, match="'x'.*--input-shape x="):
        passes.apply(conv_bn_relu_gemm(dynamic_batch=True), "cleanup")
    out = passes.apply(conv_bn_relu_gemm(dynamic_batch=True), "cleanup",
                       input_shapes={"x": (2, 3, 8, 8)})
    dims = [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 8, 8]


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "unknown pass 'nonsense'"),
    ("cleanup:bogus=1", "unknown option 'bogus'"),
    ("upgrade-opset:version=abc", "must be int"),
    ("cleanup,,cleanup", "empty item"),
    ("cleanup:opset", "must be key=value"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(OptionError, match=message):
        build_pipeline(spec)


def test_spec_syntax():
    assert parse_spec("a, b:x=1:y=p+q") == [("a", {}), ("b", {"x": "1", "y": "p+q"})]
    assert parse_spec("sparsify:nm=2:4:method=wanda") == [
        ("sparsify", {"nm": "2:4", "method": "wanda"})]


def test_registry_lists_documented_passes():
    names = passes.available_passes()
    for name in ("cleanup", "fold-constants", "eliminate-dead-code", "remove-identity",
                 "fold-batchnorm", "upgrade-opset"):
        assert name in names
        assert names[name].summary()


def test_manager_records_every_pass():
    model = ir.load_model(conv_bn_relu_gemm())
    passes.prepare(model)
    records = PassManager(build_pipeline("remove-identity,fold-batchnorm,eliminate-dead-code"),
                          ).run(model)
    assert [r.name for r in records] == ["remove-identity", "fold-batchnorm",
                                         "eliminate-dead-code"]
    assert records[0].after["nodes"] == 6 and records[1].after["nodes"] == 5
    assert records[2].changed is False


def test_manager_catches_a_pass_that_breaks_the_graph():
    @passes.register_pass
    class Breaker(passes.Pass):
        """Test pass that leaves a dangling reader."""
        name = "test-breaker"

        def run(self, model, ctx):
            relu = model.graph.nodes_of("Relu")[0]
            relu.set_input(0, ir.Value("ghost", np.float32, (1, 8, 8, 8)))
            return passes.PassResult(changed=True)

    model = ir.load_model(conv_bn_relu_gemm())
    passes.prepare(model)
    with pytest.raises(passes.PassError, match="test-breaker left an invalid graph"):
        PassManager([Breaker()]).run(model)


def test_graphsurgeon_adapter_both_ways():
    graph = gs.import_onnx(conv_bn_relu_gemm())
    result = apply_graphsurgeon(graph, "cleanup")
    assert isinstance(result, gs.Graph)
    assert [n.op for n in result.nodes] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    model = from_graphsurgeon(result)
    assert isinstance(model, ir.Model) and model.opset == 17
    back = to_graphsurgeon(model)
    expected = run_onnx(conv_bn_relu_gemm(), {"x": _x()})[0]
    np.testing.assert_allclose(run_onnx(gs.export_onnx(back), {"x": _x()})[0], expected,
                               rtol=1e-5, atol=1e-5)


def test_user_defined_pass_plugs_in():
    @passes.register_pass
    class CountRelu(passes.Pass):
        """Count Relu nodes (example of a user pass)."""
        name = "test-count-relu"
        options = {"minimum": passes.Option(int, 0, "fail below this")}

        def run(self, model, ctx):
            count = len(model.graph.nodes_of("Relu"))
            return passes.PassResult(changed=False, details={"relu": count})

    model = ir.load_model(conv_bn_relu_gemm())
    report = passes.compress(model, "cleanup,test-count-relu:minimum=1")
    assert report.passes[-1].details == {"relu": 1}
    assert report.passes[-1].spec == "test-count-relu:minimum=1"
