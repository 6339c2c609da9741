"""How much the model's outputs move when some of its weights change: the end-to-end
sensitivity that allocation schedules (sparsity per layer, channels per group) are built on.

A per-layer error (the layer's own output error on calibration data) does not say how much of it
survives to the model's output: in a transformer, the last attention projections matter far more
than an early FFN, whatever their own errors. `OutputProbe` measures the output instead. It builds
one onnxruntime session in which the chosen constants are graph inputs, so each trial (one layer
sparsified, one group pruned) only feeds other arrays: no re-export, no new session.

The error is the relative squared change of the graph's float outputs (or of the ones named,
e.g. only the pooled embedding of a model that also returns per-token states), averaged over
outputs: sum ||y' - y||^2 / sum ||y||^2 over the calibration feeds. Rows of outputs that are
laid out per token ([batch, seq, ...] like the token mask input) are left out where the mask is
0: padding positions never reach a pooled result.
"""

from __future__ import annotations

import numpy as np
import onnx

from ir import Model, Value, to_onnx

from .calibration import CalibrationSet, make_session, real_token_rows

__all__ = ["OutputProbe", "output_probe"]


class OutputProbe:
    """Relative output error of the model with some of `values` (constants) replaced."""

    def __init__(self, model: Model, values: list[Value], calibration: CalibrationSet,
                 samples: int, mask_name: str | None = None, outputs: list[str] | None = None):
        self.values = {value.name: value for value in values}
        proto = to_onnx(model)
        initializers = {t.name: t for t in proto.graph.initializer}
        for name in self.values:
            tensor = initializers[name]
            proto.graph.input.append(onnx.helper.make_tensor_value_info(
                name, tensor.data_type, list(tensor.dims)))
            proto.graph.initializer.remove(tensor)
        self.session = make_session(proto)
        floats = [o.name for o in self.session.get_outputs()
                  if o.type in ("tensor(float)", "tensor(double)", "tensor(float16)")]
        unknown = [name for name in outputs or [] if name not in floats]
        if unknown:
            raise KeyError(f"{unknown[0]!r} is not a float graph output "
                           f"(float outputs: {', '.join(floats) or 'none'})")
        self.outputs = list(outputs) if outputs else floats
        self.feeds = calibration.feeds(model, samples)
        self.masks = [feed.get(mask_name) if mask_name else None for feed in self.feeds]
        self.reference = self._run({})
        self.energy = [sum(float((y ** 2).sum()) for y in per_output)
                       for per_output in zip(*self.reference)]

    def error(self, replaced: dict[str, np.ndarray] | None = None) -> float:
        """Mean over outputs of ||y' - y||^2 / ||y||^2, with `replaced` (name -> array) fed in
        place of those constants and every other probed constant at its current value."""
        moved = self._run(replaced or {})
        errors = []
        for index, energy in enumerate(self.energy):
            change = sum(float(((new[index] - old[index]) ** 2).sum())
                         for new, old in zip(moved, self.reference))
            errors.append(change / max(energy, 1e-30))
        return float(np.mean(errors)) if errors else 0.0

    def _run(self, replaced: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
        """Per feed, the float outputs (float64, padding rows removed)."""
        unknown = set(replaced) - set(self.values)
        if unknown:
            raise KeyError(f"not a probed constant: {sorted(unknown)[0]}")
        constants = {name: np.asarray(replaced.get(name, value.const), dtype=value.dtype)
                     for name, value in self.values.items()}
        results = []
        for feed, mask in zip(self.feeds, self.masks):
            outputs = self.session.run(self.outputs, {**feed, **constants})
            results.append([real_token_rows(np.asarray(y, dtype=np.float64), mask)
                            for y in outputs])
        return results


def output_probe(model: Model, values: list[Value], calibration: CalibrationSet, samples: int,
                 mask_name: str | None, outputs: list[str], pass_name: str) -> OutputProbe:
    """An OutputProbe for a pass: an output name that is not a float graph output is the
    pass's OptionError (a one-line message), not a KeyError."""
    from .core import OptionError
    try:
        return OutputProbe(model, values, calibration, samples, mask_name, outputs or None)
    except KeyError as exc:
        raise OptionError(f"{pass_name}: scan_outputs: {exc.args[0]}") from None
