"""prune-layers on the digits model: test top-1 after removing 1 or 2 of its 3 identity-shortcut
residual blocks, per criterion, and with prune-channels' mean compensation for comparison.

    python bench/prune_layers_digits.py [--json bench/out/prune_layers_digits.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ir  # noqa: E402
import passes  # noqa: E402
from models import digits  # noqa: E402

SPECS = [
    "cleanup,prune-layers:count=1:criterion=change",
    "cleanup,prune-layers:count=1:criterion=output",
    "cleanup,prune-layers:count=2:criterion=change",
    "cleanup,prune-layers:count=2:criterion=output",
    "cleanup,prune-channels:target_macs=0.5",
    "cleanup,prune-channels:target_macs=0.5:compensate=true",
    "cleanup,prune-channels:target_macs=0.5:criterion=mean_abs_act:compensate=true",
    "cleanup,prune-channels:target_macs=0.5:schedule=sensitivity",
    "cleanup,prune-channels:target_macs=0.5:schedule=sensitivity:reconstruct=true",
    "cleanup,prune-channels:target_macs=0.5:criterion=obs:sequential=false",
    "cleanup,prune-channels:target_macs=0.5:criterion=obs",
    "cleanup,prune-channels:target_macs=0.35:criterion=obs",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="bench/out/prune_layers_digits.json")
    args = parser.parse_args()
    calib = digits.calibration_npz(Path(args.json).with_suffix(".calib.npz"))
    rows = []
    for spec in SPECS:
        model = ir.load_model(digits.MODEL_PATH)
        report = passes.compress(model, spec, calibration=calib)
        removed = report.passes[-1].details.get("removed")
        rows.append({"spec": spec, "removed": removed,
                     "macs_kept": report.after["macs"] / report.before["macs"],
                     "top1": digits.evaluate(ir.to_onnx(model).SerializeToString())})
    print(f"Digits model, test top-1 of the original: {digits.evaluate(digits.MODEL_PATH):.2f}%\n")
    print("| spec | blocks removed | MACs kept | top-1 |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| `{r['spec']}` | {', '.join(r['removed'] or []) or '-'} | "
              f"{r['macs_kept']:.3f} | {r['top1']:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
