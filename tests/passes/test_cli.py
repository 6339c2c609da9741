"""The `python -m passes.run` contract: outputs, report, and one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import conv_bn_relu_gemm, run_onnx

REPO = Path(__file__).resolve().parents[2]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "passes.run", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


@pytest.fixture
def small_model(tmp_path):
    path = tmp_path / "small.onnx"
    onnx.save(conv_bn_relu_gemm(), path)
    return path


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_writes_output_beside_input_and_report(small_model, tmp_path):
    report = tmp_path / "r.json"
    result = cli(small_model, "--report", report)
    assert result.returncode == 0, result.stderr
    out = small_model.with_name("small.opt.onnx")
    assert out.is_file()
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(onnx.load(out), {"x": x})[0],
                               run_onnx(conv_bn_relu_gemm(), {"x": x})[0], rtol=1e-5, atol=1e-5)
    data = json.loads(report.read_text())
    for side in ("before", "after"):
        assert set(data[side]) >= {"params", "macs", "nodes", "bytes"}
    assert data["before"]["nodes"] == 7 and data["after"]["nodes"] == 5
    assert data["passes"][0]["name"] == "cleanup" and data["passes"][0]["seconds"] >= 0
    assert "before" in result.stdout and "MACs" in result.stdout


def test_explicit_output_and_input_shape(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(conv_bn_relu_gemm(dynamic_batch=True), path)
    out = tmp_path / "custom.onnx"
    result = cli(path, "-o", out, "--input-shape", "x=2,3,8,8")
    assert result.returncode == 0, result.stderr
    dims = [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 8, 8]


def test_list_passes():
    result = cli("--list-passes")
    assert result.returncode == 0
    assert "cleanup:" in result.stdout and "fold-batchnorm:" in result.stdout


def test_missing_file(tmp_path):
    assert_one_line_error(cli(tmp_path / "nope.onnx"), "not found")


def test_not_onnx(tmp_path):
    path = tmp_path / "text.onnx"
    path.write_text("this is not a model\n" * 10)
    assert_one_line_error(cli(path), "not")
    assert not (tmp_path / "text.opt.onnx").exists()


def test_truncated(small_model):
    data = small_model.read_bytes()
    small_model.write_bytes(data[: len(data) // 2])
    result = cli(small_model)
    assert_one_line_error(result, "small.onnx")
    assert not small_model.with_name("small.opt.onnx").exists()


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert_one_line_error(cli(path), "empty file")


@pytest.mark.parametrize("args, fragment", [
    (["--passes", "shrink-everything"], "unknown pass 'shrink-everything'"),
    (["--passes", "cleanup:speed=11"], "unknown option 'speed'"),
    (["--input-shape", "x=1,three"], "must be integers"),
    (["--input-shape", "nosuch=1,3,8,8"], "not a graph input"),
    (["--tune-trials", "-3"], "--tune-trials"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--calib", "missing.npz"], "calibration file not found"),
])
def test_bad_options(small_model, args, fragment):
    result = cli(small_model, *args)
    assert_one_line_error(result, fragment)
    assert not small_model.with_name("small.opt.onnx").exists()


def test_dynamic_shape_without_shape_names_the_input(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(conv_bn_relu_gemm(dynamic_batch=True), path)
    assert_one_line_error(cli(path), "input 'x' has dynamic shape")
    assert not (tmp_path / "dyn.opt.onnx").exists()


def test_unsupported_construct(tmp_path):
    model = conv_bn_relu_gemm()
    model.graph.node[2].input[0] = "undefined_tensor"
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    assert_one_line_error(cli(path), "undefined value 'undefined_tensor'")
    assert not (tmp_path / "broken.opt.onnx").exists()


def test_bad_calibration_keys(small_model, tmp_path):
    calib = tmp_path / "c.npz"
    np.savez(calib, wrong=np.zeros((4, 3, 8, 8), np.float32))
    assert_one_line_error(cli(small_model, "--calib", calib), "no array for graph input 'x'")


def test_default_model_runs_the_main_job_into_the_current_directory(tmp_path):
    from models.digits import evaluate
    report = tmp_path / "report.json"
    result = cli("--passes", "cleanup,prune-channels:target_macs=0.5:reconstruct=true",
                 "--report", report, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "digits_resnet.opt.onnx"
    data = json.loads(report.read_text())
    assert data["after"]["macs"] <= 0.5 * data["before"]["macs"]
    # The shipped calibration split is used, so reconstruction keeps the accuracy.
    assert evaluate(out) >= 98.4
    assert not any("synthetic" in note for note in data["notes"])
