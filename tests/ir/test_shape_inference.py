"""Shape inference through shape-computing chains, and constant folding of those chains."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
from passes.cleanup import FoldConstants
from passes.core import PassContext
from tests.helpers import run_onnx


def _flatten_by_shape_chain(batch=2):
    """y = Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])): x[B,3,4] -> y[B,12].

    The pattern exporters emit for `x.view(x.size(0), -1)`.
    """
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch_1d"], name="unsqueeze"),
        helper.make_node("Concat", ["batch_1d", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
    ]
    constants = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                 numpy_helper.from_array(np.array([0], np.int64), "axes"),
                 numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_shape_chain_is_inferred_statically():
    model = ir.load_model(_flatten_by_shape_chain())
    ir.infer_shapes(model)
    values = model.graph.values()
    assert values["shape"].shape == (3,) and values["shape"].dtype == np.int64
    assert values["batch"].shape == ()
    assert values["target"].shape == (2,)
    assert values["y"].shape == (2, 12) and values["y"].dtype == np.float32


def test_fold_constants_turns_the_chain_into_a_constant_reshape_target():
    proto = _flatten_by_shape_chain()
    model = ir.load_model(proto)
    ir.infer_shapes(model)
    result = FoldConstants().run(model, PassContext())
    assert result.changed
    graph = model.graph
    assert [n.op_type for n in graph.nodes] == ["Reshape"]
    target = graph.nodes[0].input(1)
    assert target.is_constant
    np.testing.assert_array_equal(target.const, [2, -1])
    assert set(graph.initializers) == {target.name}  # zero/axes/minus_one are gone
    feed = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    (out,) = run_onnx(ir.to_onnx(model), {"x": feed})
    np.testing.assert_array_equal(out, feed.reshape(2, 12))


def test_dynamic_batch_keeps_the_chain_and_set_input_shapes_resolves_it():
    model = ir.load_model(_flatten_by_shape_chain(batch="N"))
    ir.infer_shapes(model)
    assert len(model.graph.values()["y"].shape) == 2  # rank known; -1 with a symbolic batch not
    FoldConstants().run(model, PassContext())
    assert "Shape" in [n.op_type for n in model.graph.nodes]  # cannot fold a dynamic shape
    assert [v.name for v in ir.dynamic_inputs(model)] == ["x"]
    with pytest.raises(ir.ShapeError, match="--input-shape x="):
        ir.require_static_inputs(model)

    ir.set_input_shapes(model, {"x": (5, 3, 4)})
    ir.infer_shapes(model)
    FoldConstants().run(model, PassContext())
    assert [n.op_type for n in model.graph.nodes] == ["Reshape"]
    np.testing.assert_array_equal(model.graph.nodes[0].input(1).const, [5, -1])


@pytest.mark.parametrize("shape, message", [({"y": (1, 3, 4)}, "not a graph input"),
                                            ({"x": (1, 3)}, "rank"),
                                            ({"x": (3, 3, 4)}, "contradicts")])
def test_set_input_shapes_rejects_bad_shapes(shape, message):
    model = ir.load_model(_flatten_by_shape_chain())
    with pytest.raises(ir.ShapeError, match=message):
        ir.set_input_shapes(model, shape)


def test_parse_shape_spec():
    assert ir.parse_shape_spec("input_ids=1,128") == ("input_ids", (1, 128))
    for bad in ("x", "x=", "x=1,a", "x=0,3"):
        with pytest.raises(ir.ShapeError):
            ir.parse_shape_spec(bad)
