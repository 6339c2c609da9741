"""cleanup: the default pipeline of simplifications, run to a fixed point."""

from __future__ import annotations

from ir import Model, infer_shapes

from ..core import Option, Pass, PassContext, PassResult, register_pass
from .batchnorm import FoldBatchNorm
from .dead_code import EliminateDeadCode
from .fold_constants import FoldConstants
from .identity import RemoveIdentity
from .opset import upgrade_opset

__all__ = ["Cleanup"]


@register_pass
class Cleanup(Pass):
    """Simplify the graph without changing what it computes: fold constants, remove
    Identity/Dropout, fold BatchNormalization into Conv/Gemm, drop dead code; repeated until
    nothing changes. With `opset=N` the model is first upgraded to opset N."""
    name = "cleanup"
    options = {
        "opset": Option(int, 0, "upgrade to this opset first (0: keep the model's opset)"),
        "fold_batchnorm": Option(bool, True, "fold BatchNormalization into Conv/Gemm"),
    }
    _MAX_ROUNDS = 5

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        changed = bool(self.opset) and upgrade_opset(model, self.opset)
        steps = [FoldConstants(), RemoveIdentity(), EliminateDeadCode()]
        if self.fold_batchnorm:
            steps.insert(2, FoldBatchNorm())
        counts: dict[str, int] = {}
        for _ in range(self._MAX_ROUNDS):
            round_changed = False
            for step in steps:
                result = step.run(model, ctx)
                if result.changed:
                    round_changed = True
                    counts[step.name] = counts.get(step.name, 0) + 1
            changed |= round_changed
            if not round_changed:
                break
            # Folding can make more shapes static (e.g. a Reshape whose target just became a
            # constant), which lets the next round fold the Shape nodes that read them.
            infer_shapes(model)
        return PassResult(changed=changed, details={"rounds_changed": counts})
