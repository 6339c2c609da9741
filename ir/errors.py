"""Error types shared by the IR, the passes and the backends.

Every error the user can cause (bad file, unsupported construct, missing shape, bad option) is a
`CompressError`; the CLI prints its message as one line and exits with status 2. Anything else is a
bug in this project.
"""

__all__ = [
    "CompressError",
    "ModelLoadError",
    "UnsupportedModelError",
    "ShapeError",
    "GraphError",
]


class CompressError(Exception):
    """Base class of errors caused by the input or the options, reported to the user in one line."""


class ModelLoadError(CompressError):
    """The file is missing, is not ONNX, or is truncated."""


class UnsupportedModelError(CompressError):
    """The model uses a construct this project cannot handle (e.g. an op without a lowering)."""


class ShapeError(CompressError):
    """Shapes are missing or inconsistent (e.g. a dynamic input dimension with no shape given)."""


class GraphError(CompressError):
    """The graph is structurally invalid (undefined value, cycle, duplicate name)."""
