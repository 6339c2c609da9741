"""Slow: one compressed pipeline per model of the model-level benchmark (pruned / sparse / int8,
as in bench/model_level.py), built by the CLI for aarch64 and run under qemu-user with the copy
of the runner inside the artifact, must give the x86 artifact's result; the same pipelines must
compile for CUDA (compile and export only: the PyPI TVM has no CUDA runtime, and no GPU here).

rasp4b (Cortex-A72, no dot product) runs the int8 layers on the float path over dequantized
weights, while x86 runs them with the int8 kernel (vpmaddwd) and rasp5 with the sdot kernel:
the results agree up to float rounding, and where a rounding lands on the other side of a
QuantizeLinear step, one quantization step of that activation. So outputs are compared with a
tolerance of a few per mille of their range (digits logits) or by cosine (MiniLM embeddings),
and the digits class must not change. See backends/tvm/README.md for the qemu setup
(QEMU_TVM_ROOT points at an existing root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import qemu_root_or_skip

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
DIGITS_PIPELINE = ("cleanup,prune-channels:target_macs=0.5:reconstruct=true,"
                   "sparsify:method=sparsegpt:pattern=block:block=4x1:sparsity=0.7:kernels=1x1"
                   ":include_first_last=true,quantize")
# A small seq_len keeps the emulated run short; the layers are those of seq_len 128.
MINILM_SEQ_LEN = 32
MINILM_PIPELINE = ("cleanup,sparsify:method=sparsegpt:pattern=block:block=4x2:sparsity=0.8"
                   ":samples=8,quantize:samples=16")


def _digits(tmp: Path):
    """(model path, pipeline, calibration .npz, {input name: array})."""
    from models.digits import MODEL_PATH, calibration_npz, load_splits
    calib = calibration_npz(tmp / "calib.npz")
    return Path(MODEL_PATH), DIGITS_PIPELINE, calib, {"input": load_splits().x_test[:1]}


def _minilm(tmp: Path):
    minilm = pytest.importorskip("models.minilm")
    from models.minilm.evaluate import EVAL_SENTENCES
    calib = minilm.calibration_npz(tmp / "calib.npz", n=16, seq_len=MINILM_SEQ_LEN)
    feeds = minilm.tokenize(EVAL_SENTENCES[:1], MINILM_SEQ_LEN)
    return minilm.model_path(MINILM_SEQ_LEN), MINILM_PIPELINE, calib, feeds


MODELS = {"digits": _digits, "minilm": _minilm}


def _build(model: Path, pipeline: str, calib: Path, target: str, out_dir: Path) -> None:
    """The CLI, as a user runs it: passes, then the artifact for `target`."""
    result = subprocess.run(
        [sys.executable, "-m", "passes.run", str(model), "--passes", pipeline,
         "--calib", str(calib), "--target", target, "--out-dir", str(out_dir),
         "-o", str(out_dir.with_suffix(".onnx"))],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def host_artifacts(tmp_path_factory):
    """Per model: (tmp dir, model path, pipeline, calib, feeds, host artifact output)."""
    from backends.tvm.run import load_artifact
    built = {}
    for name, setup in MODELS.items():
        tmp = tmp_path_factory.mktemp(name)
        model, pipeline, calib, feeds = setup(tmp)
        _build(model, pipeline, calib, "host", tmp / "host")
        host = load_artifact(tmp / "host")
        inputs = [feeds[n] for n in host.input_names]
        index = [o["name"] for o in host.manifest["outputs"]].index(
            "sentence_embedding" if name == "minilm" else host.manifest["outputs"][0]["name"])
        built[name] = (tmp, model, pipeline, calib, feeds, host.run(*inputs)[index], index)
    return built


def _assert_same(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if name == "digits":
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-3 * scale)
        assert got.argmax() == want.argmax()
    else:
        cos = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert cos > 0.999, cos


@pytest.mark.parametrize("target", ["rasp4b", "rasp5"])
@pytest.mark.parametrize("name", list(MODELS))
def test_compressed_aarch64_artifact_under_qemu_matches_x86(name, target, host_artifacts):
    from backends.tvm import qemu_root
    root = qemu_root_or_skip()
    tmp, model, pipeline, calib, feeds, want, index = host_artifacts[name]
    art = tmp / target
    _build(model, pipeline, calib, target, art)
    manifest = json.loads((art / "manifest.json").read_text())
    kernels = {m["kernel"]["kernel"] for m in manifest["weight_meta"].values() if "kernel" in m}
    assert kernels, "the compressed layers reached no kernel choice"
    args = []
    for spec in manifest["inputs"]:
        np.save(tmp / f"{spec['name']}.npy", feeds[spec["name"]])
        args += ["--input", f"{spec['name']}={tmp / (spec['name'] + '.npy')}"]
    # The runner copy inside the artifact, as on a Pi (no project checkout there).
    out = tmp / f"{target}.npy"
    output = manifest["outputs"][index]["name"]
    result = subprocess.run(qemu_root.python_command(root)
                            + [str(art / "run.py"), str(art), *args, "--output", f"{output}={out}"],
                            env=qemu_root.python_env(root), capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_same(name, np.load(out), want)


@pytest.mark.parametrize("name", list(MODELS))
def test_compressed_pipeline_compiles_for_cuda(name, host_artifacts):
    """Compile and export only (no CUDA runtime in the PyPI TVM, no GPU on this machine)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA code cannot be compiled here")
    tmp, model, pipeline, calib, _, _, _ = host_artifacts[name]
    _build(model, pipeline, calib, "cuda", tmp / "cuda")
    manifest = json.loads((tmp / "cuda" / "manifest.json").read_text())
    assert manifest["target"]["device"] == "cuda"
    assert (tmp / "cuda" / "model.so").stat().st_size > 0
