"""The device runner's options: --output NAME=path for a named output, --threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from onnx import helper

import ir
from passes.api import compress

from .conftest import make_model, ort_run

ROOT = Path(__file__).resolve().parents[3]


def _two_output_artifact(tmp_path):
    """y = relu(x @ w), z = x + 1: two outputs, so the second one is not what --output y.npy
    saves."""
    from backends.tvm.build import compile_artifact
    w = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"]),
         helper.make_node("Add", ["x", "one"], ["z"])],
        [("x", np.float32, [3, 6])], [("y", np.float32, [3, 4]), ("z", np.float32, [3, 6])],
        {"w": w, "one": np.ones((1,), np.float32)})
    model = ir.load_model(proto)
    compress(model, "cleanup")
    compile_artifact(model, "host", tmp_path / "art")
    return proto


def _run(*args):
    return subprocess.run([sys.executable, "-m", "backends.tvm.run", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_output_by_name_and_threads(tmp_path):
    proto = _two_output_artifact(tmp_path)
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = _run(tmp_path / "art", "--input", tmp_path / "x.npy", "--threads", "1",
                  "--output", tmp_path / "first.npy", "--output", f"z={tmp_path / 'z.npy'}",
                  "--bench", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("median_ms=")
    want_y, want_z = ort_run(proto, {"x": x})
    np.testing.assert_allclose(np.load(tmp_path / "first.npy"), want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), want_z, rtol=1e-6)


def test_set_threads_sizes_the_pool():
    """In a fresh process: TVM sizes its pool when it first starts, so set_threads must come
    first (as the runner's --threads does); afterwards it can still lower the count."""
    code = ("import tvm; from backends.tvm.run import set_threads; "
            "n = tvm.get_global_func('runtime.NumThreads'); "
            "set_threads(2); a = n(); set_threads(1); print(a, n())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TVM_NUM_THREADS": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["2", "1"]
