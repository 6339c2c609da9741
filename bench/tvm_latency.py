"""Latency on this machine: ONNX Runtime vs TVM untuned (default schedules) vs TVM tuned.

    PYTHONPATH=. python bench/tvm_latency.py [--models digits,minilm,resnet50]
        [--trials N | --trials digits=128,minilm=32] [--repeat 20] [--json bench/out/tvm.json]

Each model is cleaned up (`cleanup` pipeline), compiled for `host` with compile_artifact and
timed with the artifact runner (median of --repeat runs after a warm-up), side by side with
onnxruntime on the same cleaned model and the same input. `--trials` is one MetaSchedule budget
for every model or a per-model list (a model not listed, or 0, is not tuned). Tuning starts
from an empty database in a temporary directory (the shared cache is not used), so the tuning
time is the real cost of that many trials. Also reports the largest difference from
onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _model(name: str):
    """(ir model after cleanup, its ONNX bytes)."""
    import ir
    from passes.api import compress
    if name == "digits":
        from models.digits import MODEL_PATH
        path = MODEL_PATH
    elif name == "minilm":
        from models.minilm import model_path
        path = model_path(128)
    else:
        from models.onnx_zoo import light_model_path
        path = light_model_path(name)
    model = ir.load_model(path)
    compress(model, "cleanup")
    return model, ir.to_onnx(model).SerializeToString()


def _inputs(model, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        shape = tuple(int(d) for d in value.shape)
        if np.issubdtype(value.dtype, np.integer):
            feeds[value.name] = (rng.integers(1, 1000, shape) if "mask" not in value.name
                                 else np.ones(shape)).astype(value.dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(value.dtype)
    return feeds


def _ort_ms(proto_bytes, feeds, repeat):
    import onnxruntime as ort
    session = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), outputs


def _tvm_ms(model, feeds, repeat, trials, workdir):
    from backends.tvm.build import compile_artifact
    from backends.tvm.run import load_artifact
    start = time.monotonic()
    out_dir = Path(workdir) / f"art-{trials}"
    manifest = compile_artifact(model, "host", out_dir, pipeline="cleanup", tune_trials=trials,
                                cache_dir=Path(workdir) / "tuning-db")
    seconds = manifest.get("tuning", {}).get("seconds") or time.monotonic() - start
    artifact = load_artifact(out_dir)
    arrays = [feeds[n] for n in artifact.input_names]
    outputs = artifact.run(*arrays)
    return float(np.median(artifact.bench(arrays, repeat))), outputs, seconds, manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,minilm,resnet50")
    parser.add_argument("--trials", default="0",
                        help="MetaSchedule trials: N for every model, or name=N,... (0: skip)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", default="bench/out/tvm_latency.json")
    args = parser.parse_args(argv)
    trials_of = _parse_trials(args.trials)
    rows = []
    for name in args.models.split(","):
        trials = trials_of(name)
        model, proto = _model(name)
        feeds = _inputs(model)
        ort_ms, ref = _ort_ms(proto, feeds, args.repeat)
        with tempfile.TemporaryDirectory() as workdir:
            row = {"model": name, "ort_ms": ort_ms}
            ms, outs, secs, _ = _tvm_ms(model, feeds, args.repeat, 0, workdir)
            row.update(untuned_ms=ms, untuned_compile_s=secs,
                       max_abs_diff=float(max(np.abs(o - r).max() for o, r in zip(outs, ref))))
            if trials:
                ms, outs, secs, manifest = _tvm_ms(model, feeds, args.repeat, trials, workdir)
                row.update(tuned_ms=ms, tuning_s=secs, trials=trials,
                           tuned_max_abs_diff=float(max(np.abs(o - r).max()
                                                        for o, r in zip(outs, ref))))
        rows.append(row)
        print(f"# {name}: {json.dumps(row)}", flush=True)
    print(_table(rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _parse_trials(text: str):
    """'64' -> every model 64; 'digits=128,minilm=32' -> those, others 0."""
    if "=" not in text:
        return lambda name: int(text)
    table = {}
    for item in text.split(","):
        name, _, count = item.partition("=")
        table[name.strip()] = int(count)
    return lambda name: table.get(name, 0)


def _table(rows) -> str:
    lines = ["| model | ORT ms | TVM untuned ms (x ORT) | TVM tuned ms (x ORT) | trials / tuning s "
             "| max abs diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        tuned = (f"{r['tuned_ms']:.3f} ({r['tuned_ms'] / r['ort_ms']:.1f}x)"
                 if "tuned_ms" in r else "-")
        trials = f"{r['trials']} / {r['tuning_s']:.0f}" if "tuned_ms" in r else "-"
        lines.append(f"| {r['model']} | {r['ort_ms']:.3f} | {r['untuned_ms']:.3f} "
                     f"({r['untuned_ms'] / r['ort_ms']:.1f}x) | {tuned} | {trials} "
                     f"| {r['max_abs_diff']:.2e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
