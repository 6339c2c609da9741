"""Calibration data and activation capture for data-aware passes.

`CalibrationSet` holds the samples of a `--calib` file: an .npz whose arrays are keyed by graph
input name, first axis = samples. A sample either is one full input (its shape equals the input's)
or one item of a batch (its shape is the input's without the batch axis); `feeds()` groups samples
into the model's static batch size either way.

`capture(model, value_names, calibration)` runs the model in onnxruntime with extra outputs and
returns those intermediate tensors per feed: importance scores (pruning), Wanda and SparseGPT
(sparsify), ranges (quantize) and least-squares reconstruction all start from it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ir import CompressError, Model, to_onnx

__all__ = ["CalibrationSet", "capture", "capture_session", "make_session", "real_token_rows",
           "subgraph_session", "token_mask_input"]


class CalibrationSet:
    # How synthetic samples are made when no --calib file is given (printed in reports).
    SYNTHETIC_RULE = ("float inputs ~ N(0,1); integer inputs named like *mask* = 1, "
                      "other integer inputs uniform in [0, 100)")

    def __init__(self, arrays: dict[str, np.ndarray], synthetic: bool = False):
        if not arrays:
            raise CompressError("calibration data has no arrays")
        counts = {len(a) for a in arrays.values()}
        if len(counts) != 1:
            raise CompressError("calibration arrays must all have the same number of samples "
                                f"(first axis); got {sorted(counts)}")
        self.arrays = arrays
        self.synthetic = synthetic

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    @classmethod
    def from_npz(cls, path, model: Model) -> "CalibrationSet":
        """Load and validate a --calib file against the model's inputs."""
        path = Path(path)
        if not path.is_file():
            raise CompressError(f"calibration file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: np.asarray(data[key]) for key in data.files}
        except Exception as exc:
            raise CompressError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None
        inputs = {v.name: v for v in model.graph.inputs}
        missing = [name for name in inputs if name not in arrays]
        if missing:
            raise CompressError(f"{path}: no array for graph input {missing[0]!r} "
                                f"(keys: {', '.join(arrays) or 'none'})")
        arrays = {name: arrays[name] for name in inputs}
        for name, array in arrays.items():
            _sample_layout(inputs[name], array, str(path))
            arrays[name] = array.astype(inputs[name].dtype, copy=False)
        return cls(arrays)

    @classmethod
    def synthetic(cls, model: Model, samples: int = 32, seed: int = 0) -> "CalibrationSet":
        """Random samples following SYNTHETIC_RULE, shaped like single batch items."""
        rng = np.random.default_rng(seed)
        arrays = {}
        for value in model.graph.inputs:
            shape = tuple(d if isinstance(d, int) else 1 for d in (value.shape or ()))
            item = shape[1:] if len(shape) > 1 else shape
            full = (samples, *item)
            dtype = value.dtype or np.dtype(np.float32)
            if dtype.kind == "f":
                arrays[value.name] = rng.standard_normal(full).astype(dtype)
            elif "mask" in value.name.lower() or dtype == np.bool_:
                arrays[value.name] = np.ones(full, dtype=dtype)
            else:
                arrays[value.name] = rng.integers(0, 100, size=full).astype(dtype)
        return cls(arrays, synthetic=True)

    def feeds(self, model: Model, limit: int | None = None) -> list[dict[str, np.ndarray]]:
        """Input dicts for onnxruntime, grouped to the model's (static) batch size."""
        inputs = {v.name: v for v in model.graph.inputs}
        count = len(self) if limit is None else min(limit, len(self))
        first = next(iter(inputs.values()))
        per_sample = _sample_layout(first, self.arrays[first.name], "calibration") == "full"
        batch = 1 if per_sample else _batch_size(first)
        feeds = []
        for start in range(0, count - batch + 1, batch):
            feed = {}
            for name, value in inputs.items():
                chunk = self.arrays[name][start:start + batch]
                feed[name] = chunk[0] if per_sample else chunk
            feeds.append(feed)
        return feeds


def _batch_size(value) -> int:
    dim = value.shape[0] if value.shape else 1
    return dim if isinstance(dim, int) else 1


def _sample_layout(value, array: np.ndarray, label: str) -> str:
    """'full' when a sample is a whole input, 'item' when it is one batch item."""
    shape = value.shape
    if shape is None:
        return "item"
    sample = tuple(array.shape[1:])
    if _matches(sample, shape):
        return "full"
    if _matches(sample, shape[1:]):
        return "item"
    raise CompressError(f"{label}: samples of {value.name!r} have shape {list(sample)}, which "
                        f"fits neither the input shape {list(shape)} nor one batch item of it")


def _matches(sample: tuple, shape: tuple) -> bool:
    return len(sample) == len(shape) and all(not isinstance(d, int) or d == s
                                             for s, d in zip(sample, shape))


def token_mask_input(model: Model, option: str, pass_name: str) -> str | None:
    """The graph input whose zeros mark padding tokens to leave out of calibration statistics.

    `option` is a pass's token_mask value: "none", "auto" (an input named attention_mask, if
    any) or an input name; a name that is not a graph input is an OptionError.
    """
    from .core import OptionError
    names = [v.name for v in model.graph.inputs]
    if option == "none":
        return None
    if option == "auto":
        return "attention_mask" if "attention_mask" in names else None
    if option not in names:
        raise OptionError(f"{pass_name}: token_mask={option!r} is not a graph input "
                          f"(inputs: {', '.join(names)})")
    return option


def real_token_rows(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """`array` without the positions where the token mask is 0, when its leading dims are the
    mask's ([batch, seq, ...] under a [batch, seq] mask gives [real tokens, ...]); otherwise
    `array` unchanged. Padding tokens never reach a pooled output, so statistics and errors
    leave them out."""
    if mask is not None and array.ndim > mask.ndim and array.shape[:mask.ndim] == mask.shape:
        return array[np.asarray(mask).astype(bool)]
    return array


def make_session(proto: onnx.ModelProto):
    """An onnxruntime CPU session with graph optimizations off (so every tensor stays visible)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def subgraph_session(proto: onnx.ModelProto, nodes, inputs: list[onnx.ValueInfoProto],
                     outputs: list[str]):
    """A session of `nodes` (NodeProtos of `proto`, in order) alone: `inputs` fed (graph
    inputs, values computed elsewhere, or constants to be fed in place of their initializers),
    `outputs` fetched; the initializers they read otherwise come along. `proto` is not
    changed."""
    fed = {value.name for value in inputs}
    used = {name for node in nodes for name in node.input if name}
    initializers = [t for t in proto.graph.initializer if t.name in used and t.name not in fed]
    graph = onnx.helper.make_graph(nodes, proto.graph.name, inputs,
                                   [onnx.ValueInfoProto(name=name) for name in outputs],
                                   initializers)
    sub = onnx.helper.make_model(graph, opset_imports=proto.opset_import,
                                 ir_version=proto.ir_version)
    sub.functions.extend(proto.functions)  # model-local functions the nodes may call
    return make_session(sub)


def capture_session(model: Model, value_names: list[str]):
    """An onnxruntime session of the model with `value_names` added to its outputs."""
    proto = to_onnx(model)
    listed = {o.name for o in proto.graph.output}
    for name in value_names:
        if name not in listed:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            listed.add(name)
    return make_session(proto)


def capture(model: Model, value_names: list[str], calibration: CalibrationSet,
            limit: int | None = None) -> dict[str, list[np.ndarray]]:
    """Run the model on the calibration feeds; return each named tensor, one array per feed."""
    session = capture_session(model, value_names)
    captured: dict[str, list[np.ndarray]] = {name: [] for name in value_names}
    for feed in calibration.feeds(model, limit):
        for name, result in zip(value_names, session.run(value_names, feed)):
            captured[name].append(result)
    return captured
