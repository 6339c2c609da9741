"""Targets, artifacts and the device runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ir
from ir import CompressError
from passes.api import compress

from .conftest import ort_run

ROOT = Path(__file__).resolve().parents[3]


def _small_model():
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import conv_bn_relu_gemm
    return conv_bn_relu_gemm()


def _digits_or_small():
    try:
        from models.digits import MODEL_PATH
        if Path(MODEL_PATH).exists():
            import onnx
            return onnx.load(str(MODEL_PATH))
    except ImportError:
        pass
    return _small_model()


# -- targets ------------------------------------------------------------------------------------
def test_presets_parse():
    from backends.tvm.targets import parse_target
    pi4 = parse_target("rasp4b")
    assert pi4.config["mtriple"] == "aarch64-linux-gnu" and pi4.config["mcpu"] == "cortex-a72"
    assert pi4.cross_toolchain == ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
    assert "+dotprod" in parse_target("rasp5").config["mattr"]
    assert parse_target("rasp3b").cross_toolchain[0] == "arm-linux-gnueabihf-gcc"
    cuda = parse_target("cuda:arch=sm_86")
    assert cuda.config == {"kind": "cuda", "arch": "sm_86"} and cuda.device == "cuda"
    assert parse_target("host").runs_here
    custom = parse_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}')
    assert custom.name == "custom" and custom.tvm_target().kind.name == "llvm"


@pytest.mark.parametrize("text, message", [
    ("pi9", "unknown --target 'pi9'"),
    ("cuda:arch=86", "bad CUDA arch"),
    ("rasp4b:arch=x", "takes no option"),
    ("{not json", "not valid JSON"),
    ('{"kind": "nosuchkind"}', "bad TVM target"),
])
def test_bad_target_is_one_line_error(text, message):
    from backends.tvm.targets import parse_target
    with pytest.raises(CompressError, match=message) as info:
        parse_target(text)
    assert "\n" not in str(info.value)


def test_missing_cross_compiler_names_debian_package(monkeypatch, tmp_path):
    from backends.tvm import build
    monkeypatch.setattr(shutil, "which", lambda name: None)
    model = ir.load_model(_small_model())
    compress(model, "cleanup")
    with pytest.raises(CompressError, match="gcc-aarch64-linux-gnu"):
        build.compile_artifact(model, "rasp4b", tmp_path / "art")
    assert not any(tmp_path.iterdir())  # nothing half-written


# -- host artifact end to end -------------------------------------------------------------------
def test_host_artifact_matches_onnxruntime(tmp_path):
    """compile_artifact + the runner CLI (in a subprocess, as on a device) vs onnxruntime."""
    from backends.tvm.build import compile_artifact
    proto = _digits_or_small()
    model = ir.load_model(proto)
    compress(model, "cleanup")
    out_dir = tmp_path / "art"
    manifest = compile_artifact(model, "host", out_dir, pipeline="cleanup")
    assert manifest["out_dir"] == str(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["manifest.json", "model.so",
                                                         "params.npz", "run.py"]
    on_disk = json.loads((out_dir / "manifest.json").read_text())
    assert on_disk["pipeline"] == "cleanup" and on_disk["target"]["name"] == "host"
    (spec,) = on_disk["inputs"]
    x = np.random.default_rng(1).standard_normal(spec["shape"]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "backends.tvm.run", str(out_dir), "--input",
                             str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"),
                             "--bench", "3"], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("median_ms=")
    expected = ort_run(proto, {spec["name"]: x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-4, atol=1e-5)
    # Small weights (biases) are compiled into the library; only large ones are shipped.
    from backends.tvm.build import SMALL_PARAM_ELEMENTS
    stored = np.load(out_dir / "params.npz")
    assert stored.files and all(stored[k].size > SMALL_PARAM_ELEMENTS for k in stored.files)
    assert len(on_disk["params"]) == len(stored.files)


def test_runner_imports_only_tvm_numpy_stdlib():
    source = (ROOT / "backends" / "tvm" / "run.py").read_text()
    for forbidden in ("import ir", "from ir", "passes", "onnx", "backends."):
        assert forbidden not in source.replace("backends.tvm.run", "")


def test_cuda_artifact_compiles(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA code cannot be compiled here")
    from backends.tvm.build import compile_artifact
    model = ir.load_model(_small_model())
    compress(model, "cleanup")
    manifest = compile_artifact(model, "cuda:arch=sm_80", tmp_path / "cuda")
    assert manifest["target"]["device"] == "cuda"
    assert (tmp_path / "cuda" / "model.so").stat().st_size > 0


@pytest.mark.gpu
def test_cuda_artifact_runs_on_gpu(tmp_path):
    import tvm
    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU")
    from backends.tvm.build import compile_artifact
    from backends.tvm.run import load_artifact
    proto = _small_model()
    model = ir.load_model(proto)
    compress(model, "cleanup")
    major, minor = tvm.cuda(0).compute_version.split(".")
    compile_artifact(model, f"cuda:arch=sm_{major}{minor}", tmp_path / "cuda")
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(load_artifact(tmp_path / "cuda").run(x)[0],
                               ort_run(proto, {"x": x})[0], rtol=1e-3, atol=1e-4)
