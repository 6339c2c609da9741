"""The pass manager: run a pipeline, check the graph after each pass, record what changed.

After every pass the graph is checked for structural validity and shapes are re-inferred (passes
such as pruning change them), and the manager records the pass's time and the model's nodes,
parameters, MACs and bytes, which the CLI prints and writes to the report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ir import CompressError, Model, check_model, graph_cost, infer_shapes, require_static_inputs

from .core import Pass, PassContext, PassError, PreconditionError

__all__ = ["PassManager", "PassRecord", "model_summary"]


def model_summary(model: Model) -> dict[str, int]:
    """nodes, params, nonzero_params, macs and bytes of the model's main graph."""
    return graph_cost(model.graph).summary()


@dataclass
class PassRecord:
    name: str
    spec: str
    seconds: float
    changed: bool
    after: dict[str, int]
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class PassManager:
    """Runs passes in order. `check=False` skips the validity check (for speed in tests)."""

    def __init__(self, passes: list[Pass], check: bool = True):
        self.passes = list(passes)
        self.check = check

    def run(self, model: Model, ctx: PassContext | None = None) -> list[PassRecord]:
        ctx = ctx or PassContext()
        records = []
        for item in self.passes:
            records.append(self._run_one(item, model, ctx))
        return records

    def _run_one(self, item: Pass, model: Model, ctx: PassContext) -> PassRecord:
        if item.requires_static_shapes:
            try:
                require_static_inputs(model)
            except CompressError as exc:
                raise PreconditionError(f"{item.name}: {exc}") from None
        notes_before = len(ctx.notes)
        start = time.perf_counter()
        try:
            result = item.run(model, ctx)
        except CompressError:
            raise
        except Exception as exc:  # a bug or an unforeseen model construct: name the pass
            raise PassError(f"pass {item.name} failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        if result.changed:
            if self.check:
                try:
                    check_model(model)
                except CompressError as exc:
                    raise PassError(f"pass {item.name} left an invalid graph: {exc}") from exc
            infer_shapes(model)
        return PassRecord(
            name=item.name, spec=item.describe(), seconds=round(seconds, 4),
            changed=result.changed, after=model_summary(model),
            notes=ctx.notes[notes_before:] + result.notes, details=result.details)
