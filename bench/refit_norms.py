"""Refitting normalization affines after compression (`refit-norms`): MiniLM embedding cosine
before and after, for the configurations of issues #3 (structured pruning) and #4 (SparseGPT).

    PYTHONPATH=. python bench/refit_norms.py [--configs LABEL ...] [--variants NAME ...]
        [--samples 512] [--json bench/out/refit_norms.json] [--print-only]

Configurations (CONFIGS): the best #3 pruning (30% FFN units + 25% heads, criterion=obs,
seq_len 64), the plain #4 SparseGPT runs (50% unstructured, 2:4; seq_len 32), magnitude and
Wanda 50% (no reconstruction, for contrast) and, only with --configs (30-60 min each), the #4
SparseGPT runs with error_correction=true:refit=true.
Each configuration compresses all-MiniLM-L6-v2 with its spec (the same calibration as
bench/prune_minilm.py and bench/sparsify_accuracy.py: `--samples` single prose sentences of
models.minilm.calibration_npz(corpus="prose") at the configuration's seq_len, disjoint from the
evaluation sentences; data-aware passes use all of them). The compressed model is cached under
bench/out/refit_norms/ (delete it to recompress). Then each variant refits a copy of it against
the uncompressed model on the same calibration data and the cosine is measured again:
- `norms`: LayerNormalization scale/bias, one layer at a time in graph order (the pass default);
- `norms, one pass`: every LayerNormalization fitted from one capture (sequential=false);
- `norms + linear`: also a per-channel scale and shift of each compressed MatMul + bias layer's
  output, all in graph order (linear=true).
Cosine: models.minilm.cosine_to_reference (mean and worst of 24 held-out sentences vs the
uncompressed model at the same seq_len). Prints a markdown table and writes JSON (rows are
written after each measurement, so partial results survive; same label+variant is replaced).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ir  # noqa: E402
import passes  # noqa: E402
from models.minilm import calibration_npz, cosine_to_reference, model_path  # noqa: E402
from passes.calibration import CalibrationSet  # noqa: E402
from passes.recover import refit_norms  # noqa: E402

SGPT = "sparsify:method=sparsegpt"
# (label, issue, seq_len, spec); {n} = --samples.
CONFIGS = [
    ("FFN 30% + heads 25%, obs global", "#3", 64,
     ("prune-channels:ratio=0.3:head_ratio=0.25:criterion=obs:samples={n}:sequential=false:"
      "schedule=global")),
    ("sparsegpt 50%", "#4", 32, f"{SGPT}:sparsity=0.5:samples={{n}}"),
    ("sparsegpt 2:4", "#4", 32, f"{SGPT}:pattern=nm:nm=2of4:samples={{n}}"),
    # Compressions without reconstruction, for contrast: their error has more affine drift.
    ("magnitude 50%", "#4", 32, "sparsify:method=magnitude:sparsity=0.5"),
    ("wanda 50%", "#4", 32, "sparsify:method=wanda:sparsity=0.5:samples={n}"),
    ("sparsegpt 50%, error-correcting + refit", "#4", 32,
     f"{SGPT}:sparsity=0.5:error_correction=true:refit=true:samples={{n}}"),
    ("sparsegpt 2:4, error-correcting + refit", "#4", 32,
     f"{SGPT}:pattern=nm:nm=2of4:error_correction=true:refit=true:samples={{n}}"),
]
DEFAULT_CONFIGS = ["FFN 30% + heads 25%, obs global", "sparsegpt 50%", "sparsegpt 2:4",
                   "magnitude 50%", "wanda 50%"]


def _refit(model, reference, calibration, samples: int, **options):
    return refit_norms(model, reference, calibration, samples=samples, **options)


# name -> function(model, reference, calibration, samples) refitting `model` in place.
VARIANTS = {
    "norms": lambda m, r, c, n: _refit(m, r, c, n, sequential=True),
    "norms, one pass": lambda m, r, c, n: _refit(m, r, c, n, sequential=False),
    "norms + linear": lambda m, r, c, n: _refit(m, r, c, n, sequential=True, linear=True),
}


def _slug(label: str, samples: int) -> str:
    keep = "".join(ch if ch.isalnum() else "_" for ch in label.lower())
    return f"{keep}_{samples}"


def compressed_model(label: str, seq_len: int, spec: str, calib: Path, samples: int,
                     cache: Path) -> tuple[Path, float | None]:
    """The compressed model's path (cached) and the compression time (None when cached)."""
    path = cache / f"{_slug(label, samples)}.onnx"
    if path.is_file():
        return path, None
    model = ir.load_model(str(model_path(seq_len=seq_len, batch=1)))
    start = time.perf_counter()
    passes.compress(model, spec, calibration=str(calib))
    seconds = time.perf_counter() - start
    ir.save_model(model, path)
    return path, seconds


def run_config(label: str, issue: str, seq_len: int, spec: str, samples: int,
               variants: list[str], rows: list[dict], out: Path) -> None:
    cache = out.parent / "refit_norms"
    cache.mkdir(parents=True, exist_ok=True)
    calib = calibration_npz(cache / f"calib_{seq_len}_{samples}.npz", n=samples,
                            seq_len=seq_len, corpus="prose")
    reference_path = model_path(seq_len=seq_len, batch=1)
    spec = spec.format(n=samples)
    path, seconds = compressed_model(label, seq_len, spec, calib, samples, cache)
    base = {"issue": issue, "config": label, "spec": spec, "seq_len": seq_len,
            "calibration": f"{samples} x prose"}
    cosine = cosine_to_reference(str(path), str(reference_path))
    _put(rows, {**base, "variant": "none", "cosine_mean": cosine["cosine_mean"],
                "cosine_min": cosine["cosine_min"], "compress_seconds": seconds}, out)
    reference = passes.prepare(ir.load_model(str(reference_path)))
    for variant in variants:
        model = passes.prepare(ir.load_model(str(path)))
        calibration = CalibrationSet.from_npz(calib, model)
        start = time.perf_counter()
        details = VARIANTS[variant](model, reference, calibration, samples)
        refit_seconds = time.perf_counter() - start
        cosine = cosine_to_reference(ir.to_onnx(model), str(reference_path))
        _put(rows, {**base, "variant": variant, "cosine_mean": cosine["cosine_mean"],
                    "cosine_min": cosine["cosine_min"], "refit_seconds": round(refit_seconds, 1),
                    "layers": details.get("layers", [])}, out)


def _put(rows: list[dict], row: dict, out: Path) -> None:
    """Add or replace the row (same config and variant) and write the JSON file."""
    rows[:] = [r for r in rows if (r["config"], r["variant"]) != (row["config"], row["variant"])]
    rows.append(row)
    out.write_text(json.dumps(rows, indent=2))
    print(f"{row['config']} / {row['variant']}: cosine {row['cosine_mean']:.4f}",
          file=sys.stderr, flush=True)


def print_table(rows: list[dict]) -> None:
    print("| issue | compression | seq_len | refit | cosine mean | cosine min | change | "
          "refit s |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    order = {label: i for i, (label, *_rest) in enumerate(CONFIGS)}
    variant_order = {name: i for i, name in enumerate(["none", *VARIANTS])}
    rows = sorted(rows, key=lambda r: (order.get(r["config"], 99),
                                       variant_order.get(r["variant"], 99)))
    plain = {r["config"]: r["cosine_mean"] for r in rows if r["variant"] == "none"}
    for r in rows:
        change = "" if r["variant"] == "none" or r["config"] not in plain else \
            f"{r['cosine_mean'] - plain[r['config']]:+.4f}"
        print(f"| {r['issue']} | {r['config']} | {r['seq_len']} | {r['variant']} | "
              f"{r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {change} | "
              f"{r.get('refit_seconds', '')} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="configuration labels (see CONFIGS)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=list(VARIANTS))
    parser.add_argument("--samples", type=int, default=512, help="calibration sentences")
    parser.add_argument("--json", default="bench/out/refit_norms.json")
    parser.add_argument("--print-only", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.is_file() else []
    if not args.print_only:
        known = {label: rest for label, *rest in CONFIGS}
        unknown = [c for c in args.configs if c not in known]
        if unknown:
            raise SystemExit(f"unknown --configs: {unknown} (known: {list(known)})")
        for label in args.configs:
            issue, seq_len, spec = known[label]
            run_config(label, issue, seq_len, spec, args.samples, args.variants, rows, out)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
