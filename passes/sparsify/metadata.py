"""Where the sparsity of each weight is recorded, for later passes and the backends.

In the IR: ``value.meta["sparsity"]`` on the sparse weight constant, a dict

    {"pattern": "unstructured" | "block" | "n:m",
     "block": [R, C],            # block only: R output rows x C input columns
     "n": N, "m": M,             # n:m only: N nonzeros kept per M consecutive inputs of a row
     "density": 0.2,             # measured fraction of nonzeros of the stored tensor
     "sparsity": 0.8,            # 1 - density
     "layout": "out_in",         # the pattern is stated on the [out, in] view ...
     "view": "MatMul weight [384, 1536] ([in, out]) transposed to [out, in]",  # ... made so
     "transposed": true,         # the stored tensor is [in, out] (MatMul, Gemm transB=0)
     "method": "sparsegpt", "node": "layer0/ffn_up"}

In ONNX: `Value.meta` does not reach a file, so the same dicts, keyed by weight name, are kept as
JSON in ``model.metadata_props["compress.sparsity"]``. `sparsity_of` reads the IR first and the
property second, so it works on a model fresh from the pass and on one loaded from disk;
`restore_sparsity_meta` puts the property back onto the values after loading.
"""

from __future__ import annotations

import json

import numpy as np

from ir import Model, Value

__all__ = ["METADATA_KEY", "sparsity_of", "write_sparsity_property", "restore_sparsity_meta",
           "measured_density"]

METADATA_KEY = "compress.sparsity"


def measured_density(array: np.ndarray) -> float:
    return float(np.count_nonzero(array)) / max(int(array.size), 1)


def _sparse_constants(model: Model) -> dict[str, Value]:
    return {name: value for name, value in model.graph.initializers.items()
            if "sparsity" in value.meta}


def write_sparsity_property(model: Model) -> dict[str, dict]:
    """Refresh ``metadata_props["compress.sparsity"]`` from the values' meta; returns it.

    Entries of weights no longer in the graph are dropped; entries whose weight exists but lost
    its meta (e.g. a loaded model) are kept.
    """
    table = {}
    existing = _read_property(model)
    for name, info in existing.items():
        if name in model.graph.initializers:
            table[name] = info
    for name, value in _sparse_constants(model).items():
        table[name] = dict(value.meta["sparsity"])
    if table:
        model.metadata_props[METADATA_KEY] = json.dumps(table, sort_keys=True)
    else:
        model.metadata_props.pop(METADATA_KEY, None)
    return table


def _read_property(model: Model) -> dict[str, dict]:
    raw = model.metadata_props.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        table = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return table if isinstance(table, dict) else {}


def sparsity_of(model) -> dict[str, dict]:
    """Weight name -> sparsity record, from the IR meta and/or the ONNX metadata property.

    Accepts an IR `Model` or an `onnx.ModelProto`.
    """
    if not isinstance(model, Model):
        props = {p.key: p.value for p in model.metadata_props}
        raw = props.get(METADATA_KEY)
        return json.loads(raw) if raw else {}
    table = _read_property(model)
    for name, value in _sparse_constants(model).items():
        table[name] = dict(value.meta["sparsity"])
    return table


def restore_sparsity_meta(model: Model) -> int:
    """Copy the property's records back onto the weight values; returns how many."""
    count = 0
    for name, info in _read_property(model).items():
        value = model.graph.initializers.get(name)
        if value is not None and "sparsity" not in value.meta:
            value.meta["sparsity"] = dict(info)
            count += 1
    return count
