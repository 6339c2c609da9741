"""Slow: real models compiled for the host vs onnxruntime, tuning, and the aarch64 artifact under
qemu-user (see backends/tvm/README.md for the qemu setup; QEMU_TVM_ROOT points at it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import ir
from passes.api import compress

from .conftest import ort_run, qemu_root_or_skip

pytestmark = pytest.mark.slow


def _compare(path, tmp_path, rtol=1e-3, atol=1e-4, target="host", trials=0):
    from backends.tvm.build import compile_artifact
    from backends.tvm.run import load_artifact
    model = ir.load_model(path)
    compress(model, "cleanup")
    proto = ir.to_onnx(model)
    rng = np.random.default_rng(0)
    feeds = {}
    for v in model.graph.inputs:
        shape = tuple(int(d) for d in v.shape)
        feeds[v.name] = (rng.integers(1, 1000, shape).astype(v.dtype)
                         if np.issubdtype(v.dtype, np.integer)
                         else rng.standard_normal(shape).astype(v.dtype))
    compile_artifact(model, target, tmp_path / "art", tune_trials=trials,
                     cache_dir=tmp_path / "cache")
    art = load_artifact(tmp_path / "art")
    got = art.run(*[feeds[n] for n in art.input_names])
    want = ort_run(proto, feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["resnet50", "squeezenet", "inception_v1", "shufflenet",
                                  "densenet121", "inception_v2", "bvlc_alexnet", "zfnet512",
                                  "vgg19"])
def test_light_model_matches_onnxruntime(name, tmp_path):
    from models.onnx_zoo import light_model_path
    _compare(light_model_path(name), tmp_path)


def test_minilm_matches_onnxruntime(tmp_path):
    minilm = pytest.importorskip("models.minilm")
    _compare(minilm.model_path(128), tmp_path, rtol=1e-3, atol=1e-4)


def test_tuned_small_model_matches(tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from helpers import conv_bn_relu_gemm
    path = tmp_path / "m.onnx"
    path.write_bytes(conv_bn_relu_gemm().SerializeToString())
    _compare(path, tmp_path, trials=8)


def _digits_path():
    from models.digits import MODEL_PATH
    return MODEL_PATH


def _squeezenet_path():
    from models.onnx_zoo import light_model_path
    return light_model_path("squeezenet")


@pytest.mark.parametrize("model_path", [_digits_path, _squeezenet_path],
                         ids=["digits", "squeezenet"])
def test_rasp4b_artifact_under_qemu(model_path, tmp_path):
    """The rasp4b artifact made by the CLI runs on an emulated aarch64 Python and gives the
    host artifact's result (both from `passes.run ... --passes cleanup`)."""
    import sys
    from backends.tvm import qemu_root
    from backends.tvm.run import load_artifact
    root = qemu_root_or_skip()
    repo = Path(__file__).resolve().parents[3]
    path = model_path()
    for target in ("host", "rasp4b"):
        subprocess.run([sys.executable, "-m", "passes.run", str(path), "--passes", "cleanup",
                        "--target", target, "--out-dir", str(tmp_path / target),
                        "-o", str(tmp_path / "cleaned.onnx")],
                       check=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                       capture_output=True, timeout=1800)
    host = load_artifact(tmp_path / "host")
    x = np.random.default_rng(0).standard_normal(
        tuple(host.manifest["inputs"][0]["shape"])).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    # The copy of the runner inside the artifact, as on a real Pi (no project checkout there).
    subprocess.run(qemu_root.python_command(root)
                   + [str(tmp_path / "rasp4b" / "run.py"), str(tmp_path / "rasp4b"),
                      "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")],
                   check=True, env=qemu_root.python_env(root), capture_output=True,
                   timeout=1800)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), host.run(x)[0],
                               rtol=1e-4, atol=1e-5)
