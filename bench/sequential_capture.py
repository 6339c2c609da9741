"""Sequential sparsify with and without staged captures (`passes.staged_capture`): wall time of
the whole pass and of its calibration statistics, side by side in one run, and whether the
results agree.

    PYTHONPATH=. python bench/sequential_capture.py [--samples 1101] [--spec SPEC]
        [--json bench/out/sequential_capture.json]

all-MiniLM-L6-v2 at seq_len 32, calibrated on `--samples` everyday texts
(`models.minilm.calibration_npz(corpus="everyday")`). The spec (default: SparseGPT 2:4 with
error, residual and bias correction, 24 sequential stages) runs twice on fresh copies of the
model: once as the pass runs it (each stage starts from the activations the previous stage
kept) and once with every stage running the model from its graph inputs (the behaviour before
staged captures). "statistics s" is the time inside `collect_statistics` (the onnxruntime runs
and the x^T x products); the rest of the pass (SparseGPT, corrections) is the same in both.
Agreement: the largest relative difference of any sparsified weight, and the MiniLM cosine of
both models (models.minilm.cosine_to_reference, 24 evaluation sentences).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import ir  # noqa: E402
import passes  # noqa: E402
import passes.sparsify.sparsify as sparsify_module  # noqa: E402
from models.minilm import calibration_npz, cosine_to_reference, model_path  # noqa: E402
from passes.staged_capture import StagedCapture  # noqa: E402

DEFAULT_SPEC = ("sparsify:pattern=nm:nm=2of4:method=sparsegpt:error_correction=true:"
                "bias_correction=true:residual_correction=true")


def run_once(base: onnx.ModelProto, spec: str, calib: Path, keep: bool) -> dict:
    """Compress a fresh copy; time the pass and its statistics."""
    spent = {"statistics": 0.0}
    collect = sparsify_module.collect_statistics

    def timed_collect(*args, **kwargs):
        start = time.perf_counter()
        try:
            return collect(*args, **kwargs)
        finally:
            spent["statistics"] += time.perf_counter() - start

    sparsify_module.collect_statistics = timed_collect
    if not keep:
        sparsify_module.StagedCapture = lambda model, feeds: StagedCapture(model, feeds,
                                                                           keep=False)
    try:
        model = ir.load_model(base)
        start = time.perf_counter()
        passes.compress(model, spec, calibration=str(calib))
        total = time.perf_counter() - start
    finally:
        sparsify_module.collect_statistics = collect
        sparsify_module.StagedCapture = StagedCapture
    weights = {v.name: v.const for v in model.graph.values().values()
               if v.is_constant and v.name.endswith("_sparse")}
    return {"total_s": total, "statistics_s": spent["statistics"], "weights": weights,
            "cosine": cosine_to_reference(ir.to_onnx(model))["cosine_mean"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1101)
    parser.add_argument("--spec", default=DEFAULT_SPEC)
    parser.add_argument("--json", type=Path, default=Path("bench/out/sequential_capture.json"))
    args = parser.parse_args(argv)
    base = onnx.load(str(model_path(seq_len=32, batch=1)))
    spec = f"{args.spec}:samples={args.samples}"
    with tempfile.TemporaryDirectory() as tmp:
        calib = calibration_npz(Path(tmp) / "calib.npz", n=args.samples, seq_len=32,
                                corpus="everyday")
        staged = run_once(base, spec, calib, keep=True)
        from_inputs = run_once(base, spec, calib, keep=False)
    assert staged["weights"].keys() == from_inputs["weights"].keys()
    worst = max(float(np.abs(staged["weights"][k] - from_inputs["weights"][k]).max()
                      / max(np.abs(from_inputs["weights"][k]).max(), 1e-30))
                for k in staged["weights"])
    rows = [("from the graph inputs at every stage", from_inputs),
            ("staged (from the previous stage's activations)", staged)]
    print(f"MiniLM seq_len 32, {args.samples} everyday texts, `{spec}`\n")
    print("| captures | pass s | statistics s | cosine mean |")
    print("|---|---|---|---|")
    for label, row in rows:
        print(f"| {label} | {row['total_s']:.1f} | {row['statistics_s']:.1f} | "
              f"{row['cosine']:.4f} |")
    speedup = from_inputs["statistics_s"] / max(staged["statistics_s"], 1e-9)
    print(f"\nstatistics {speedup:.1f}x faster, pass "
          f"{from_inputs['total_s'] / max(staged['total_s'], 1e-9):.1f}x; largest relative "
          f"weight difference {worst:.2e} over {len(staged['weights'])} sparsified weights")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "spec": spec, "samples": args.samples, "max_relative_weight_difference": worst,
        "rows": [{"captures": label, "pass_s": row["total_s"],
                  "statistics_s": row["statistics_s"], "cosine_mean": row["cosine"]}
                 for label, row in rows]}, indent=2))


if __name__ == "__main__":
    main()
