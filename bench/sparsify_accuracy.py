"""Accuracy of the `sparsify` pass: digits top-1 and MiniLM embedding cosine.

    PYTHONPATH=. python bench/sparsify_accuracy.py [--skip-digits] [--skip-minilm]
        [--seq-len 128] [--samples 512] [--corpus prose] [--json bench/out/sparsify.json]

Digits (models.digits): magnitude / wanda / sparsegpt x (80% in 4x1 blocks of 4 output channels x
1 input, 80% unstructured, 2:4) x (dense/1x1 layers only: `kernels=1x1`, Gemm/MatMul and 1x1
convs; or all layers incl. the 3x3 convs); first and last layers stay dense. Calibration: 128
training images; accuracy on the test split.
MiniLM (models.minilm): 50% unstructured and 2:4 per method, cosine of sentence embeddings to the
dense model (mean and worst of 24 sentences), ranking accuracy, plus SparseGPT rows that show what
closes the gap (Q/K projections left dense, 40% sparsity); calibration: `--samples` texts of
`models.minilm.calibration_npz(corpus=...)` (default: 512 single sentences of English prose,
disjoint from the evaluation sentences). Every evaluation sentence fits in 32 tokens, so
`--seq-len 32` gives the same metric as 128 at a quarter of the cost (calibration sentences longer
than the sequence are truncated, though).
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
MINILM_RUNS = [  # the rows first, then what closes the gap, then the baselines
    ("sparsegpt, 50% unstructured", "sparsify:sparsity=0.5:method=sparsegpt"),
    ("sparsegpt, 2:4", "sparsify:pattern=nm:nm=2of4:method=sparsegpt"),
    ("sparsegpt, 50% unstructured, Q/K dense", f"sparsify:sparsity=0.5:method=sparsegpt:{QK}"),
    ("sparsegpt, 2:4, Q/K dense", f"sparsify:pattern=nm:nm=2of4:method=sparsegpt:{QK}"),
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


def bench_minilm(rows: list[dict], seq_len: int, samples: int, corpus: str,
                 json_path: Path) -> None:
    from models.minilm import calibration_npz, cosine_to_reference, model_path, ranking_accuracy
    tmp = Path(tempfile.mkdtemp())
    calib = calibration_npz(tmp / "minilm_calib.npz", n=samples, seq_len=seq_len, corpus=corpus)
    path = model_path(seq_len=seq_len, batch=1)
    base = onnx.load(str(path))
    params = ir.graph_cost(ir.load_model(base).graph).summary()["params"]
    for label, spec in MINILM_RUNS:
        spec = f"{spec}:samples={samples}"
        start = time.perf_counter()
        out = passes.apply(base, spec, calibration=calib)
        seconds = time.perf_counter() - start
        cosine = cosine_to_reference(out)
        layer_zeros, model_zeros = _zeros(out, params)
        rows.append({"model": "minilm", "config": label, "spec": spec, "seq_len": seq_len,
                     "calibration": f"{samples} x {corpus}",
                     "cosine_mean": cosine["cosine_mean"], "cosine_min": cosine["cosine_min"],
                     "ranking": ranking_accuracy(out), "zeros_in_sparsified": layer_zeros,
                     "zeros_of_all_params": model_zeros, "seconds": round(seconds, 1)})
        print(f"{label}: cosine {rows[-1]['cosine_mean']:.4f} ({seconds:.0f} s)", file=sys.stderr,
              flush=True)
        json_path.write_text(json.dumps(rows, indent=2))  # partial results survive a long run


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
        print("| MiniLM config | cosine mean | cosine min | ranking | zeros in sparsified layers | zeros of all params | s |")
        print("|---|---|---|---|---|---|---|")
        for r in minilm_rows:
            print(f"| {r['config']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
                  f"{r['ranking']:.3f} | {r['zeros_in_sparsified']:.1%} | "
                  f"{r['zeros_of_all_params']:.1%} | {r['seconds']} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--seq-len", type=int, default=128, help="MiniLM sequence length")
    parser.add_argument("--samples", type=int, default=512, help="MiniLM calibration texts")
    parser.add_argument("--corpus", default="prose", choices=("prose", "passages", "sentences"),
                        help="MiniLM calibration corpus (models.minilm.calibration_npz)")
    parser.add_argument("--json", default="bench/out/sparsify.json")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_digits:
        try:
            bench_digits(rows)
        except ImportError as exc:
            print(f"digits skipped: {exc}", file=sys.stderr)
    if not args.skip_minilm:
        bench_minilm(rows, args.seq_len, args.samples, args.corpus, Path(args.json))
    print_tables(rows)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
