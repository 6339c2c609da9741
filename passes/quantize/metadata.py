"""Where quantization parameters are recorded, for later passes and the backends.

In the IR, ``value.meta["quant"]`` = ``{"scale": [...], "zero_point": [...], "axis": int|None,
"dtype": "int8"|"uint8"}`` on
- each int8 weight constant (per channel: one scale per index of `axis`), and
- each quantized activation, i.e. the output of its QuantizeLinear (per tensor: axis None).

In ONNX, `Value.meta` does not reach the file, so the same records are kept as JSON in
``model.metadata_props["compress.quantization"]``:
``{"weights": {name: record}, "activations": {name: record}, "float_layers": [node names],
"method": "...", "activation_dtype": "uint8"}``. Activation records are keyed by the quantized
(QuantizeLinear output) tensor name. `restore_quant_meta` puts them back after loading a file.
"""

from __future__ import annotations

import json

from ir import Model

__all__ = ["METADATA_KEY", "write_quant_property", "quantization_of", "restore_quant_meta"]

METADATA_KEY = "compress.quantization"


def write_quant_property(model: Model, extra: dict) -> dict:
    """Refresh the property from the values' meta (plus `extra` keys); returns the table."""
    weights, activations = {}, {}
    for name, value in model.graph.initializers.items():
        if "quant" in value.meta:
            weights[name] = value.meta["quant"]
    for node in model.graph.nodes:
        if node.op_type == "QuantizeLinear" and "quant" in node.output.meta:
            activations[node.output.name] = node.output.meta["quant"]
    table = {"weights": weights, "activations": activations, **extra}
    model.metadata_props[METADATA_KEY] = json.dumps(table, sort_keys=True)
    return table


def quantization_of(model) -> dict:
    """The recorded table, from an IR `Model` or an `onnx.ModelProto` ({} if none)."""
    if isinstance(model, Model):
        raw = model.metadata_props.get(METADATA_KEY)
    else:
        raw = {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def restore_quant_meta(model: Model) -> int:
    """Copy the property's records back onto the values of a loaded model; returns how many."""
    table = quantization_of(model)
    values = model.graph.values()
    count = 0
    for section in ("weights", "activations"):
        for name, record in table.get(section, {}).items():
            if name in values and "quant" not in values[name].meta:
                values[name].meta["quant"] = dict(record)
                count += 1
    return count
