"""compile_artifact: IR model -> deployable TVM artifact directory.

    DIR/
      model.so         the Relax VM executable, linked for the target (cross-compiled for ARM)
      params.npz       weights, keyed p0, p1, ... in the order `main` takes them after the inputs
      manifest.json    inputs, outputs, shapes, dtypes, target, pipeline, params, versions
      run.py           a copy of the runner: `python DIR/run.py DIR --input x.npy` on the device

The directory is built next to its destination and renamed into place, so a failure leaves
nothing half-written (and an existing artifact is replaced only by a complete one).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ir import CompressError, Model

from .lower import LoweredModule, lower_model
from .targets import TargetSpec, parse_target

__all__ = ["compile_artifact", "build_module", "MANIFEST_NAME", "LIBRARY_NAME", "PARAMS_NAME"]

MANIFEST_NAME = "manifest.json"
LIBRARY_NAME = "model.so"
PARAMS_NAME = "params.npz"
FORMAT_VERSION = 1
SMALL_PARAM_ELEMENTS = 4096  # weights up to this size are compiled into the library


def build_module(lowered: LoweredModule, spec: TargetSpec, tune_trials: int = 0,
                 rpc: str | None = None, progress: Callable | None = None,
                 cache_dir: Path | None = None, schedule: bool = True,
                 log: Callable[[str], None] | None = None,
                 merge_calls: bool = True,
                 max_merge_bytes: int | None = None,
                 exec_mode: str | None = None):
    """Schedule (default rules, or the tuning database), merge kernel calls (CPU) and compile;
    returns (executable, tuning info dict). `log` gets a line per tuned task.

    On CPU targets, with `merge_calls`, runs of kernel calls whose intermediate tensors total at
    most `max_merge_bytes` (default: merge_calls.DEFAULT_MAX_INTERMEDIATE_BYTES) are merged into
    one PrimFunc each (see merge_calls.py): it removes most of the Relax VM's per-call work,
    which dominates small models. `exec_mode` ("bytecode" / "compiled") overrides the target's
    default (see _exec_mode); a VM instrument (bench --profile) sees calls only in bytecode."""
    from tvm import relax

    from .schedule import default_schedule_pass

    target = spec.tvm_target()
    mod = lowered.mod
    tuning = {"trials": 0}
    with target:
        mod = relax.get_pipeline("zero")(mod)  # legalize to TIR, fuse, fold constants
        if tune_trials > 0:
            from .tune import tune_module
            mod, tuning = tune_module(mod, spec, tune_trials, rpc=rpc, progress=progress,
                                      cache_dir=cache_dir, log=log)
        if schedule:
            mod = default_schedule_pass(target)(mod)  # only functions the tuner left alone
        if merge_calls and not spec.is_gpu:
            # After scheduling: the merged function keeps each kernel's schedule as it is.
            from .merge_calls import DEFAULT_MAX_INTERMEDIATE_BYTES, MergeCallTIR
            limit = DEFAULT_MAX_INTERMEDIATE_BYTES if max_merge_bytes is None else max_merge_bytes
            mod = MergeCallTIR(max_intermediate_bytes=limit)(mod)
    try:
        executable = relax.build(mod, target=target, exec_mode=exec_mode or _exec_mode(spec))
    except Exception as exc:  # TVM codegen failures are multi-line C++ traces
        message = str(exc).strip().splitlines()
        raise CompressError(f"TVM failed to compile for {spec.name}: "
                            f"{message[-1] if message else type(exc).__name__}") from exc
    return executable, tuning


def _exec_mode(spec: TargetSpec) -> str:
    """How the VM runs `main`. "compiled" makes its bytecode a host function in the library,
    so a call dispatches no VM instructions (digits prune 0.35 l2 + int8, 1 thread: 0.036 ->
    0.030 ms without merging). Checked on CPU: host, and rasp4b / rasp5 artifacts run under
    qemu. GPU targets keep the bytecode: compiled mode compiles for CUDA, but no CUDA runtime
    is at hand to check that the library runs, and there the kernel launches, not the VM, set
    the per-call cost."""
    return "bytecode" if spec.is_gpu else "compiled"


def compile_artifact(model: Model, target: str, out_dir: Path | str, pipeline: str = "",
                     tune_trials: int = 0, rpc: str | None = None,
                     progress: Callable | None = None, cache_dir: Path | None = None,
                     schedule: bool = True, log: Callable[[str], None] | None = None,
                     tune_kernels: bool = False, merge_calls: bool = True,
                     exec_mode: str | None = None) -> dict:
    """Lower, schedule/tune, compile and export `model` for `target` into `out_dir`.

    `model` is the compressed IR model with static shapes. Returns the manifest (with
    "out_dir"). Raises CompressError subclasses for unsupported ops, bad targets or a missing
    cross compiler. With `tune_kernels` (and tune_trials > 0) the sparse kernels are emitted as
    schedulable blocked-ELL TIR that MetaSchedule tunes like any other task; off by default
    because untuned ELL is slower than our pre-scheduled BSR kernel. `merge_calls=False` keeps
    one VM call per kernel and `exec_mode="bytecode"` the interpreted VM (see build_module):
    together they give an artifact that a VM instrument can profile kernel by kernel.
    """
    spec = parse_target(target)
    compiler = spec.compiler()  # fail before the slow work when the toolchain is missing
    if rpc and tune_trials <= 0:
        raise CompressError("--rpc only matters with --tune-trials N > 0")
    started = time.monotonic()
    lowered = lower_model(model, target=spec, tunable_kernels=tune_kernels and tune_trials > 0)
    _bind_small_params(lowered)
    executable, tuning = build_module(lowered, spec, tune_trials, rpc, progress, cache_dir,
                                      schedule, log, merge_calls=merge_calls,
                                      exec_mode=exec_mode)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _export_library(executable, staging / LIBRARY_NAME, spec, compiler)
        np.savez(staging / PARAMS_NAME,
                 **{f"p{i}": lowered.params[name] for i, name in enumerate(lowered.param_names)})
        shutil.copyfile(Path(__file__).with_name("run.py"), staging / "run.py")
        manifest = _manifest(lowered, spec, pipeline, tuning, time.monotonic() - started)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**manifest, "out_dir": str(out_dir)}


def _bind_small_params(lowered: LoweredModule, max_elements: int = SMALL_PARAM_ELEMENTS) -> None:
    """Make weights of at most `max_elements` module constants instead of `main` parameters.

    The Relax VM checks every parameter's shape and dtype on every call; on a small model with
    many biases, scales and zero points that check is a measurable share of the run (digits int8:
    -9% latency). Large weights stay in params.npz so the library stays small.
    """
    import tvm
    from tvm import relax

    small = {name: tvm.runtime.tensor(lowered.params[name]) for name in lowered.param_names
             if lowered.params[name].size <= max_elements}
    if not small:
        return
    lowered.mod = relax.transform.BindParams("main", small)(lowered.mod)
    lowered.param_names = [name for name in lowered.param_names if name not in small]


def _export_library(executable, path: Path, spec: TargetSpec, compiler: str) -> None:
    from tvm.support import cc
    try:
        if spec.cross_toolchain is not None:
            executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))
        else:
            executable.export_library(str(path))
    except Exception as exc:
        message = str(exc).strip().splitlines()
        raise CompressError(f"linking the TVM library with {compiler} failed: "
                            f"{message[-1] if message else type(exc).__name__}") from exc


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished artifact into place; an old one is removed only after that worked."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
        os.replace(out_dir, old)
        try:
            os.replace(staging, out_dir)
        except BaseException:
            os.replace(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def _manifest(lowered: LoweredModule, spec: TargetSpec, pipeline: str, tuning: dict,
              seconds: float) -> dict:
    import tvm

    def tensors(items):
        return [{"name": n, "shape": list(s), "dtype": d} for n, s, d in items]

    return {
        "format": FORMAT_VERSION,
        "library": LIBRARY_NAME,
        "params_file": PARAMS_NAME,
        "entry": "main",
        "inputs": tensors(lowered.inputs),
        "outputs": tensors(lowered.outputs),
        "params": [{"key": f"p{i}", "name": name, "shape": list(lowered.params[name].shape),
                    "dtype": str(lowered.params[name].dtype)}
                   for i, name in enumerate(lowered.param_names)],
        "target": {"name": spec.name, "device": spec.device, "tvm": spec.config},
        "pipeline": pipeline,
        "schedule": "tuned" if tuning.get("trials") else "default",
        "tuning": tuning,
        "weight_meta": {name: _jsonable(meta) for name, meta in lowered.weight_meta.items()},
        "versions": {"tvm": tvm.__version__, "numpy": np.__version__,
                     "python": platform.python_version(), "built_on": platform.machine()},
        "compile_seconds": round(seconds, 2),
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else f"array{list(value.shape)}"
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
