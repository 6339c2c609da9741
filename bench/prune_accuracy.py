"""Pruning benchmark: accuracy vs MACs kept for each criterion, with and without reconstruction,
and onnxruntime latency of the pruned models next to the original (one run, side by side).

    python bench/prune_accuracy.py [--json bench/out/prune.json] [--plot bench/results/prune_curve.png]

Digits model: top-1 on the held-back test split (360 images), calibration = 128 training images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ir  # noqa: E402
import passes  # noqa: E402
from models import digits  # noqa: E402
from passes.calibration import make_session  # noqa: E402

CRITERIA = ("l1", "l2", "bn_scale", "mean_abs_act", "apoz")
TARGETS = (0.8, 0.65, 0.5, 0.35)


def _latency_ms(proto_bytes: bytes, runs: int = 300) -> float:
    import onnx
    session = make_session(onnx.load_from_string(proto_bytes))
    x = digits.load_splits().x_test[:1]
    for _ in range(20):
        session.run(None, {"input": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"input": x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="bench/out/prune.json")
    parser.add_argument("--plot", default="bench/results/prune_curve.png")
    args = parser.parse_args()
    calib = digits.calibration_npz(Path(args.json).with_suffix(".calib.npz"))
    base_top1 = digits.evaluate(digits.MODEL_PATH)
    rows = []
    for criterion in CRITERIA:
        for target in TARGETS:
            for reconstruct in (False, True):
                model = ir.load_model(digits.MODEL_PATH)
                # bn_scale needs the BatchNormalization nodes, so it runs before BN folding.
                cleanup = "cleanup:fold_batchnorm=false" if criterion == "bn_scale" else "cleanup"
                spec = (f"{cleanup},prune-channels:target_macs={target}:criterion={criterion}"
                        f":reconstruct={str(reconstruct).lower()}")
                report = passes.compress(model, spec, calibration=calib)
                data = ir.to_onnx(model).SerializeToString()
                rows.append({"criterion": criterion, "target_macs": target,
                             "reconstruct": reconstruct,
                             "macs_kept": report.after["macs"] / report.before["macs"],
                             "params_kept": report.after["params"] / report.before["params"],
                             "top1": digits.evaluate(data), "bytes": data})
                print(f"{criterion:13} target={target:.2f} reconstruct={reconstruct!s:5} "
                      f"macs_kept={rows[-1]['macs_kept']:.3f} top1={rows[-1]['top1']:.2f}",
                      file=sys.stderr)
    # Latency: the original and the half-MACs models, measured alternately in one run.
    latency_models = {"original (fp32)": digits.MODEL_PATH.read_bytes()}
    for row in rows:
        if row["criterion"] == "l1" and row["reconstruct"] and row["target_macs"] in (0.5, 0.35):
            latency_models[f"pruned to {row['macs_kept']:.0%} MACs"] = row["bytes"]
    latencies = {name: [] for name in latency_models}
    for _ in range(3):
        for name, data in latency_models.items():
            latencies[name].append(_latency_ms(data))
    latency = {name: float(np.median(v)) for name, v in latencies.items()}

    print(f"Digits model, test top-1 of the original: {base_top1:.2f}%\n")
    print("| criterion | target MACs | MACs kept | params kept | top-1 without reconstruction "
          "| top-1 with reconstruction |")
    print("|---|---:|---:|---:|---:|---:|")
    for criterion in CRITERIA:
        for target in TARGETS:
            pair = [r for r in rows if r["criterion"] == criterion and r["target_macs"] == target]
            plain, refit = sorted(pair, key=lambda r: r["reconstruct"])
            print(f"| {criterion} | {target:.2f} | {refit['macs_kept']:.3f} | "
                  f"{refit['params_kept']:.3f} | {plain['top1']:.2f} | {refit['top1']:.2f} |")
    print("\n| model (onnxruntime, batch 1) | median latency (ms) | speedup |")
    print("|---|---:|---:|")
    reference = latency["original (fp32)"]
    for name, value in latency.items():
        print(f"| {name} | {value:.4f} | {reference / value:.2f}x |")

    for row in rows:
        row.pop("bytes")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"original_top1": base_top1, "rows": rows,
                                           "latency_ms": latency}, indent=1))
    _plot(rows, base_top1, args.plot)


def _plot(rows, base_top1, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, reconstruct in zip(axes, (False, True)):
        for criterion in CRITERIA:
            points = sorted((r["macs_kept"], r["top1"]) for r in rows
                            if r["criterion"] == criterion and r["reconstruct"] == reconstruct)
            ax.plot(*zip(*points), marker="o", label=criterion)
        ax.axhline(base_top1, color="gray", linestyle="--", label="original")
        ax.set_title(f"digits: prune-channels, reconstruct={reconstruct}")
        ax.set_xlabel("fraction of MACs kept")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 (%)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
