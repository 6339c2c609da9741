"""Cleanup passes: semantics-preserving simplifications run before compression."""

from .batchnorm import FoldBatchNorm
from .dead_code import EliminateDeadCode
from .fold_constants import FoldConstants
from .identity import RemoveIdentity
from .opset import UpgradeOpset, upgrade_opset
from .pipeline import Cleanup

__all__ = ["Cleanup", "FoldConstants", "EliminateDeadCode", "RemoveIdentity", "FoldBatchNorm",
           "UpgradeOpset", "upgrade_opset"]
