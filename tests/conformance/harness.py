"""Conformance harness: round-trip ONNX backend test cases through the IR and `cleanup`.

For every case: run the original model in onnxruntime on the case's inputs; load it into the IR,
infer shapes, run the `cleanup` pipeline, export it again, run that, and compare the outputs with
the case's own tolerances. Cases whose original onnxruntime cannot run are counted apart ("not
runnable"): they say nothing about us. For those, the same check is made with onnx's reference
evaluator where it can run the original (`details["reference"]`), reported separately. Outputs of
nondeterministic ops (random generators, training-mode Dropout) are compared by type and shape only.
Inputs and outputs of types numpy's bridge to onnxruntime lacks (bfloat16, float8, int4: ml_dtypes
arrays) travel as OrtValues.

Suites: `node` (the ~1,900 cases onnx.backend.test.case.node.collect_testcases generates) and the
model data shipped under onnx/backend/test/data: simple, pytorch-converted, pytorch-operator and
light (no inputs are shipped with light models: seeded random inputs are used).
"""

from __future__ import annotations

import ctypes
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

import ir
from passes import PassManager, build_pipeline

__all__ = ["Case", "Outcome", "iter_cases", "run_case", "SUITES"]

SUITES = ("node", "simple", "pytorch-converted", "pytorch-operator", "light")
_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
               "Bernoulli", "Multinomial"}


@dataclass
class Case:
    suite: str
    name: str
    model: onnx.ModelProto
    data_sets: list[tuple[list[Any], list[Any]]]
    rtol: float = 1e-3
    atol: float = 1e-7


@dataclass
class Outcome:
    case: str
    suite: str
    status: str  # "match", "mismatch", "error", "not-runnable"
    reason: str = ""
    details: dict = field(default_factory=dict)


# -- collecting cases ------------------------------------------------------------------------------
def iter_cases(suites=SUITES, every: int = 1) -> Iterator[Case]:
    """Cases of the given suites; `every=k` keeps one node case in k (deterministic sample)."""
    for suite in suites:
        if suite == "node":
            yield from _node_cases(every)
        elif suite == "light":
            yield from _light_cases()
        else:
            yield from _data_dir_cases(suite)


def _node_cases(every: int) -> Iterator[Case]:
    from onnx.backend.test.case.node import collect_testcases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = sorted(collect_testcases(None), key=lambda c: c.name)
    for index, case in enumerate(cases):
        if index % every:
            continue
        data_sets = [(list(inputs), list(outputs)) for inputs, outputs in case.data_sets]
        yield Case("node", case.name, case.model, data_sets, case.rtol, case.atol)


def _data_dir_cases(suite: str) -> Iterator[Case]:
    for folder in sorted((_DATA / suite).iterdir()):
        model_path = folder / "model.onnx"
        if not model_path.is_file():
            continue
        model = onnx.load(model_path)
        data_sets = []
        for data_dir in sorted(folder.glob("test_data_set_*")):
            inputs = [_read_pb(p, info.type) for p, info in
                      zip(sorted(data_dir.glob("input_*.pb"), key=_index), model.graph.input)]
            outputs = [_read_pb(p, info.type) for p, info in
                       zip(sorted(data_dir.glob("output_*.pb"), key=_index), model.graph.output)]
            data_sets.append((inputs, outputs))
        yield Case(suite, folder.name, model, data_sets)


def _index(path: Path) -> int:
    return int(path.stem.split("_")[-1])


def _read_pb(path: Path, type_proto: onnx.TypeProto):
    data = path.read_bytes()
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if kind == "optional_type":
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    if kind == "map_type":
        proto = onnx.MapProto()
        proto.ParseFromString(data)
        return numpy_helper.to_dict(proto)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def _light_cases() -> Iterator[Case]:
    rng = np.random.default_rng(0)
    for path in sorted((_DATA / "light").glob("light_*.onnx")):
        model = onnx.load(path)
        initializers = {t.name for t in model.graph.initializer}
        inputs = []
        for info in model.graph.input:
            if info.name in initializers:
                continue
            dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
            inputs.append(rng.standard_normal(dims).astype(np.float32))
        yield Case("light", path.stem, model, [(inputs, [])], rtol=1e-3, atol=1e-5)


# -- running ---------------------------------------------------------------------------------------
def _session(model: onnx.ModelProto):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _feeds(model: onnx.ModelProto, inputs: list, for_onnxruntime: bool = True) -> dict:
    """Test inputs bind in order to the graph inputs that are not initializers (IR<4 files list
    initializers among the inputs too)."""
    initializers = {t.name for t in model.graph.initializer}
    real = [info for info in model.graph.input if info.name not in initializers]
    return {info.name: _as_feed(value, for_onnxruntime) for info, value in zip(real, inputs)}


def _as_feed(value, for_onnxruntime: bool = True):
    """The generated cases give scalar inputs as numpy scalars and low-precision ones (float8,
    int4, ...) as TensorProtos; onnxruntime wants arrays, or OrtValues for the dtypes its
    numpy bridge lacks (bfloat16, float8, int4: ml_dtypes arrays)."""
    if isinstance(value, onnx.TensorProto):
        value = numpy_helper.to_array(value)
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if for_onnxruntime and isinstance(value, np.ndarray) and _is_exotic(value.dtype):
        return _to_ort_value(value)
    return value


def _is_exotic(dtype: np.dtype) -> bool:
    """ml_dtypes types (bfloat16, float8*, int4, ...) that onnxruntime's numpy bridge refuses."""
    return dtype.kind == "V" or dtype.name in _ML_DTYPE_NAMES


_ML_DTYPE_NAMES = {"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                   "int4", "uint4", "int2", "uint2", "float4_e2m1fn"}


def _to_ort_value(array: np.ndarray):
    """An OrtValue holding `array`, written as ONNX packs it (raw_data: 4-bit types packed)."""
    import onnxruntime as ort
    tensor = numpy_helper.from_array(array)
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), tensor.data_type)
    if len(tensor.raw_data) != value.tensor_size_in_bytes():
        raise ValueError(f"cannot feed {array.dtype} to onnxruntime")
    ctypes.memmove(value.data_ptr(), tensor.raw_data, len(tensor.raw_data))
    return value


def _from_ort_value(value):
    """A tensor OrtValue of a type numpy lacks, read back through a TensorProto (ml_dtypes)."""
    element = value.data_type()[len("tensor("):-1]
    tensor = onnx.TensorProto()
    tensor.data_type = _ORT_ELEMENT_TYPES[element]
    tensor.dims.extend(value.shape())
    tensor.raw_data = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
    return numpy_helper.to_array(tensor)


_ORT_ELEMENT_TYPES = {"bfloat16": onnx.TensorProto.BFLOAT16,
                      "float8e4m3fn": onnx.TensorProto.FLOAT8E4M3FN,
                      "float8e4m3fnuz": onnx.TensorProto.FLOAT8E4M3FNUZ,
                      "float8e5m2": onnx.TensorProto.FLOAT8E5M2,
                      "float8e5m2fnuz": onnx.TensorProto.FLOAT8E5M2FNUZ,
                      "int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4,
                      "int2": onnx.TensorProto.INT2, "uint2": onnx.TensorProto.UINT2}


def _run(session, feeds: dict) -> list:
    """session.run, except that outputs of types numpy lacks come back as ml_dtypes arrays."""
    outputs = session.get_outputs()
    if not any(o.type[len("tensor("):-1] in _ORT_ELEMENT_TYPES for o in outputs):
        return session.run(None, feeds)
    import onnxruntime as ort
    # run_with_ort_values takes OrtValues only.
    feeds = {name: value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(
        np.asarray(value)) for name, value in feeds.items()}
    values = session.run_with_ort_values([o.name for o in outputs], feeds)
    return [_from_ort_value(v) if v.data_type()[len("tensor("):-1] in _ORT_ELEMENT_TYPES
            else v.numpy() for v in values]


def round_trip(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX -> IR -> cleanup -> ONNX, the path under test."""
    ir_model = ir.load_model(model)
    ir.infer_shapes(ir_model)
    PassManager(build_pipeline("cleanup")).run(ir_model)
    return ir.to_onnx(ir_model)


def run_case(case: Case) -> Outcome:
    def outcome(status, reason=""):
        return Outcome(case.name, case.suite, status, reason)

    try:
        original = _session(case.model)
        expected_sets = [_run(original, _feeds(case.model, inputs))
                         for inputs, _ in case.data_sets]
    except Exception as exc:
        result = outcome("not-runnable", _first_line(exc))
        result.details["reference"] = _check_with_reference(case)
        return result
    try:
        converted = round_trip(case.model)
    except Exception as exc:
        return outcome("error", f"round trip: {type(exc).__name__}: {_first_line(exc)}")
    try:
        session = _session(converted)
    except Exception as exc:
        return outcome("error", f"round-tripped model does not load: {_first_line(exc)}")
    names = {i.name for i in session.get_inputs()}
    shape_only = _has_random_output(case.model)
    for (inputs, _), expected in zip(case.data_sets, expected_sets):
        feeds = {k: v for k, v in _feeds(case.model, inputs).items() if k in names}
        try:
            actual = _run(session, feeds)
        except Exception as exc:
            return outcome("error", f"round-tripped model fails to run: {_first_line(exc)}")
        problem = _compare(expected, actual, case.rtol, case.atol, shape_only)
        if problem:
            return outcome("mismatch", problem)
    return outcome("match", "types and shapes only (random op)" if shape_only else "")


def _check_with_reference(case: Case) -> str:
    """For a case onnxruntime cannot run (newer opset, missing kernel): the same round-trip
    check with onnx's reference evaluator. Returns "match", "cannot run" (the evaluator cannot
    run the original either) or "failed: <reason>". Reported apart from onnxruntime's counts."""
    from onnx.reference import ReferenceEvaluator

    def feeds(model, inputs, names=None):
        return {k: v for k, v in _feeds(model, inputs, for_onnxruntime=False).items()
                if names is None or k in names}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            original = ReferenceEvaluator(case.model)
            expected_sets = [original.run(None, feeds(case.model, inputs))
                             for inputs, _ in case.data_sets]
    except Exception:
        return "cannot run"
    try:
        converted = ReferenceEvaluator(round_trip(case.model))
        names = set(converted.input_names)
        shape_only = _has_random_output(case.model)
        for (inputs, _), expected in zip(case.data_sets, expected_sets):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                actual = converted.run(None, feeds(case.model, inputs, names))
            problem = _compare(expected, actual, case.rtol, case.atol, shape_only)
            if problem:
                return f"failed: {problem}"
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {_first_line(exc)}"
    return "match"


def _has_random_output(model: onnx.ModelProto) -> bool:
    for node in model.graph.node:
        if node.op_type in _RANDOM_OPS:
            return True
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            return True  # training_mode given as an input: the mask is random
    return False


def _compare(expected, actual, rtol, atol, shape_only) -> str:
    if len(expected) != len(actual):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for index, (want, got) in enumerate(zip(expected, actual)):
        problem = _compare_value(want, got, rtol, atol, shape_only)
        if problem:
            return f"output {index}: {problem}"
    return ""


def _compare_value(want, got, rtol, atol, shape_only) -> str:
    if isinstance(want, list):
        if not isinstance(got, list) or len(want) != len(got):
            return "sequence length differs"
        for w, g in zip(want, got):
            problem = _compare_value(w, g, rtol, atol, shape_only)
            if problem:
                return problem
        return ""
    if want is None or got is None:
        return "" if want is None and got is None else "optional presence differs"
    want, got = np.asarray(want), np.asarray(got)
    if want.shape != got.shape:
        return f"shape {got.shape} != {want.shape}"
    if want.dtype != got.dtype:
        return f"dtype {got.dtype} != {want.dtype}"
    if shape_only:
        return ""
    if want.dtype.kind in "OUSb" or want.dtype.kind in "iu":
        return "" if np.array_equal(want, got) else "values differ"
    try:
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as exc:
        return " ".join(str(exc).split())[:200]
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
