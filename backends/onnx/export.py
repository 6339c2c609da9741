"""Write a compressed IR model as ONNX.

By default every weight is a dense initializer (zeros included): any runtime runs it, and the
sparsity stays visible in ``metadata_props["compress.sparsity"]`` (see `passes.sparsify.metadata`).

With ``sparse_initializers=True`` the weights recorded as sparse whose density is below
`density_threshold` are written as ONNX ``SparseTensorProto`` (``graph.sparse_initializer``):
values plus int64 linear indices into the flattened tensor (the COO form onnxruntime accepts).
This shrinks the file when density is low enough that 8-byte indices pay for themselves (below
about 1/3 for float32). onnxruntime densifies sparse initializers when it loads a model, so the
result runs anywhere the dense one does; it is a storage format, not a faster kernel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ir import Model, to_onnx

__all__ = ["export_onnx", "to_onnx_proto"]


def to_onnx_proto(model: Model, sparse_initializers: bool = False,
                  density_threshold: float = 0.5) -> onnx.ModelProto:
    """The ModelProto of `model`, with the sparsity property refreshed."""
    from passes.sparsify.metadata import write_sparsity_property
    table = write_sparsity_property(model)
    proto = to_onnx(model)
    if sparse_initializers:
        sparse_names = {name for name, info in table.items()
                        if float(info.get("density", 1.0)) < density_threshold}
        _move_to_sparse(proto.graph, sparse_names)
    return proto


def export_onnx(model: Model, path, sparse_initializers: bool = False,
                density_threshold: float = 0.5) -> onnx.ModelProto:
    """Write `model` to `path` (see the module docstring) and return the written ModelProto."""
    proto = to_onnx_proto(model, sparse_initializers, density_threshold)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return proto


def _move_to_sparse(graph: onnx.GraphProto, names: set[str]) -> None:
    kept = []
    for tensor in graph.initializer:
        if tensor.name in names:
            graph.sparse_initializer.append(_sparse_tensor(tensor))
        else:
            kept.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _sparse_tensor(tensor: onnx.TensorProto) -> onnx.SparseTensorProto:
    dense = numpy_helper.to_array(tensor)
    flat = dense.reshape(-1)
    indices = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(flat[indices], tensor.name)
    return onnx.helper.make_sparse_tensor(values, numpy_helper.from_array(indices),
                                          list(dense.shape))
