"""int8 post-training quantization: our `quantize` pass vs onnxruntime's `quantize_static`.

    PYTHONPATH=. python bench/quantize_compare.py [--skip-digits] [--skip-minilm] [--runs N]
                                                  [--mixed-precision] [--json PATH]

Both quantizers get the same calibration samples (digits: the 128 calibration images of
`models.digits`; MiniLM: the 48 calibration sentences of `models.minilm`, disjoint from the
evaluation sentences) and produce QDQ ONNX with per-channel symmetric int8 weights and uint8
asymmetric activations. onnxruntime's side: `quant_pre_process` (shape inference + its graph
optimizations; noted if it fails) then `quantize_static(QuantFormat.QDQ, per_channel=True,
activation_type=QUInt8, weight_type=QInt8)` with a CalibrationDataReader over our feeds, for
its MinMax (default), Percentile and Entropy calibrators on its default op types, and MinMax
restricted to the op types we quantize (Conv, ConvTranspose, MatMul, Gemm). Ours: `cleanup,quantize:...` specs.

Measured per model: accuracy (digits top-1 on the test split and the relative L2 error of the
test logits vs the float model, ||q - f|| / ||f||; MiniLM cosine of sentence
embeddings to the float model, mean and worst of 24 sentences, and ranking accuracy), file size
(serialized bytes) and onnxruntime CPU latency: default graph optimizations (so onnxruntime
fuses QDQ groups into int8 kernels where it can), 1 intra-op thread (the machine is shared),
median of `--runs` single-sample runs, all models of a table timed in the same process,
interleaved in rounds. Prints markdown tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ir  # noqa: E402
import passes  # noqa: E402
from passes.calibration import CalibrationSet  # noqa: E402

DIGITS_OURS = [
    ("ours minmax", "cleanup,quantize:method=minmax"),
    ("ours percentile", "cleanup,quantize:method=percentile"),
    ("ours entropy", "cleanup,quantize:method=entropy"),
    ("ours mse", "cleanup,quantize:method=mse"),
    ("ours mse + bias correction", "cleanup,quantize:method=mse:bias_correction=true"),
    ("ours mse, int8 activations", "cleanup,quantize:method=mse:activations=int8"),
    ("ours mse + equalize", "cleanup,quantize:method=mse:equalize=true"),
    ("ours mse, max_drop=0.05", "cleanup,quantize:method=mse:max_drop=0.05"),
    ("ours minmax, outputs=true", "cleanup,quantize:method=minmax:outputs=true"),
]
MINILM_OURS = [
    ("ours minmax", "cleanup,quantize:method=minmax"),
    ("ours percentile", "cleanup,quantize:method=percentile"),
    ("ours entropy", "cleanup,quantize:method=entropy"),
    ("ours mse", "cleanup,quantize:method=mse"),
    ("ours minmax, outputs=true", "cleanup,quantize:method=minmax:outputs=true"),
]
# Mixed precision on MiniLM measures one trial model per layer (~40): slow on a shared 2-core
# machine (over 15 minutes), so only with --mixed-precision.
MINILM_MIXED = [("ours mse, max_drop=0.5", "cleanup,quantize:method=mse:max_drop=0.5")]
# (calibrator, op types): onnxruntime's defaults quantize every op type it knows (Add, Softmax,
# Gather, LayerNormalization, ...); the last row limits it to the op types our pass quantizes.
COMPUTE_OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm"]
ORT_CONFIGS = [("MinMax", None), ("Percentile", None), ("Entropy", None), ("MinMax", COMPUTE_OPS)]


def _ort_label(method: str, ops) -> str:
    return f"onnxruntime {method}" + (", compute ops only" if ops else "")


# -- onnxruntime's quantizer ------------------------------------------------------------------------
class _FeedReader:
    """onnxruntime.quantization.CalibrationDataReader over a fixed list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def ort_quantize(float_path: Path, feeds: list[dict], method: str, workdir: Path,
                 notes: list[str], ops: list[str] | None = None) -> bytes:
    """onnxruntime's static QDQ quantization (after quant_pre_process when it works)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader_type = type("Reader", (_FeedReader, CalibrationDataReader), {})
    source = float_path
    pre = workdir / f"{float_path.stem}.pre.onnx"
    if not pre.exists():
        try:
            quant_pre_process(str(float_path), str(pre))
        except Exception as exc:  # reported, then quantize the float model as is
            notes.append(f"quant_pre_process failed on {float_path.name}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    if pre.exists():
        source = pre
    out = workdir / f"{float_path.stem}.ort_{method}{'_ops' if ops else ''}.onnx"
    extra = {"CalibMovingAverage": False}
    quantize_static(str(source), str(out), reader_type(feeds),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), extra_options=extra,
                    op_types_to_quantize=ops)
    return out.read_bytes()


# -- ours -------------------------------------------------------------------------------------------
def ours_quantize(float_bytes: bytes, spec: str, calibration: CalibrationSet) -> tuple[bytes, float, dict]:
    model = ir.load_model(float_bytes)
    start = time.perf_counter()
    report = passes.compress(model, spec, calibration=calibration)
    seconds = time.perf_counter() - start
    details = next((p.details for p in report.passes if p.name == "quantize"), {})
    return ir.to_onnx(model).SerializeToString(), seconds, details


def _int8_layers(details: dict) -> str:
    """"int8/all" layers: the mixed-precision report lists every layer, "layers" the int8 ones."""
    layers = (details.get("mixed_precision") or {}).get("layers") or details.get("layers") or []
    if isinstance(layers, list) and layers and isinstance(layers[0], dict):
        kept = [r for r in layers if str(r.get("precision", r.get("dtype", "int8"))) == "float"]
        return f"{len(layers) - len(kept)}/{len(layers)}"
    return ""


# -- latency ----------------------------------------------------------------------------------------
def latency_ms(models: dict[str, bytes], feed: dict[str, np.ndarray], runs: int,
               rounds: int = 5) -> dict[str, float]:
    """Median single-run latency per model; models are timed in interleaved rounds."""
    import onnxruntime as ort
    sessions = {}
    for label, data in models.items():
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        sessions[label] = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {label: [] for label in sessions}
    per_round = max(runs // rounds, 1)
    for session in sessions.values():
        for _ in range(3):
            session.run(None, feed)
    for _ in range(rounds):
        for label, session in sessions.items():
            for _ in range(per_round):
                start = time.perf_counter()
                session.run(None, feed)
                times[label].append(time.perf_counter() - start)
    return {label: float(np.median(t) * 1000) for label, t in times.items()}


def _mb(data: bytes) -> float:
    return len(data) / 1e6


# -- digits -----------------------------------------------------------------------------------------
def bench_digits(workdir: Path, runs: int, notes: list[str]) -> list[dict]:
    from models.digits import MODEL_PATH, evaluate, predict
    from models.digits.data import INPUT_NAME, load_splits

    float_bytes = Path(MODEL_PATH).read_bytes()
    splits = load_splits()
    calibration = CalibrationSet({INPUT_NAME: splits.x_calib.astype(np.float32)})
    feeds = calibration.feeds(ir.load_model(float_bytes))
    models = {"float": float_bytes}
    rows = [{"model": "float", "spec": "", "seconds": 0.0, "int8_layers": ""}]
    for label, spec in DIGITS_OURS:
        data, seconds, details = ours_quantize(float_bytes, spec, calibration)
        models[label] = data
        rows.append({"model": label, "spec": spec, "seconds": round(seconds, 2),
                     "int8_layers": _int8_layers(details)})
    for method, ops in ORT_CONFIGS:
        label = _ort_label(method, ops)
        start = time.perf_counter()
        models[label] = ort_quantize(Path(MODEL_PATH), feeds, method, workdir, notes, ops)
        rows.append({"model": label, "spec": f"quantize_static {method} ops={ops or 'default'}",
                     "seconds": round(time.perf_counter() - start, 2), "int8_layers": ""})
    latency = latency_ms(models, feeds[0], runs)
    float_top1 = evaluate(float_bytes)
    float_logits = predict(float_bytes, splits.x_test)
    for row in rows:
        data = models[row["model"]]
        row["top1"] = round(evaluate(data), 2)
        # Top-1 saturates on this small test split; the logits' error separates the methods.
        logits = predict(data, splits.x_test)
        row["logit_error"] = round(float(np.linalg.norm(logits - float_logits)
                                         / np.linalg.norm(float_logits)), 5)
        row["drop"] = round(float_top1 - row["top1"], 2)
        row["size_mb"] = round(_mb(data), 4)
        row["latency_ms"] = round(latency[row["model"]], 4)
    return rows


# -- MiniLM -----------------------------------------------------------------------------------------
def bench_minilm(workdir: Path, runs: int, notes: list[str], seq_len: int = 128,
                 samples: int = 48, mixed: bool = False) -> list[dict]:
    from models.minilm import calibration_npz, cosine_to_reference, model_path, ranking_accuracy

    float_path = Path(model_path(seq_len=seq_len, batch=1))
    float_bytes = float_path.read_bytes()
    npz = calibration_npz(workdir / "minilm.calib.npz", n=samples, seq_len=seq_len)
    float_ir = ir.load_model(float_bytes)
    calibration = CalibrationSet.from_npz(npz, float_ir)
    feeds = calibration.feeds(float_ir)
    models = {"float": float_bytes}
    rows = [{"model": "float", "spec": "", "seconds": 0.0, "int8_layers": ""}]
    for label, spec in MINILM_OURS + (MINILM_MIXED if mixed else []):
        data, seconds, details = ours_quantize(float_bytes, spec, calibration)
        models[label] = data
        rows.append({"model": label, "spec": spec, "seconds": round(seconds, 2),
                     "int8_layers": _int8_layers(details)})
        print(f"  {label}: {seconds:.1f}s", file=sys.stderr)
    for method, ops in ORT_CONFIGS:
        label = _ort_label(method, ops)
        start = time.perf_counter()
        try:
            models[label] = ort_quantize(float_path, feeds, method, workdir, notes, ops)
        except Exception as exc:
            notes.append(f"onnxruntime {method} on MiniLM failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160]}")
            continue
        rows.append({"model": label, "spec": f"quantize_static {method} ops={ops or 'default'}",
                     "seconds": round(time.perf_counter() - start, 2), "int8_layers": ""})
        print(f"  {label}: {rows[-1]['seconds']:.1f}s", file=sys.stderr)
    latency = latency_ms(models, feeds[0], runs)
    for row in rows:
        data = models[row["model"]]
        cosine = cosine_to_reference(data, float_bytes)
        row["cosine_mean"] = round(cosine["cosine_mean"], 5)
        row["cosine_min"] = round(cosine["cosine_min"], 5)
        row["ranking"] = round(ranking_accuracy(data), 3)
        row["size_mb"] = round(_mb(data), 2)
        row["latency_ms"] = round(latency[row["model"]], 3)
    return rows


# -- output -----------------------------------------------------------------------------------------
def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "")) for _, key in columns) + " |")
    return "\n".join(lines)


DIGITS_COLUMNS = [("digits model", "model"), ("top-1 %", "top1"), ("drop (points)", "drop"),
                  ("logits rel. error", "logit_error"),
                  ("size MB", "size_mb"), ("ORT latency ms", "latency_ms"),
                  ("int8 layers", "int8_layers"), ("quantize s", "seconds")]
MINILM_COLUMNS = [("MiniLM model", "model"), ("cosine mean", "cosine_mean"),
                  ("cosine min", "cosine_min"), ("ranking", "ranking"), ("size MB", "size_mb"),
                  ("ORT latency ms", "latency_ms"), ("int8 layers", "int8_layers"),
                  ("quantize s", "seconds")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--runs", type=int, default=0,
                        help="timed runs per model (default: 500 digits, 50 MiniLM)")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="also run max_drop on MiniLM (slow)")
    parser.add_argument("--json", default="bench/out/quantize.json")
    args = parser.parse_args(argv)
    results: dict = {"notes": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not args.skip_digits:
            results["digits"] = bench_digits(workdir, args.runs or 500, results["notes"])
            print(markdown(results["digits"], DIGITS_COLUMNS) + "\n")
        if not args.skip_minilm:
            results["minilm"] = bench_minilm(workdir, args.runs or 50, results["notes"],
                                             mixed=args.mixed_precision)
            print(markdown(results["minilm"], MINILM_COLUMNS) + "\n")
    for note in results["notes"]:
        print(f"note: {note}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
