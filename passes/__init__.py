"""Compression passes over the `ir` graph, the pass manager, the Python API and the CLI
(`python -m passes.run`)."""

from .api import CompressionReport, apply, compress, prepare
from .calibration import CalibrationSet, capture
from .core import (OptionError, Option, Pass, PassContext, PassError, PassResult,
                   PreconditionError, available_passes, get_pass, register_pass)
from .manager import PassManager, PassRecord, model_summary
from .spec import build_pipeline, parse_spec

__all__ = [
    "apply", "compress", "prepare", "CompressionReport",
    "Pass", "Option", "PassContext", "PassResult", "register_pass", "get_pass",
    "available_passes", "PassManager", "PassRecord", "model_summary",
    "build_pipeline", "parse_spec", "CalibrationSet", "capture",
    "PassError", "PreconditionError", "OptionError",
]
