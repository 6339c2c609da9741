"""upgrade-opset converts old models (attributes that became inputs) without changing results;
the CLI's progress display reports long loops."""

import io

import numpy as np
from onnx import TensorProto, helper

import ir
import passes
from passes import core
from tests.helpers import run_onnx


def test_upgrade_opset_moves_clip_attributes_to_inputs():
    graph = helper.make_graph(
        [helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.25)], "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)
    new = passes.apply(old, "upgrade-opset:version=17")
    assert {o.version for o in new.opset_import if o.domain == ""} == {17}
    (clip,) = [n for n in new.graph.node if n.op_type == "Clip"]
    assert len(clip.input) == 3 and not clip.attribute
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(run_onnx(new, {"x": x})[0], run_onnx(old, {"x": x})[0])
    model = ir.load_model(new)
    assert passes.compress(model, "upgrade-opset:version=13").passes[0].changed is False


def test_progress_reports_long_loops(monkeypatch):
    clock = iter(range(0, 100, 2))  # every step "takes" 2 s
    monkeypatch.setattr(core.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    monkeypatch.setattr(core.sys, "stderr", stream)
    assert list(core.stderr_progress(range(3), desc="work")) == [0, 1, 2]
    lines = stream.getvalue().splitlines()
    assert lines and lines[-1].strip().startswith("work 3/3")
