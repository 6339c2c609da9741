"""Shape and dtype inference: `set_input_shapes`, `infer_shapes`, `require_static_inputs`.

`infer_shapes` runs ONNX's own inference (with data propagation, so Shape->Gather->Concat->
Reshape chains resolve) on an export of the graph in which large constants are replaced by typed
inputs: inference only needs their shapes, and this keeps it fast on models with hundreds of MB
of weights. Where ONNX leaves a tensor's type unknown (ops it has no rule for, custom domains) and
the inputs are static, the values are measured by running the graph once in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx

from .errors import ShapeError
from .graph import Model, Value, is_static_shape
from .onnx_io import type_fields, to_onnx

__all__ = ["parse_shape_spec", "set_input_shapes", "require_static_inputs", "infer_shapes",
           "dynamic_inputs"]

# Constants up to this many elements keep their data for inference (shape tensors, axes, ...).
_SMALL_CONSTANT = 1024


def parse_shape_spec(spec: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``name=1,3,224,224`` (the CLI's --input-shape) into (name, dims)."""
    name, sep, dims = spec.rpartition("=")
    if not sep or not name:
        raise ShapeError(f"--input-shape {spec!r}: expected NAME=D,D,...")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip() != "")
    except ValueError:
        raise ShapeError(f"--input-shape {spec!r}: dimensions must be integers") from None
    if not shape or any(d <= 0 for d in shape):
        raise ShapeError(f"--input-shape {spec!r}: dimensions must be positive integers")
    return name, shape


def set_input_shapes(model: Model, shapes: dict[str, tuple[int, ...]]) -> None:
    """Fix graph input shapes given by the user; checks names, rank and static dims."""
    inputs = {v.name: v for v in model.graph.inputs}
    for name, shape in shapes.items():
        if name not in inputs:
            raise ShapeError(f"--input-shape names {name!r}, which is not a graph input "
                             f"(inputs: {', '.join(inputs) or 'none'})")
        value = inputs[name]
        if value.shape is not None:
            if len(value.shape) != len(shape):
                raise ShapeError(f"input {name!r} has rank {len(value.shape)}, "
                                 f"but --input-shape gives {len(shape)} dims")
            for have, want in zip(value.shape, shape):
                if isinstance(have, int) and have != want:
                    raise ShapeError(f"input {name!r} has static shape {list(value.shape)}; "
                                     f"--input-shape {list(shape)} contradicts it")
        value.shape = tuple(shape)


def dynamic_inputs(model: Model) -> list[Value]:
    """Tensor graph inputs whose shape is not fully static."""
    return [v for v in model.graph.inputs
            if v.type_proto is None and not is_static_shape(v.shape)]


def require_static_inputs(model: Model) -> None:
    """Refuse a model whose inputs still have dynamic dims, naming the input and the fix."""
    for value in dynamic_inputs(model):
        dims = "?" if value.shape is None else ",".join(str(d) for d in value.shape)
        raise ShapeError(f"input {value.name!r} has dynamic shape [{dims}]; give it with "
                         f"--input-shape {value.name}=D,D,... ")


def infer_shapes(model: Model, runtime_fallback: bool = True) -> None:
    """Fill `dtype` and `shape` of every tensor value of the root graph (in place)."""
    graph = model.graph
    proto = _inference_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # inference bugs on exotic ops must not stop the pipeline
        inferred = proto
    known = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        dtype, shape, opaque = type_fields(info.type)
        known[info.name] = (dtype, shape, opaque)
    for node in graph.nodes:
        for value in node.outputs:
            if value is None or value.name not in known:
                continue
            dtype, shape, opaque = known[value.name]
            if opaque is not None:
                value.type_proto = opaque
                continue
            if dtype is not None:
                value.dtype = dtype
            if shape is not None and _more_specific(shape, value.shape):
                value.shape = shape
    if runtime_fallback:
        _measure_unknown(model)


def _more_specific(new, old) -> bool:
    if old is None:
        return True
    if len(new) != len(old):
        return True
    return sum(isinstance(d, int) for d in new) >= sum(isinstance(d, int) for d in old)


def _inference_proto(model: Model) -> onnx.ModelProto:
    """Export without intermediate value_info, large constants turned into typed inputs."""
    return to_onnx(model, value_info=False, constants_as_inputs_above=_SMALL_CONSTANT)


def _measure_unknown(model: Model) -> None:
    """Run the model once in onnxruntime to type values that ONNX inference left unknown."""
    graph = model.graph
    # Outputs nobody reads (e.g. an old Dropout's mask) need no type: don't run for them.
    unknown = [v for node in graph.nodes for v in node.outputs
               if v is not None and v.type_proto is None
               and (v.dtype is None or v.shape is None)
               and (v.uses() or v.is_graph_output())]
    if not unknown or dynamic_inputs(model):
        return
    try:
        import onnxruntime as ort
    except ImportError:
        return
    proto = to_onnx(model, value_info=False)
    listed = {o.name for o in proto.graph.output}
    for value in unknown:
        if value.name not in listed:
            proto.graph.output.append(onnx.ValueInfoProto(name=value.name))
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a failure here is expected and handled: don't print it
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(proto.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {v.name: _sample_input(v, rng) for v in graph.inputs if v.type_proto is None}
        names = [o.name for o in session.get_outputs()]
        results = session.run(names, feeds)
    except Exception:  # the runtime cannot run it either: leave the types unknown
        return
    by_name = dict(zip(names, results))
    for value in unknown:
        result = by_name.get(value.name)
        if isinstance(result, np.ndarray):
            value.dtype = result.dtype
            value.shape = tuple(int(d) for d in result.shape)


def _sample_input(value: Value, rng: np.random.Generator) -> np.ndarray:
    if value.dtype is not None and np.issubdtype(value.dtype, np.floating):
        return rng.standard_normal(value.shape).astype(value.dtype)
    if value.dtype == np.bool_:
        return np.ones(value.shape, dtype=bool)
    return np.zeros(value.shape, dtype=value.dtype)

