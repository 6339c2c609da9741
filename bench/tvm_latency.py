"""Latency on this machine: ONNX Runtime vs TVM untuned (default schedules) vs TVM tuned.

    PYTHONPATH=. python bench/tvm_latency.py [--models digits,minilm,resnet50]
        [--trials N | --trials digits=128,minilm=32] [--seq-len 128] [--repeat 20]
        [--json bench/out/tvm_latency.json]

Each model is cleaned up (`cleanup` pipeline) and compiled for `host` with compile_artifact,
untuned and (when it has trials) tuned. Then onnxruntime, the untuned and the tuned artifact
run on the same input in interleaved rounds (one run of each per round, after a warm-up), so
load changes hit all three alike; the table gives the median of --repeat rounds. `--trials` is
one MetaSchedule budget for every model or a per-model list (a model not listed, or 0, is not
tuned). Tuning starts from an empty database in a temporary directory (the shared cache is not
used), so the tuning time is the real cost of that many trials; the tasks that got trials, with
the time of their default schedule and of the best trial, are printed and saved in the JSON.
Also reports the largest difference from onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _model(name: str, seq_len: int = 128):
    """(ir model after cleanup, its ONNX bytes)."""
    import ir
    from passes.api import compress
    if name == "digits":
        from models.digits import MODEL_PATH
        path = MODEL_PATH
    elif name == "minilm":
        from models.minilm import model_path
        path = model_path(seq_len)
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


class _Timed:
    """One way of running the model, timed one call at a time."""

    def __init__(self, name, run):
        self.name, self.run, self.times = name, run, []

    def time_once(self):
        start = time.perf_counter()
        self.run()
        self.times.append((time.perf_counter() - start) * 1e3)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times))


def _ort(proto_bytes, feeds):
    import onnxruntime as ort
    session = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    return _Timed("ort", lambda: session.run(None, feeds)), session.run(None, feeds)


def _compile(model, trials, workdir):
    """(artifact, manifest) compiled for the host, tuned with `trials` when > 0."""
    from backends.tvm.build import compile_artifact
    from backends.tvm.run import load_artifact
    out_dir = Path(workdir) / f"art-{trials}"
    manifest = compile_artifact(model, "host", out_dir, pipeline="cleanup", tune_trials=trials,
                                cache_dir=Path(workdir) / "tuning-db",
                                log=lambda line: print(f"#   {line}", flush=True))
    return load_artifact(out_dir), manifest


def _tvm(name, artifact, feeds):
    tensors = [artifact._tvm.runtime.tensor(feeds[n], artifact.device)
               for n in artifact.input_names]

    def run():
        artifact.run_tensors(tensors)
        artifact.device.sync()

    return _Timed(name, run), artifact.run(*[feeds[n] for n in artifact.input_names])


def _max_diff(outputs, reference) -> float:
    return float(max(np.abs(o - r).max() for o, r in zip(outputs, reference)))


def measure(name, trials, repeat, seq_len=128) -> dict:
    """Compile (and tune), then time ORT / untuned / tuned in interleaved rounds."""
    model, proto = _model(name, seq_len)
    feeds = _inputs(model)
    ort, reference = _ort(proto, feeds)
    row = {"model": name if name != "minilm" else f"minilm (seq {seq_len})"}
    with tempfile.TemporaryDirectory() as workdir:
        start = time.monotonic()
        untuned_art, _ = _compile(model, 0, workdir)
        row["untuned_compile_s"] = round(time.monotonic() - start, 1)
        untuned, outputs = _tvm("untuned", untuned_art, feeds)
        row["max_abs_diff"] = _max_diff(outputs, reference)
        runs = [ort, untuned]
        if trials:
            tuned_art, manifest = _compile(model, trials, workdir)
            tuned, outputs = _tvm("tuned", tuned_art, feeds)
            tuning = manifest["tuning"]
            row.update(trials=trials, tuning_s=tuning["seconds"],
                       tuned_max_abs_diff=_max_diff(outputs, reference),
                       tasks=tuning["tasks"])
            runs.append(tuned)
        load_before = os.getloadavg()[0]
        for timed in runs:  # warm-up
            timed.run()
        for _ in range(repeat):
            for timed in runs:
                timed.time_once()
        row.update({f"{t.name}_ms": t.median_ms for t in runs})
        row["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,minilm,resnet50")
    parser.add_argument("--trials", default="0",
                        help="MetaSchedule trials: N for every model, or name=N,... (0: skip)")
    parser.add_argument("--seq-len", type=int, default=128, help="MiniLM sequence length")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", default="bench/out/tvm_latency.json")
    args = parser.parse_args(argv)
    trials_of = _parse_trials(args.trials)
    rows = []
    for name in args.models.split(","):
        row = measure(name, trials_of(name), args.repeat, args.seq_len)
        rows.append(row)
        print(f"# {name}: {json.dumps({k: v for k, v in row.items() if k != 'tasks'})}",
              flush=True)
        print(_tasks_table(row), flush=True)
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
             "| max abs diff | load avg |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        tuned = (f"{r['tuned_ms']:.3f} ({r['tuned_ms'] / r['ort_ms']:.2f}x)"
                 if "tuned_ms" in r else "-")
        trials = f"{r['trials']} / {r['tuning_s']:.0f}" if "tuned_ms" in r else "-"
        lines.append(f"| {r['model']} | {r['ort_ms']:.3f} | {r['untuned_ms']:.3f} "
                     f"({r['untuned_ms'] / r['ort_ms']:.2f}x) | {tuned} | {trials} "
                     f"| {r['max_abs_diff']:.2e} | {r['load_average'][0]}-{r['load_average'][1]} |")
    return "\n".join(lines)


def _tasks_table(row) -> str:
    """The tasks that got trials (and how many were skipped for which reason)."""
    tasks = row.get("tasks", [])
    if not tasks:
        return ""
    lines = [f"| {row['model']} task | x | MFLOP | trials (measured) | default ms | best trial ms |",
             "|---|---|---|---|---|---|"]
    for t in tasks:
        if t["trials"]:
            default = "-" if t["default_ms"] is None else f"{t['default_ms']:.3f}"
            best = "-" if t["best_ms"] is None else f"{t['best_ms']:.3f}"
            lines.append(f"| {t['name']} | {t['occurrences']} | {t['flops'] / 1e6:.1f} "
                         f"| {t['trials']} ({t['measured']}) | {default} | {best} |")
    skipped = {}
    for t in tasks:
        if t["skip"]:
            skipped[t["skip"]] = skipped.get(t["skip"], 0) + 1
    lines.append("skipped: " + ", ".join(f"{n} {why}" for why, n in skipped.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
