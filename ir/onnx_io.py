"""ONNX <-> IR conversion: `load_model`, `from_onnx`, `to_onnx`, `save_model`.

Import decisions:
- Initializers that are also listed as graph inputs (IR version < 4 files) become plain constants:
  callers of a compressed model feed only the real inputs, and passes need the weights as
  constants. The exported model has IR version >= 4, where that listing is no longer needed.
- Sparse initializers are densified (the IR records sparsity itself, in `Value.meta`).
- Non-tensor value types (sequences, maps, optionals) keep their TypeProto verbatim.
- Model-local functions, metadata_props and doc strings are carried unchanged.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from .errors import GraphError, ModelLoadError
from .graph import Graph, Model, Node, Value

__all__ = ["load_model", "from_onnx", "to_onnx", "copy_model", "save_model", "model_bytes",
           "onnx_dtype", "numpy_dtype"]


# -- dtypes ----------------------------------------------------------------------------------------
def numpy_dtype(elem_type: int) -> np.dtype | None:
    """The numpy dtype of an ONNX element type (ml_dtypes covers bfloat16/float8/int4)."""
    if elem_type == TensorProto.UNDEFINED:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def onnx_dtype(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# -- loading ---------------------------------------------------------------------------------------
def load_model(source) -> Model:
    """Read a model from a path, bytes or ModelProto into the IR.

    Raises ModelLoadError with a one-line reason for a missing, non-ONNX or truncated file.
    """
    if isinstance(source, onnx.ModelProto):
        return from_onnx(source)
    if isinstance(source, (bytes, bytearray)):
        return from_onnx(_parse_model(bytes(source), "<bytes>"))
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"not a file: {path}")
    proto = _parse_model(path.read_bytes(), str(path))
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:  # OSError, ValueError, or onnx's ValidationError for a missing file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: cannot read external weights: {reason}") from None
    return from_onnx(proto)


def copy_model(model: Model) -> Model:
    """An independent copy of `model` (through its ONNX form, so nothing is shared): for trial
    edits and for keeping the original beside a model a pass changes."""
    return from_onnx(to_onnx(model))


def _parse_model(data: bytes, label: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{label}: empty file, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError or RuntimeWarning-derived errors
        raise ModelLoadError(f"{label}: not a valid ONNX model (protobuf parse failed; "
                             "truncated or not ONNX)") from None
    if not proto.HasField("graph") or not proto.graph.output:
        raise ModelLoadError(f"{label}: not a complete ONNX model (no graph outputs; "
                             "truncated or not ONNX)")
    if not proto.opset_import:
        raise ModelLoadError(f"{label}: not an ONNX model (no opset_import)")
    return proto


def from_onnx(proto: onnx.ModelProto) -> Model:
    """Convert a ModelProto into the IR."""
    opsets = {entry.domain: entry.version for entry in proto.opset_import}
    graph = _import_graph(proto.graph, outer={}, parent=None, root=True)
    _name_unnamed_nodes(graph)
    return Model(
        graph,
        opset_imports=opsets,
        ir_version=proto.ir_version,
        producer_name=proto.producer_name,
        producer_version=proto.producer_version,
        domain=proto.domain,
        model_version=proto.model_version,
        doc_string=proto.doc_string,
        metadata_props={p.key: p.value for p in proto.metadata_props},
        functions=[f for f in proto.functions],
    )


def _name_unnamed_nodes(graph: Graph) -> None:
    """Give unnamed nodes a unique name: per-node reports and passes address nodes by name.

    Done after the whole model is read: node and value names share one table, and a name
    picked while reading could otherwise take a value name that appears later in the file.
    """
    for sub in graph.walk_graphs():
        for node in sub.nodes:
            if not node.name:
                node.name = sub.unique_name(node.op_type)


def type_fields(type_proto: onnx.TypeProto):
    """(dtype, shape, opaque_type) from a TypeProto; opaque_type is set for non-tensors."""
    if type_proto.HasField("tensor_type"):
        tensor = type_proto.tensor_type
        shape = None
        if tensor.HasField("shape"):
            shape = tuple(_dim(d) for d in tensor.shape.dim)
        return numpy_dtype(tensor.elem_type), shape, None
    if type_proto.WhichOneof("value") is None:
        return None, None, None
    return None, None, type_proto


def _dim(dim) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param"):
        return dim.dim_param
    return None


def _import_graph(proto: onnx.GraphProto, outer: dict[str, Value], parent: Node | None,
                  root: bool) -> Graph:
    graph = Graph(proto.name or "graph", parent=parent)
    graph.doc_string = proto.doc_string
    scope = dict(outer)
    local: set[str] = set()

    def define(value: Value) -> Value:
        name = value.name
        if name in local:
            raise GraphError(f"duplicate value name {name!r}")
        local.add(name)
        if not root and name in graph.root._names:
            # ONNX lets sibling subgraphs (then/else branches, two Loop bodies) reuse a name,
            # but the IR keeps names unique model-wide. A subgraph's values are reached only
            # through this scope or by position (body inputs/outputs), so renaming is safe.
            value.name = graph.unique_name(name)
        else:
            graph.claim_name(name)
        value.graph = graph
        scope[name] = value
        return value

    for tensor in proto.initializer:
        array = _tensor_to_array(tensor)
        value = define(Value(tensor.name, const=array))
        graph.initializers[value.name] = value
    for sparse in proto.sparse_initializer:
        value = define(Value(sparse.values.name, const=_sparse_to_dense(sparse)))
        graph.initializers[value.name] = value

    for info in proto.input:
        if info.name in graph.initializers:
            continue  # a default-valued input of IR < 4: treated as the constant it holds
        dtype, shape, opaque = type_fields(info.type)
        value = define(Value(info.name, dtype=dtype, shape=shape, type_proto=opaque))
        value.doc_string = info.doc_string
        graph.inputs.append(value)

    for node_proto in proto.node:
        # Unnamed nodes are named once every value name is known (see _name_unnamed_nodes).
        node = Node(node_proto.op_type, name=node_proto.name, domain=node_proto.domain)
        node.doc_string = node_proto.doc_string
        inputs = []
        for name in node_proto.input:
            if not name:
                inputs.append(None)
                continue
            if name not in scope:
                raise GraphError(f"node {node_proto.name or node_proto.op_type!r} reads "
                                 f"undefined value {name!r}")
            inputs.append(scope[name])
        node.inputs = inputs
        node.graph = graph
        for attr in node_proto.attribute:
            node.attrs[attr.name] = _import_attribute(attr, scope, node)
            node.attr_types[attr.name] = attr.type
        outputs = []
        for name in node_proto.output:
            outputs.append(define(Value(name)) if name else None)
        node.outputs = outputs
        graph.nodes.append(node)

    for info in proto.value_info:
        value = scope.get(info.name)
        if value is not None and not value.is_constant:
            dtype, shape, opaque = type_fields(info.type)
            value.dtype, value.shape, value.type_proto = dtype, shape, opaque

    for info in proto.output:
        if info.name not in scope:
            raise GraphError(f"graph output {info.name!r} is never produced")
        value = scope[info.name]
        if not value.is_constant:
            dtype, shape, opaque = type_fields(info.type)
            if dtype is not None or opaque is not None:
                value.dtype, value.type_proto = dtype, opaque
            if shape is not None:
                value.shape = shape
        graph.outputs.append(value)
    return graph


def _import_attribute(attr: AttributeProto, scope: dict[str, Value], node: Node):
    kind = attr.type
    if kind == AttributeProto.GRAPH:
        return _import_graph(attr.g, scope, node, root=False)
    if kind == AttributeProto.GRAPHS:
        return [_import_graph(g, scope, node, root=False) for g in attr.graphs]
    if kind == AttributeProto.TENSOR:
        return _tensor_to_array(attr.t)
    if kind == AttributeProto.TENSORS:
        return [_tensor_to_array(t) for t in attr.tensors]
    if kind == AttributeProto.STRING:
        return _decode(attr.s)
    if kind == AttributeProto.STRINGS:
        return [_decode(s) for s in attr.strings]
    if kind in (AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS,
                AttributeProto.TYPE_PROTO, AttributeProto.TYPE_PROTOS):
        # Rare kinds that no pass inspects: carried as the proto itself.
        return helper.get_attribute_value(attr)
    return helper.get_attribute_value(attr)


def _decode(raw: bytes):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _tensor_to_array(tensor: TensorProto) -> np.ndarray:
    if tensor.data_location == TensorProto.EXTERNAL and not tensor.raw_data:
        raise ModelLoadError(f"tensor {tensor.name!r} has external data that was not found")
    if tensor.data_type == TensorProto.STRING:
        return np.array([s for s in tensor.string_data], dtype=object).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def _sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if values.size:
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        if indices.ndim == 1:
            dense.reshape(-1)[indices] = values
        else:
            dense[tuple(indices.T)] = values
    return dense


# -- export ----------------------------------------------------------------------------------------
def to_onnx(model: Model, value_info: bool = True,
            constants_as_inputs_above: int | None = None) -> onnx.ModelProto:
    """Convert the IR back to a ModelProto (nodes topologically sorted).

    `value_info=True` writes the known dtype/shape of intermediate values, which downstream
    tools (TVM, runtimes, viewers) use. `constants_as_inputs_above=N` declares constants of more
    than N elements as typed graph inputs instead of serializing their data (for analyses such as
    shape inference that need only their shapes; the result is not a runnable model).
    """
    graph_proto = _export_graph(model.graph, value_info, constants_as_inputs_above)
    proto = helper.make_model(
        graph_proto,
        opset_imports=[helper.make_opsetid(domain, version)
                       for domain, version in sorted(model.opset_imports.items())],
        producer_name=model.producer_name or "compress",
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        doc_string=model.doc_string,
        functions=model.functions,
    )
    # IR >= 4 so initializers need not be listed as inputs (see module docstring).
    proto.ir_version = max(model.ir_version, 4)
    for key, val in model.metadata_props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, val
    return proto


def _export_graph(graph: Graph, value_info: bool,
                  constants_as_inputs_above: int | None = None) -> onnx.GraphProto:
    graph.toposort()
    nodes = [node_to_onnx(node, value_info) for node in graph.nodes]
    inputs = [_value_info(v) for v in graph.inputs]
    outputs = [_value_info(v) for v in graph.outputs]
    initializers = []
    for value in graph.initializers.values():
        if constants_as_inputs_above is not None and value.const.size > constants_as_inputs_above:
            inputs.append(_value_info(value))
        else:
            initializers.append(array_to_tensor(value.const, value.name))
    infos = []
    if value_info:
        listed = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
        for node in graph.nodes:
            if node.subgraphs():
                # If/Loop/Scan outputs can differ in shape per branch or iteration: declaring
                # the shape ONNX inference merged for them can contradict the one taken.
                continue
            for value in node.outputs:
                if (value is not None and value.name not in listed
                        and (value.dtype is not None or value.type_proto is not None)):
                    infos.append(_value_info(value))
    proto = helper.make_graph(nodes, graph.name, inputs, outputs, initializers,
                              doc_string=graph.doc_string or None, value_info=infos)
    return proto


def _value_info(value: Value) -> onnx.ValueInfoProto:
    if value.type_proto is not None:
        info = onnx.ValueInfoProto(name=value.name)
        info.type.CopyFrom(value.type_proto)
    elif value.dtype is None:
        info = onnx.ValueInfoProto(name=value.name)
    else:
        shape = None
        if value.shape is not None:
            shape = [d if d is not None else None for d in value.shape]
        info = helper.make_tensor_value_info(value.name, onnx_dtype(value.dtype), shape)
    if value.doc_string:
        info.doc_string = value.doc_string
    return info


def node_to_onnx(node: Node, value_info: bool) -> onnx.NodeProto:
    proto = helper.make_node(
        node.op_type,
        [v.name if v is not None else "" for v in node.inputs],
        [v.name if v is not None else "" for v in node.outputs],
        name=node.name or None,
        domain=node.domain or None,
        doc_string=node.doc_string or None,
    )
    for name, value in node.attrs.items():
        proto.attribute.append(_export_attribute(name, value, node.attr_types.get(name), value_info))
    return proto


def _export_attribute(name: str, value, attr_type: int | None, value_info: bool) -> AttributeProto:
    if isinstance(value, np.ndarray) and attr_type in _NUMBER_ATTRIBUTES:
        value = value.tolist()  # a pass computed ints/floats with numpy: keep the imported type
    if isinstance(value, Graph):
        return helper.make_attribute(name, _export_graph(value, value_info))
    if isinstance(value, np.ndarray):
        return helper.make_attribute(name, array_to_tensor(value, ""))
    if isinstance(value, list) and value and isinstance(value[0], Graph):
        return helper.make_attribute(name, [_export_graph(g, value_info) for g in value])
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        return helper.make_attribute(name, [array_to_tensor(t, "") for t in value])
    if attr_type == AttributeProto.FLOAT:
        value = float(value)
    elif attr_type == AttributeProto.INT:
        value = int(value)
    elif attr_type == AttributeProto.FLOATS:
        value = [float(v) for v in value]
    elif attr_type == AttributeProto.INTS:
        value = [int(v) for v in value]
    elif isinstance(value, (np.integer,)):
        value = int(value)
    elif isinstance(value, (np.floating,)):
        value = float(value)
    elif isinstance(value, tuple):
        value = list(value)
    return helper.make_attribute(name, value, attr_type=attr_type)


_NUMBER_ATTRIBUTES = (AttributeProto.INT, AttributeProto.FLOAT, AttributeProto.INTS,
                      AttributeProto.FLOATS)


def array_to_tensor(array: np.ndarray, name: str) -> TensorProto:
    if array.dtype == object:
        tensor = helper.make_tensor(name, TensorProto.STRING, array.shape,
                                    [s if isinstance(s, bytes) else str(s).encode()
                                     for s in array.reshape(-1)])
        return tensor
    return numpy_helper.from_array(np.asarray(array), name)


# -- saving ----------------------------------------------------------------------------------------
# Protobuf cannot serialize a message over 2 GiB: larger models keep their weights in a side file.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def model_bytes(model: Model) -> bytes:
    return to_onnx(model).SerializeToString()


def save_model(model: Model | onnx.ModelProto, path) -> Path:
    """Write atomically: a crash never leaves a half-written file at `path`."""
    path = Path(path)
    proto = model if isinstance(model, onnx.ModelProto) else to_onnx(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if proto.ByteSize() > _EXTERNAL_DATA_THRESHOLD:
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data")
        else:
            with open(tmp, "wb") as handle:
                handle.write(proto.SerializeToString())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
