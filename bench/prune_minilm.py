"""Structured pruning of MiniLM (all-MiniLM-L6-v2) without retraining: embedding cosine to the
original after removing FFN units and attention heads (prune-channels) or whole layers
(prune-layers), what each configuration kept per layer, and onnxruntime latency of the pruned
models next to the original (one process, rounds alternating between the models).

    python bench/prune_minilm.py [--seq-len 64] [--calib 256] [--corpus prose] [--jobs 1]
                                 [--only TEXT] [--json bench/out/prune_minilm.json]

Cosine: models.minilm.cosine_to_reference (24 held-out sentences, mean-pooled, vs the unpruned
model at the same seq_len), and the same on the ~150 lines of models.minilm.corpus that are held
out of calibration ("held-out"). Calibration: `--calib` texts of models.minilm.corpus
(calibration_npz(corpus=--corpus): "everyday" sentences or documentation "prose", both disjoint
from the evaluation sentences); data-aware passes use all of them (`samples=N` in the specs) and
leave padding tokens out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ir  # noqa: E402
import passes  # noqa: E402
from models.minilm import calibration_npz, cosine_to_reference, model_path  # noqa: E402
from models.minilm.corpus import held_out_everyday  # noqa: E402

CHANNEL = "prune-channels:ratio=0.3:head_ratio=0.25"
BOTH, HEADS, FFN, LAYERS = ("FFN 30% + heads 25%", "heads 25% only", "FFN 30% only",
                            "2 of 6 layers")
# (what is removed, spec, short name for the latency table or None). {n} = --calib.
OBS = "criterion=obs:samples={n}"
CONFIGS = [
    (BOTH, f"{CHANNEL}:criterion=l1", None),
    (BOTH, f"{CHANNEL}:criterion=mean_abs_act:schedule=global:samples={{n}}", None),
    (BOTH, f"{CHANNEL}:criterion=mean_abs_act:schedule=global:reconstruct=true:samples={{n}}",
     None),
    (BOTH, f"{CHANNEL}:{OBS}:sequential=false", None),
    (BOTH, f"{CHANNEL}:{OBS}:target=residual", None),
    (BOTH, f"{CHANNEL}:{OBS}:target=residual:schedule=global", "FFN 30% + heads 25%"),
    (BOTH, f"{CHANNEL}:{OBS}:target=residual:schedule=global:refit=all", None),
    (BOTH, f"{CHANNEL}:{OBS}:sequential=false:schedule=global", None),
    (BOTH, f"{CHANNEL}:{OBS}:sequential=false:schedule=output", None),
    (BOTH, f"{CHANNEL}:{OBS}:sequential=false:schedule=output:scan_outputs=sentence_embedding",
     None),
    (BOTH, f"{CHANNEL}:{OBS}:sequential=false:schedule=global:scan_outputs=sentence_embedding:"
     "output_metric=true", None),
    (BOTH, f"{CHANNEL}:{OBS}:sequential=false:schedule=output:scan_outputs=sentence_embedding:"
     "output_metric=true", None),
    (HEADS, f"prune-channels:ratio=0:head_ratio=0.25:{OBS}:target=residual", None),
    (FFN, f"prune-channels:ratio=0.3:head_ratio=0:{OBS}:target=residual", None),
    (LAYERS, "prune-layers:count=2:kind=transformer:criterion=change", None),
    (LAYERS, "prune-layers:count=2:kind=transformer:criterion=output", "2 of 6 layers"),
    (LAYERS, "prune-layers:count=2:kind=transformer:criterion=change:bridge=linear:"
     "bridge_samples={n}", "2 of 6 layers, linear bridge"),
]


def kept_summary(details: dict) -> str:
    """What each layer kept: heads and FFN units per layer (prune-channels), or the removed
    layers (prune-layers)."""
    if "removed" in details:
        return "removed " + ", ".join(details["removed"])
    groups = details.get("kept_per_group", [])
    heads = [g for g in groups if g["kind"] == "heads"]
    units = [g for g in groups if g["kind"] != "heads"]

    def listing(items):
        kept = [g["kept"] for g in items]
        if not kept:
            return "-"
        total = f"{sum(kept)}/{sum(g['size'] for g in items)}"
        return f"{kept[0]} each ({total})" if len(set(kept)) == 1 else \
            f"{' '.join(map(str, kept))} ({total})"
    return f"heads {listing(heads)}; FFN {listing(units)}"


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


def _run_config(spec_entry, reference: str, calib: str):
    """One table row (and the pruned model's bytes): run in a worker process."""
    label, spec, _ = spec_entry
    model = ir.load_model(reference)
    start = time.perf_counter()
    report = passes.compress(model, spec, calibration=calib)
    seconds = time.perf_counter() - start
    proto = ir.to_onnx(model)
    cosine = cosine_to_reference(proto, reference)
    held_out = cosine_to_reference(proto, reference, held_out_everyday())
    row = {"what": label, "spec": spec, "seconds": seconds,
           "kept": kept_summary(report.passes[-1].details),
           "macs_kept": report.after["macs"] / report.before["macs"],
           "params_kept": report.after["params"] / report.before["params"], **cosine,
           "held_out_mean": held_out["cosine_mean"], "held_out_min": held_out["cosine_min"]}
    print(f"{spec}: cosine {cosine['cosine_mean']:.4f} ({seconds:.0f}s) {row['kept']}",
          file=sys.stderr, flush=True)
    return row, proto.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--corpus", default="prose", choices=("prose", "everyday"),
                        help="calibration texts (models.minilm.calibration_npz)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--only", default="", help="run only specs containing this text")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run in parallel "
                        "(pass times then include the contention)")
    parser.add_argument("--json", default="bench/out/prune_minilm.json")
    args = parser.parse_args()
    reference = model_path(seq_len=args.seq_len)
    calib = calibration_npz(Path(args.json).with_suffix(".calib.npz"), n=args.calib,
                            seq_len=args.seq_len, corpus=args.corpus)
    specs = [(label, template.format(n=args.calib), short) for label, template, short in CONFIGS
             if args.only in template.format(n=args.calib)]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(_run_config, specs, [str(reference)] * len(specs),
                                [str(calib)] * len(specs)))
    rows = [row for row, _ in results]
    protos = {"original": onnx.load(str(reference))}
    protos.update({short: onnx.load_from_string(blob) for (_, _, short), (_, blob)
                   in zip(specs, results) if short})

    # Latency side by side: every model gets one session; rounds alternate between them.
    feed = {"input_ids": np.full((1, args.seq_len), 101, np.int64),
            "attention_mask": np.ones((1, args.seq_len), np.int64)}
    sessions = {name: _session(p) for name, p in protos.items()}
    for session in sessions.values():
        _latency_ms(session, feed, 5)
    samples = {name: [] for name in sessions}
    for _ in range(5):
        for name, session in sessions.items():
            samples[name].append(_latency_ms(session, feed, args.runs))
    latency = {name: float(np.median(v)) for name, v in samples.items()}

    print(f"MiniLM (seq_len {args.seq_len}, batch 1), calibration: {args.calib} {args.corpus} "
          "texts\n")
    print("| removed | spec | kept per layer | MACs kept | params kept | cosine mean | "
          "cosine min | held-out mean | held-out min | pass time (s) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | `{r['spec']}` | {r['kept']} | {r['macs_kept']:.3f} | "
              f"{r['params_kept']:.3f} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
              f"{r['held_out_mean']:.4f} | {r['held_out_min']:.4f} | {r['seconds']:.0f} |")
    print("\n| model (onnxruntime CPU, batch 1) | median latency (ms) | speedup |")
    print("|---|---:|---:|")
    for name, value in latency.items():
        print(f"| {name} | {value:.2f} | {latency['original'] / value:.2f}x |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "latency_ms": latency,
                                           "calibration": f"{args.calib} x {args.corpus}"},
                                          indent=1))


if __name__ == "__main__":
    main()
