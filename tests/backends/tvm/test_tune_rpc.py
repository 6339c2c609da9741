"""Tuning through a TVM RPC tracker, end to end through the CLI: a tracker and an RPC server on
127.0.0.1 stand in for the host and a board (`--rpc HOST:PORT:KEY`, see backends/tvm/README.md).
Slow: ~6 minutes on the shared 2-core machine at load 14-20 (MetaSchedule's search round and
each candidate build take tens of seconds there)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ir
from passes.api import compress

from .conftest import ort_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
KEY = "graph-compress-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tracker():
    """(port) of a tracker on 127.0.0.1 with one RPC server registered under KEY."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    port = _free_port()
    tracker = Tracker(host="127.0.0.1", port=port, port_end=port + 1, silent=True)
    server = rpc.Server(host="127.0.0.1", port=_free_port(), port_end=65000,
                        tracker_addr=("127.0.0.1", tracker.port), key=KEY, silent=True)
    try:
        deadline = time.monotonic() + 60
        while KEY not in str(rpc.connect_tracker("127.0.0.1", tracker.port).text_summary()):
            assert time.monotonic() < deadline, "the RPC server never registered"
            time.sleep(0.5)
        yield tracker.port
    finally:
        server.terminate()
        tracker.terminate()


def test_cli_tunes_through_rpc_tracker(tracker, tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import conv_bn_relu_gemm
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(conv_bn_relu_gemm().SerializeToString())
    out = tmp_path / "art"
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRAPH_COMPRESS_CACHE": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-m", "passes.run", str(model_path), "--passes", "cleanup",
                    "--target", "host", "--tune-trials", "4", "--rpc",
                    f"127.0.0.1:{tracker}:{KEY}", "--out-dir", str(out),
                    "-o", str(tmp_path / "m.opt.onnx")],
                   check=True, cwd=REPO, env=env, capture_output=True, timeout=3000)

    tuning = json.loads((out / "manifest.json").read_text())["tuning"]
    assert tuning["rpc"] == f"127.0.0.1:{tracker}:{KEY}"
    tuned = [t for t in tuning["tasks"] if t["trials"]]
    # the convolution is the heavy task; its default schedule and its candidates were timed
    # on the RPC server
    assert tuned and "conv2d" in tuned[0]["name"]
    assert tuned[0]["measured"] > 0 and tuned[0]["best_ms"] > 0
    assert tuned[0]["default_ms"] is not None

    from backends.tvm.run import load_artifact
    artifact = load_artifact(out)
    model = ir.load_model(model_path)
    compress(model, "cleanup")
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(artifact.run(x)[0], ort_run(ir.to_onnx(model), {"x": x})[0],
                               rtol=1e-4, atol=1e-5)
