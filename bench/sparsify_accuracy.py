"""Accuracy of the `sparsify` pass: digits top-1 and MiniLM embedding cosine.

    PYTHONPATH=. python bench/sparsify_accuracy.py [--skip-digits] [--skip-minilm]
                                                   [--json bench/out/sparsify.json]

Digits (models.digits): 80% sparsity in 4x1 blocks (4 output channels x 1 input) on the
dense/1x1 layers (`kernels=1x1`: Gemm/MatMul and 1x1 convs; first and last layers stay dense),
per method; plus unstructured 80% and a row with the 3x3 convs sparsified too. Calibration: 128
training images; accuracy on the test split.
MiniLM (models.minilm, seq_len 128): 50% unstructured and 2:4 per method, cosine of sentence
embeddings to the dense model (mean and worst of 24 sentences), ranking accuracy; calibration:
the 48 calibration sentences of models.minilm (disjoint from the evaluation sentences).
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

DIGITS_RUNS = [
    # (label, spec)
    ("magnitude, 4x1, dense+1x1", "sparsify:sparsity=0.8:pattern=block:block=4x1:kernels=1x1:method=magnitude"),
    ("wanda, 4x1, dense+1x1", "sparsify:sparsity=0.8:pattern=block:block=4x1:kernels=1x1:method=wanda"),
    ("sparsegpt, 4x1, dense+1x1", "sparsify:sparsity=0.8:pattern=block:block=4x1:kernels=1x1:method=sparsegpt"),
    ("sparsegpt, unstructured, dense+1x1", "sparsify:sparsity=0.8:kernels=1x1:method=sparsegpt"),
    ("wanda, 4x1, all layers incl. 3x3", "sparsify:sparsity=0.8:pattern=block:block=4x1:method=wanda"),
    ("sparsegpt, 4x1, all layers incl. 3x3", "sparsify:sparsity=0.8:pattern=block:block=4x1:method=sparsegpt"),
]

MINILM_RUNS = [
    ("magnitude, 50% unstructured", "sparsify:sparsity=0.5:method=magnitude"),
    ("wanda, 50% unstructured", "sparsify:sparsity=0.5:method=wanda"),
    ("sparsegpt, 50% unstructured", "sparsify:sparsity=0.5:method=sparsegpt"),
    ("sparsegpt, 50% sensitivity schedule", "sparsify:sparsity=0.5:method=sparsegpt:schedule=sensitivity"),
    ("magnitude, 2:4", "sparsify:pattern=nm:nm=2of4:method=magnitude"),
    ("wanda, 2:4", "sparsify:pattern=nm:nm=2of4:method=wanda"),
    ("sparsegpt, 2:4", "sparsify:pattern=nm:nm=2of4:method=sparsegpt"),
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


def bench_minilm(rows: list[dict]) -> None:
    from models.minilm import calibration_npz, cosine_to_reference, model_path, ranking_accuracy
    tmp = Path(tempfile.mkdtemp())
    calib = calibration_npz(tmp / "minilm_calib.npz", n=48)
    path = model_path(seq_len=128, batch=1)
    base = onnx.load(str(path))
    params = ir.graph_cost(ir.load_model(base).graph).summary()["params"]
    for label, spec in MINILM_RUNS:
        start = time.perf_counter()
        out = passes.apply(base, spec + ":samples=48", calibration=calib)
        seconds = time.perf_counter() - start
        cosine = cosine_to_reference(out)
        layer_zeros, model_zeros = _zeros(out, params)
        rows.append({"model": "minilm", "config": label, "spec": spec + ":samples=48",
                     "cosine_mean": cosine["cosine_mean"], "cosine_min": cosine["cosine_min"],
                     "ranking": ranking_accuracy(out), "zeros_in_sparsified": layer_zeros,
                     "zeros_of_all_params": model_zeros, "seconds": round(seconds, 1)})


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
    parser.add_argument("--json", default="bench/out/sparsify.json")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    if not args.skip_digits:
        try:
            bench_digits(rows)
        except ImportError as exc:
            print(f"digits skipped: {exc}", file=sys.stderr)
    if not args.skip_minilm:
        bench_minilm(rows)
    print_tables(rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
