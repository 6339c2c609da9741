"""Accuracy of the `sparsify` pass: digits top-1 and MiniLM embedding cosine.

    PYTHONPATH=. python bench/sparsify_accuracy.py [--skip-digits] [--skip-minilm]
        [--seq-len 128] [--samples 512] [--corpus prose] [--json bench/out/sparsify.json]
        [--configs LABEL ...] [--append] [--print-only]

Digits (models.digits): magnitude / wanda / sparsegpt x (80% in 4x1 blocks of 4 output channels x
1 input, 80% unstructured, 2:4) x (dense/1x1 layers only: `kernels=1x1`, Gemm/MatMul and 1x1
convs; or all layers incl. the 3x3 convs); first and last layers stay dense. Calibration: 128
training images; accuracy on the test split.
MiniLM (models.minilm): 50% unstructured and 2:4 per method, cosine of sentence embeddings to the
dense model (mean and worst of 24 sentences), ranking accuracy, plus SparseGPT rows with the
corrections (sequential, error-correcting targets, bias correction, exact refit, ADMM mask
search, OWL allocation, allocation from a scan of each layer's own error or of the model's
output error, the output metric from gradients, dampening, lazy-batch size) and the reference
rows (Q/K left dense, 40%); calibration: `--samples` texts of
`models.minilm.calibration_npz(corpus=...)` (default: 512 single sentences of English prose;
`--corpus everyday`: everyday English sentences; both disjoint from the evaluation sentences).
"held-out": the same cosine on the ~150 everyday lines that calibration never uses
(`models.minilm.corpus.held_out_everyday`). Every evaluation sentence fits in 32 tokens, so
`--seq-len 32` gives the same metric as 128 at a quarter of the cost (calibration sentences
longer than the sequence are truncated, though).
`--configs` runs only the MiniLM rows whose labels are given (exact labels, see MINILM_RUNS);
`--append` adds the new rows to the JSON file instead of replacing it (rows with the same label
are replaced); `--print-only` prints the tables of the JSON file without running anything.
Prints markdown tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ir  # noqa: E402
import passes  # noqa: E402
from passes.sparsify import sparsity_of  # noqa: E402

# (label, spec): every method x pattern (80% 4x1 blocks, 80% unstructured, 2:4) x scope
# (`kernels=1x1`: the Gemm and 1x1 convs only; or every layer incl. the 3x3 convs).
DIGITS_PATTERNS = [("80% 4x1", "sparsity=0.8:pattern=block:block=4x1"),
                   ("80% unstructured", "sparsity=0.8"),
                   ("2:4", "pattern=nm:nm=2of4")]
DIGITS_SCOPES = [("dense+1x1", ":kernels=1x1"), ("all layers incl. 3x3", "")]
DIGITS_RUNS = [(f"{method}, {pattern}, {scope}", f"sparsify:{spec}{kernels}:method={method}")
               for scope, kernels in DIGITS_SCOPES for pattern, spec in DIGITS_PATTERNS
               for method in ("magnitude", "wanda", "sparsegpt")]

QK = "exclude=*/q_matmul+*/k_matmul"
SGPT_50 = "sparsify:sparsity=0.5:method=sparsegpt"
SGPT_24 = "sparsify:pattern=nm:nm=2of4:method=sparsegpt"
EC = "error_correction=true"  # implies sequential
BIAS = "bias_correction=true"
REFIT = "refit=true"
ADMM = "admm=true"  # implies the refit
OWL = "schedule=owl"
SCAN = "schedule=output:scan_samples=128:scan_outputs=sentence_embedding"
FINE = "scan_grid=0.2+0.3+0.4+0.5+0.55+0.6+0.65+0.7+0.8+0.9"  # the first default grid
METRIC = "output_metric=full:scan_samples=128:scan_outputs=sentence_embedding"
# The same metric from gradients on more calibration texts (its estimate generalizes better).
METRIC_1024 = "output_metric=full:scan_samples=1024:scan_outputs=sentence_embedding"
METRIC_2048 = "output_metric=full:scan_samples=2048:scan_outputs=sentence_embedding"
RESIDUAL = "residual_correction=true"  # with EC / bias: aim at the residual Add's sum
REORDER = "reorder=true"  # N:M: channel groups and head entries reordered first
# Block-wise reconstruction after the masks (Adam, masks fixed) on 2048 of the calibration texts.
RECON = "reconstruct=true:reconstruct_samples=2048"
MINILM_RUNS = [  # the rows first, then the corrections, then the reference rows
    ("sparsegpt, 50% unstructured", SGPT_50),
    ("sparsegpt, 2:4", SGPT_24),
    ("sparsegpt, 50%, sequential", f"{SGPT_50}:sequential=true"),
    ("sparsegpt, 2:4, sequential", f"{SGPT_24}:sequential=true"),
    ("sparsegpt, 50%, error-correcting", f"{SGPT_50}:{EC}"),
    ("sparsegpt, 2:4, error-correcting", f"{SGPT_24}:{EC}"),
    ("sparsegpt, 50%, bias correction", f"{SGPT_50}:{BIAS}"),
    ("sparsegpt, 50%, error-correcting + bias", f"{SGPT_50}:{EC}:{BIAS}"),
    ("sparsegpt, 50%, refit", f"{SGPT_50}:{REFIT}"),
    ("sparsegpt, 50%, error-correcting + refit", f"{SGPT_50}:{EC}:{REFIT}"),
    ("sparsegpt, 2:4, error-correcting + refit", f"{SGPT_24}:{EC}:{REFIT}"),
    ("sparsegpt, 50% OWL", f"{SGPT_50}:{OWL}"),
    ("sparsegpt, 50% OWL, error-correcting + refit", f"{SGPT_50}:{OWL}:{EC}:{REFIT}"),
    ("sparsegpt, 50% layer-error scan", f"{SGPT_50}:schedule=sensitivity"),
    ("sparsegpt, 50% output scan", f"{SGPT_50}:{SCAN}"),
    ("sparsegpt, 50% output scan (10-point grid)", f"{SGPT_50}:{SCAN}:{FINE}"),
    ("sparsegpt, 50%, error-correcting + ADMM", f"{SGPT_50}:{EC}:{ADMM}"),
    ("sparsegpt, 2:4, error-correcting + ADMM", f"{SGPT_24}:{EC}:{ADMM}"),
    ("sparsegpt, 50% output scan, error-correcting + ADMM", f"{SGPT_50}:{SCAN}:{EC}:{ADMM}"),
    ("sparsegpt, 50% output scan (10-point grid), error-correcting + ADMM",
     f"{SGPT_50}:{SCAN}:{FINE}:{EC}:{ADMM}"),
    ("sparsegpt, 50% output scan (10-point grid, all outputs), error-correcting + ADMM",
     f"{SGPT_50}:schedule=output:scan_samples=128:{FINE}:{EC}:{ADMM}"),
    ("sparsegpt, 50%, output metric (diagonal)",
     f"{SGPT_50}:output_metric=diagonal:scan_samples=128:scan_outputs=sentence_embedding"),
    ("sparsegpt, 50%, error-correcting + ADMM, output metric", f"{SGPT_50}:{EC}:{ADMM}:{METRIC}"),
    ("sparsegpt, 2:4, error-correcting + ADMM, output metric", f"{SGPT_24}:{EC}:{ADMM}:{METRIC}"),
    ("sparsegpt, 2:4, error-correcting + ADMM, output metric, reordered",
     f"{SGPT_24}:{EC}:{ADMM}:{METRIC}:{REORDER}"),
    ("sparsegpt, 2:4, error-correcting + ADMM, output metric, reordered, residual + bias "
     "correction", f"{SGPT_24}:{EC}:{ADMM}:{METRIC}:{REORDER}:{BIAS}:{RESIDUAL}"),
    ("sparsegpt, 2:4, error-correcting + ADMM, output metric (1024 texts), reordered, "
     "residual + bias correction",
     f"{SGPT_24}:{EC}:{ADMM}:{METRIC_1024}:{REORDER}:{BIAS}:{RESIDUAL}"),
    ("sparsegpt, 2:4, error-correcting + ADMM, output metric (2048 texts), reordered, "
     "residual + bias correction",
     f"{SGPT_24}:{EC}:{ADMM}:{METRIC_2048}:{REORDER}:{BIAS}:{RESIDUAL}"),
    ("sparsegpt, 2:4, error-correcting + ADMM, output metric (1024 texts), reordered, "
     "residual + bias correction, block reconstruction",
     f"{SGPT_24}:{EC}:{ADMM}:{METRIC_1024}:{REORDER}:{BIAS}:{RESIDUAL}:{RECON}"),
    # Less dampening: with ~18k calibration texts the Hessians are well estimated.
    ("sparsegpt, 2:4, error-correcting + ADMM, output metric (1024 texts), reordered, "
     "residual + bias correction, damp 0.003",
     f"{SGPT_24}:{EC}:{ADMM}:{METRIC_1024}:{REORDER}:{BIAS}:{RESIDUAL}:damp=0.003"),
    ("sparsegpt, 2:4, error-correcting + bias", f"{SGPT_24}:{EC}:{BIAS}"),
    ("sparsegpt, 2:4, error-correcting + residual + bias", f"{SGPT_24}:{EC}:{BIAS}:{RESIDUAL}"),
    ("sparsegpt, 2:4, reordered", f"{SGPT_24}:{REORDER}"),
    ("wanda, 2:4, reordered", f"sparsify:pattern=nm:nm=2of4:method=wanda:{REORDER}"),
    ("sparsegpt, 50% output scan, error-correcting + ADMM, output metric",
     f"{SGPT_50}:{SCAN}:{EC}:{ADMM}:output_metric=full"),
    ("sparsegpt, 50%, damp 0.1", f"{SGPT_50}:damp=0.1"),
    ("sparsegpt, 50%, damp 0.001", f"{SGPT_50}:damp=0.001"),
    ("sparsegpt, 2:4, damp 0.1", f"{SGPT_24}:damp=0.1"),
    ("sparsegpt, 50%, one mask per layer", f"{SGPT_50}:block_columns=100000"),
    ("sparsegpt, 50%, lazy batch 32", f"{SGPT_50}:block_columns=32"),
    ("sparsegpt, 50%, lazy batch 8", f"{SGPT_50}:block_columns=8"),
    ("sparsegpt, 50%, error-correcting + refit, lazy batch 32",
     f"{SGPT_50}:{EC}:{REFIT}:block_columns=32"),
    ("sparsegpt, 50% unstructured, Q/K dense", f"{SGPT_50}:{QK}"),
    ("sparsegpt, 2:4, Q/K dense", f"{SGPT_24}:{QK}"),
    ("sparsegpt, 40% unstructured", "sparsify:sparsity=0.4:method=sparsegpt"),
    ("wanda, 50% unstructured", "sparsify:sparsity=0.5:method=wanda"),
    ("wanda, 2:4", "sparsify:pattern=nm:nm=2of4:method=wanda"),
    ("magnitude, 50% unstructured", "sparsify:sparsity=0.5:method=magnitude"),
    ("magnitude, 2:4", "sparsify:pattern=nm:nm=2of4:method=magnitude"),
]


def _zeros(proto: onnx.ModelProto, params: int) -> tuple[float, float]:
    """(fraction of zeros in sparsified weights, fraction of all parameters that are zero)."""
    table = sparsity_of(proto)
    model = ir.load_model(proto)
    sizes = {n: model.graph.initializers[n].const.size for n in table}
    zeros = sum(sizes[n] * (1 - table[n]["density"]) for n in table)
    return zeros / max(sum(sizes.values()), 1), zeros / params


def bench_digits(rows: list[dict]) -> None:
    from models import digits
    tmp = Path(tempfile.mkdtemp())
    calib = digits.calibration_npz(tmp / "digits_calib.npz", n=128)
    base = onnx.load(str(digits.MODEL_PATH))
    params = ir.graph_cost(ir.load_model(base).graph).summary()["params"]
    dense = digits.evaluate(base.SerializeToString(), split="test")
    rows.append({"model": "digits", "config": "dense", "top1": dense})
    for label, spec in DIGITS_RUNS:
        start = time.perf_counter()
        out = passes.apply(base, spec, calibration=calib)
        seconds = time.perf_counter() - start
        top1 = digits.evaluate(out.SerializeToString(), split="test")
        layer_zeros, model_zeros = _zeros(out, params)
        rows.append({"model": "digits", "config": label, "spec": spec, "top1": top1,
                     "drop": dense - top1, "zeros_in_sparsified": layer_zeros,
                     "zeros_of_all_params": model_zeros, "seconds": round(seconds, 1)})


def _zero_profile(proto: onnx.ModelProto) -> str:
    """Per-layer zero fractions of the sparsified weights: "50% in all 32" or "min-max"."""
    fractions = sorted(1 - info["density"] for info in sparsity_of(proto).values())
    if not fractions:
        return "-"
    low, high = fractions[0], fractions[-1]
    span = f"{low:.0%}" if round(low, 2) == round(high, 2) else f"{low:.0%}-{high:.0%}"
    return f"{span} in each of {len(fractions)}"


def bench_minilm(rows: list[dict], seq_len: int, samples: int, corpus: str,
                 json_path: "_Appender", configs: list[str] | None = None) -> None:
    from models.minilm import calibration_npz, cosine_to_reference, model_path, ranking_accuracy
    from models.minilm.corpus import held_out_everyday
    tmp = Path(tempfile.mkdtemp())
    calib = calibration_npz(tmp / "minilm_calib.npz", n=samples, seq_len=seq_len, corpus=corpus)
    path = model_path(seq_len=seq_len, batch=1)
    base = onnx.load(str(path))
    params = ir.graph_cost(ir.load_model(base).graph).summary()["params"]
    runs = MINILM_RUNS
    if configs:
        unknown = set(configs) - {label for label, _ in MINILM_RUNS}
        if unknown:
            raise SystemExit(f"unknown --configs: {sorted(unknown)}")
        runs = [(label, spec) for label, spec in MINILM_RUNS if label in configs]
    for label, spec in runs:
        spec = f"{spec}:samples={samples}"
        start = time.perf_counter()
        model = ir.load_model(base)
        report = passes.compress(model, spec, calibration=calib)
        out = ir.to_onnx(model)
        seconds = time.perf_counter() - start
        cosine = cosine_to_reference(out)
        held_out = cosine_to_reference(out, sentences=held_out_everyday())
        # Each layer's relative output error on the calibration data (before bias correction;
        # with error_correction, against the original model's output) and its sparsity.
        layers = {layer["node"]: [layer.get("output_error"), round(1 - layer["density"], 4)]
                  for layer in report.passes[0].details["layers"]}
        layer_zeros, model_zeros = _zeros(out, params)
        rows.append({"model": "minilm", "config": label, "spec": spec, "seq_len": seq_len,
                     "calibration": f"{samples} x {corpus}",
                     "cosine_mean": cosine["cosine_mean"], "cosine_min": cosine["cosine_min"],
                     "held_out_mean": held_out["cosine_mean"],
                     "held_out_min": held_out["cosine_min"],
                     "ranking": ranking_accuracy(out), "zeros_in_sparsified": layer_zeros,
                     "zeros_per_layer": _zero_profile(out),
                     "zeros_of_all_params": model_zeros, "seconds": round(seconds, 1),
                     "layers": layers})
        print(f"{label}: cosine {rows[-1]['cosine_mean']:.4f} ({seconds:.0f} s)", file=sys.stderr,
              flush=True)
        json_path.write_rows(rows)  # partial results survive a long run


def print_tables(rows: list[dict]) -> None:
    digits_rows = [r for r in rows if r["model"] == "digits"]
    if digits_rows:
        print("| digits config | top-1 % | drop (points) | zeros in sparsified layers | zeros of all params | s |")
        print("|---|---|---|---|---|---|")
        for r in digits_rows:
            if r["config"] == "dense":
                print(f"| dense | {r['top1']:.2f} | - | - | - | - |")
                continue
            print(f"| {r['config']} | {r['top1']:.2f} | {r['drop']:.2f} | "
                  f"{r['zeros_in_sparsified']:.1%} | {r['zeros_of_all_params']:.1%} | {r['seconds']} |")
        print()
    minilm_rows = [r for r in rows if r["model"] == "minilm"]
    if minilm_rows:
        first = minilm_rows[0]
        print(f"MiniLM seq_len {first['seq_len']}, calibration {first['calibration']}")
        print()
        print("| MiniLM config | cosine mean | cosine min | held-out mean | held-out min | ranking "
              "| zeros in sparsified layers | zeros per sparsified layer | zeros of all params "
              "| s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        order = {label: i for i, (label, _) in enumerate(MINILM_RUNS)}
        for r in sorted(minilm_rows, key=lambda r: order.get(r["config"], len(order))):
            held = " | ".join(f"{r[k]:.4f}" if k in r else "-"  # older rows lack it
                              for k in ("held_out_mean", "held_out_min"))
            print(f"| {r['config']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {held} | "
                  f"{r['ranking']:.3f} | {r['zeros_in_sparsified']:.1%} | "
                  f"{r.get('zeros_per_layer', '-')} | {r['zeros_of_all_params']:.1%} | "
                  f"{r['seconds']} |")


def _write(path: Path, rows: list[dict], kept: list[dict] | None = None) -> None:
    """Write `rows` (after the `kept` rows of an earlier run whose labels they do not repeat)."""
    labels = {(r["model"], r["config"]) for r in rows}
    earlier = [r for r in (kept or []) if (r["model"], r["config"]) not in labels]
    path.write_text(json.dumps(earlier + rows, indent=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--seq-len", type=int, default=128, help="MiniLM sequence length")
    parser.add_argument("--samples", type=int, default=512, help="MiniLM calibration texts")
    parser.add_argument("--corpus", default="prose",
                        choices=("prose", "passages", "sentences", "everyday"),
                        help="MiniLM calibration corpus (models.minilm.calibration_npz)")
    parser.add_argument("--json", default="bench/out/sparsify.json")
    parser.add_argument("--configs", nargs="+", help="MiniLM rows to run (labels)")
    parser.add_argument("--append", action="store_true",
                        help="keep the JSON file's other rows (same labels are replaced)")
    parser.add_argument("--print-only", action="store_true",
                        help="print the tables of the JSON file, run nothing")
    args = parser.parse_args(argv)
    json_path = Path(args.json)
    earlier = json.loads(json_path.read_text()) if json_path.is_file() and (
        args.append or args.print_only) else []
    if args.print_only:
        print_tables(earlier)
        return 0
    rows: list[dict] = []
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_digits:
        try:
            bench_digits(rows)
        except ImportError as exc:
            print(f"digits skipped: {exc}", file=sys.stderr)
    if not args.skip_minilm:
        bench_minilm(rows, args.seq_len, args.samples, args.corpus,
                     _Appender(json_path, earlier), args.configs)
    _write(json_path, rows, earlier)
    print_tables(json.loads(json_path.read_text()))
    return 0


class _Appender:
    """The JSON path as bench_minilm sees it: each write keeps the earlier rows."""

    def __init__(self, path: Path, earlier: list[dict]):
        self.path, self.earlier = path, earlier

    def write_rows(self, rows: list[dict]) -> None:
        _write(self.path, rows, self.earlier)


if __name__ == "__main__":
    sys.exit(main())
