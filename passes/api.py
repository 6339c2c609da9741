"""The Python API: run a pipeline on a model, ONNX in / ONNX out.

    import passes
    optimized = passes.apply(onnx_model, "cleanup,prune-channels:ratio=0.5")

`compress` is the same on the IR and also returns the report that the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ir import (Model, infer_shapes, load_model, require_static_inputs, set_input_shapes,
                to_onnx)

from .calibration import CalibrationSet
from .core import PassContext
from .manager import PassManager, PassRecord, model_summary
from .spec import build_pipeline

__all__ = ["apply", "compress", "prepare", "CompressionReport"]


@dataclass
class CompressionReport:
    pipeline: str
    before: dict[str, int]
    after: dict[str, int]
    passes: list[PassRecord]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "before": self.before, "after": self.after,
                "passes": [p.to_json() for p in self.passes], "notes": self.notes}


def prepare(model: Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Model:
    """Fix input shapes, refuse unresolved dynamic inputs, infer every shape."""
    if input_shapes:
        set_input_shapes(model, input_shapes)
    require_static_inputs(model)
    infer_shapes(model)
    return model


def _calibration_set(calibration, model: Model) -> CalibrationSet | None:
    if calibration is None or isinstance(calibration, CalibrationSet):
        return calibration
    if isinstance(calibration, dict):
        return CalibrationSet({k: np.asarray(v) for k, v in calibration.items()})
    return CalibrationSet.from_npz(calibration, model)


def compress(model: Model, spec: str = "cleanup", calibration=None,
             input_shapes: dict[str, tuple[int, ...]] | None = None,
             ctx: PassContext | None = None) -> CompressionReport:
    """Run the pipeline `spec` on `model` in place and return the report.

    `calibration` is an .npz path, a dict of arrays keyed by input name (first axis = samples)
    or a CalibrationSet; passes that need data fall back to synthetic samples when it is None.
    """
    pipeline = build_pipeline(spec)  # validate the spec before any work
    prepare(model, input_shapes)
    ctx = ctx or PassContext()
    ctx.calibration = _calibration_set(calibration, model)
    before = model_summary(model)
    records = PassManager(pipeline).run(model, ctx)
    notes = []
    for record in records:
        notes.extend(n for n in record.notes if n not in notes)
    return CompressionReport(pipeline=",".join(p.describe() for p in pipeline), before=before,
                             after=model_summary(model), passes=records, notes=notes)


def apply(model: onnx.ModelProto | bytes | str, spec: str = "cleanup", calibration=None,
          input_shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """ONNX in, ONNX out: load, run the pipeline, return the optimized ModelProto."""
    ir_model = load_model(model)
    compress(ir_model, spec, calibration=calibration, input_shapes=input_shapes)
    return to_onnx(ir_model)
