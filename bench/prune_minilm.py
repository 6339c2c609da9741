"""Structured pruning of MiniLM (all-MiniLM-L6-v2): embedding cosine to the original after
removing FFN units and attention heads (prune-channels) or whole layers (prune-layers), and
onnxruntime latency of the pruned models next to the original (one run, alternating).

    python bench/prune_minilm.py [--seq-len 64] [--calib 64] [--json bench/out/prune_minilm.json]

Cosine: models.minilm.cosine_to_reference (24 held-out sentences, mean-pooled, vs the unpruned
model at the same seq_len). Calibration: the first N passages of models.minilm's corpus.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ir  # noqa: E402
import passes  # noqa: E402
from models.minilm import calibration_npz, cosine_to_reference, model_path  # noqa: E402

CHANNEL = "prune-channels:ratio=0.3:head_ratio=0.25"
CONFIGS = [
    ("FFN 30% + heads 25%", f"{CHANNEL}:criterion=l1"),
    ("FFN 30% + heads 25%", f"{CHANNEL}:criterion=l2"),
    ("FFN 30% + heads 25%", f"{CHANNEL}:criterion=mean_abs_act"),
    ("FFN 30% + heads 25%", f"{CHANNEL}:criterion=mean_abs_act:schedule=global"),
    ("FFN 30% + heads 25%", f"{CHANNEL}:criterion=mean_abs_act:schedule=global:compensate=true"),
    ("FFN 30% + heads 25%", f"{CHANNEL}:criterion=mean_abs_act:schedule=global:reconstruct=true"),
    ("heads 25% only", "prune-channels:ratio=0:head_ratio=0.25:criterion=mean_abs_act"),
    ("FFN 30% only", "prune-channels:ratio=0.3:head_ratio=0:criterion=mean_abs_act"),
    ("2 of 6 layers", "prune-layers:count=2:kind=transformer:criterion=change"),
    ("2 of 6 layers", "prune-layers:count=2:kind=transformer:criterion=output"),
]


def _session(proto):
    """A default onnxruntime CPU session (graph optimizations on, as deployed)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _latency_ms(session, feed, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", default="bench/out/prune_minilm.json")
    args = parser.parse_args()
    reference = model_path(seq_len=args.seq_len)
    calib = calibration_npz(Path(args.json).with_suffix(".calib.npz"), n=args.calib,
                            seq_len=args.seq_len)
    rows, protos = [], {"original": onnx.load(str(reference))}
    for label, spec in CONFIGS:
        model = ir.load_model(reference)
        start = time.perf_counter()
        report = passes.compress(model, spec, calibration=calib)
        seconds = time.perf_counter() - start
        proto = ir.to_onnx(model)
        cosine = cosine_to_reference(proto, reference)
        rows.append({"what": label, "spec": spec, "seconds": seconds,
                     "macs_kept": report.after["macs"] / report.before["macs"],
                     "params_kept": report.after["params"] / report.before["params"], **cosine})
        protos[spec] = proto
        print(f"{spec}: cosine {cosine['cosine_mean']:.4f} ({seconds:.0f}s)", file=sys.stderr)

    # Latency side by side: every model gets one session; rounds alternate between them.
    feed = {"input_ids": np.full((1, args.seq_len), 101, np.int64),
            "attention_mask": np.ones((1, args.seq_len), np.int64)}
    picked = {"original": protos["original"],
              "FFN 30% + heads 25%": protos[f"{CHANNEL}:criterion=mean_abs_act:schedule=global"],
              "2 of 6 layers": protos["prune-layers:count=2:kind=transformer:criterion=output"]}
    sessions = {name: _session(p) for name, p in picked.items()}
    for session in sessions.values():
        _latency_ms(session, feed, 5)
    samples = {name: [] for name in sessions}
    for _ in range(5):
        for name, session in sessions.items():
            samples[name].append(_latency_ms(session, feed, args.runs))
    latency = {name: float(np.median(v)) for name, v in samples.items()}

    print(f"MiniLM (seq_len {args.seq_len}, batch 1), calibration: {args.calib} passages\n")
    print("| removed | spec | MACs kept | params kept | cosine mean | cosine min | pass time (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | `{r['spec']}` | {r['macs_kept']:.3f} | {r['params_kept']:.3f} | "
              f"{r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['seconds']:.0f} |")
    print("\n| model (onnxruntime CPU, batch 1) | median latency (ms) | speedup |")
    print("|---|---:|---:|")
    for name, value in latency.items():
        print(f"| {name} | {value:.2f} | {latency['original'] / value:.2f}x |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "latency_ms": latency}, indent=1))


if __name__ == "__main__":
    main()
