"""Model level: the original model under onnxruntime fp32 vs our compressed TVM artifacts.

    PYTHONPATH=. python bench/model_level.py [--models digits,minilm] [--seq-len 128]
        [--threads 1,2] [--rounds 15] [--settings NAME,...] [--profile]
        [--json bench/out/model_level.json] [--md bench/results/model_level.md]
        [--png bench/results/model_level.png]

For each model, every pipeline setting of SETTINGS is run through the real pipeline
(`passes.api.compress`, the CLI's code path) and compiled for `host` with `compile_artifact`
into a fresh temporary directory (nothing is cached between runs, so a re-run always measures
the current passes and kernels). Then:

- accuracy of the artifact itself (not of the ONNX): digits top-1 on the 360 test images;
  MiniLM cosine of the artifact's sentence embeddings to onnxruntime's on the original model,
  on `models.minilm.EVAL_SENTENCES` (what `cosine_to_reference` measures for ONNX files);
- latency, for each thread count, in a child process started with TVM_NUM_THREADS=n and
  onnxruntime intra-op threads n: onnxruntime fp32 on the original model and every artifact,
  measured in interleaved rounds (each round runs every candidate `--inner` times back to back),
  median over rounds, so load changes hit all candidates alike;
- the kernel each weight layer got (from the artifact manifest: dense / bsr RxC / int8-dense /
  int8-bsr; layers without sparsity or quantization metadata use the default dense lowering);
- with --profile, the share of time per kernel of each artifact (a VM instrument, 1 thread), on
  a twin of the artifact built unmerged in bytecode mode (the shipped one runs its kernels as
  one merged call in compiled mode, which the instrument cannot see into).

Writes JSON, a markdown report and an accuracy-vs-latency plot (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

# (name, pipeline spec). Calibration comes from the model's own calibration data.
# Sparsity: our BSR/int8 kernels ran MatMul/Gemm and 1x1 stride-1 convs when this was written;
# digits is all 3x3 convs except the classifier Gemm and a strided 1x1 shortcut, so the main
# digits sparse setting targets those layers (kernels=1x1 plus the last Gemm); one setting also
# sparsifies the 3x3 convs (the kernel summary shows what the lowering does with them).
DIGITS_SPARSE = ("sparsify:method=sparsegpt:pattern=block:block=4x1:sparsity=0.7:kernels=1x1"
                 ":include_first_last=true")
PRUNE_HALF = "prune-channels:target_macs=0.5:reconstruct=true"
PRUNE_THIRD = "prune-channels:target_macs=0.35:criterion=l2:reconstruct=true"


def _minilm_sparse(sparsity: float, block: str) -> str:
    """SparseGPT block sparsity on every MiniLM linear layer but the first and last (the pass's
    default). int8 settings use 4x4 blocks: the AVX-512 VNNI int8 kernel multiplies quads of
    inputs (vpdpbusd), so narrower blocks would be re-blocked to 4x4 and lose most of their zero
    blocks (4x2 fits the AVX2 pair product)."""
    return (f"sparsify:method=sparsegpt:pattern=block:block={block}:sparsity={sparsity}"
            f":samples=32")


def _minilm_ffn(ratio: float) -> str:
    """FFN units removed by structured OBS (no retraining), heads kept."""
    return (f"prune-channels:ratio={ratio}:head_ratio=0:criterion=obs:sequential=false"
            f":samples=128")


SETTINGS = {
    "digits": [
        ("cleanup", "cleanup"),
        ("prune 0.5", f"cleanup,{PRUNE_HALF}"),
        ("prune 0.35 l2", f"cleanup,{PRUNE_THIRD}"),
        ("prune 0.3", "cleanup,prune-channels:target_macs=0.3:reconstruct=true"),
        ("int8", "cleanup,quantize"),
        ("prune 0.5 + int8", f"cleanup,{PRUNE_HALF},quantize"),
        ("prune 0.35 l2 + int8", f"cleanup,{PRUNE_THIRD},quantize"),
        ("prune 0.3 + int8", "cleanup,prune-channels:target_macs=0.3:reconstruct=true,quantize"),
        ("prune 0.5 + sparse", f"cleanup,{PRUNE_HALF},{DIGITS_SPARSE}"),
        ("prune 0.35 l2 + sparse + int8", f"cleanup,{PRUNE_THIRD},{DIGITS_SPARSE},quantize"),
        # every conv but the first and last, 3x3 included: what a 3x3 sparse kernel would need
        ("sparse 60% 4x1, 3x3 convs too",
         "cleanup,sparsify:method=sparsegpt:pattern=block:block=4x1:sparsity=0.6"),
    ],
    "minilm": [
        ("cleanup", "cleanup"),
        ("int8", "cleanup,quantize"),
        ("FFN 10% obs + int8", f"cleanup,{_minilm_ffn(0.1)},quantize"),
        ("FFN 15% obs + int8", f"cleanup,{_minilm_ffn(0.15)},quantize"),
        # int8 attention: scores and probabilities x values on the VNNI kernel too
        ("int8 + int8 attention", "cleanup,quantize:activation_matmuls=true"),
        ("FFN 10% obs + int8 + int8 attention",
         f"cleanup,{_minilm_ffn(0.1)},quantize:activation_matmuls=true"),
        ("sparse 80% 4x1", f"cleanup,{_minilm_sparse(0.8, '4x1')}"),
        ("sparse 60% 4x4 + int8", f"cleanup,{_minilm_sparse(0.6, '4x4')},quantize"),
        ("sparse 80% 4x4 + int8", f"cleanup,{_minilm_sparse(0.8, '4x4')},quantize"),
        ("2 layers + heads 25% + sparse 80% 4x4 + int8",
         "cleanup,prune-layers:count=2:kind=transformer,"
         "prune-channels:ratio=0:head_ratio=0.25:criterion=mean_abs_act,"
         f"{_minilm_sparse(0.8, '4x4')},quantize"),
    ],
}
GOALS = {"digits": "top-1 drop <= 1 point", "minilm": "cosine mean >= 0.97"}
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


# -- models -------------------------------------------------------------------------------------
def _original_path(name: str, seq_len: int) -> Path:
    if name == "digits":
        from models.digits import MODEL_PATH
        return Path(MODEL_PATH)
    from models.minilm import model_path
    return Path(model_path(seq_len))


def _calibration(name: str, seq_len: int, workdir: Path):
    if name == "digits":
        from models.digits import load_splits
        return {"input": load_splits().x_calib}
    from models.minilm import calibration_npz
    return str(calibration_npz(workdir / "minilm_calib.npz", n=32, seq_len=seq_len))


def _eval_inputs(name: str, seq_len: int, input_names: list[str]) -> list[list[np.ndarray]]:
    """Per sample, the artifact's inputs in manifest order (batch 1)."""
    if name == "digits":
        from models.digits import load_splits
        return [[x[None]] for x in load_splits().x_test]
    from models.minilm.evaluate import EVAL_SENTENCES
    from models.minilm.tokenizer import tokenize
    feeds = tokenize(EVAL_SENTENCES, seq_len)
    return [[feeds[n][i:i + 1] for n in input_names] for i in range(len(EVAL_SENTENCES))]


def _output_index(manifest: dict, name: str) -> int:
    names = [o["name"] for o in manifest["outputs"]]
    return names.index("sentence_embedding") if name == "minilm" else 0


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def artifact_accuracy(name: str, art_dir: Path, seq_len: int) -> dict:
    """Accuracy of the compiled artifact, run sample by sample in the TVM VM."""
    from backends.tvm.run import load_artifact
    artifact = load_artifact(art_dir)
    index = _output_index(artifact.manifest, name)
    samples = _eval_inputs(name, seq_len, artifact.input_names)
    outputs = np.concatenate([artifact.run(*inputs)[index] for inputs in samples])
    if name == "digits":
        from models.digits import load_splits
        return {"top1": float((outputs.argmax(1) == load_splits().y_test).mean() * 100)}
    from models.minilm import embed
    from models.minilm.evaluate import EVAL_SENTENCES
    reference = embed(_original_path(name, seq_len), EVAL_SENTENCES)
    cos = _row_cosine(outputs, reference)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def compressed_onnx_accuracy(name: str, proto) -> dict:
    """The same metric on the compressed ONNX model under onnxruntime: a cross-check that the
    artifact computes what the passes produced."""
    if name == "digits":
        from models.digits import evaluate
        return {"top1": evaluate(proto)}
    from models.minilm import cosine_to_reference
    cos = cosine_to_reference(proto)
    return {"cosine_mean": cos["cosine_mean"], "cosine_min": cos["cosine_min"]}


def original_accuracy(name: str, seq_len: int) -> dict:
    if name == "digits":
        from models.digits import evaluate
        return {"top1": evaluate(_original_path(name, seq_len))}
    return {"cosine_mean": 1.0, "cosine_min": 1.0}


# -- building -----------------------------------------------------------------------------------
def _has_constant_weight(node) -> bool:
    """A weight layer: its second input is a constant, directly or behind DequantizeLinear
    (MiniLM's attention MatMuls multiply two activations and are not counted)."""
    weight = node.input(1)
    if weight is None:
        return False
    if weight.producer is not None and weight.producer.op_type == "DequantizeLinear":
        weight = weight.producer.inputs[0]
    return weight.is_constant


def kernel_summary(manifest: dict, model) -> dict:
    """Counts of weight layers per kernel: what the dispatcher recorded, and "dense" for weight
    layers it never saw (no sparsity/quant metadata: the default lowering)."""
    counts = Counter()
    recorded = 0
    for meta in manifest.get("weight_meta", {}).values():
        kernel = meta.get("kernel")
        if not kernel:
            continue
        recorded += 1
        label = kernel["kernel"]
        if label in ("bsr", "int8-bsr"):
            label += f" {kernel['block'][0]}x{kernel['block'][1]}"
        counts[label] += 1
    total = sum(1 for node in model.graph.nodes
                if node.op_type in WEIGHT_OPS and _has_constant_weight(node))
    if total > recorded:
        counts["dense (default lowering)"] += total - recorded
    return dict(counts)


def build_setting(name: str, label: str, spec: str, seq_len: int, workdir: Path,
                  profile: bool = False) -> dict:
    """Run the pipeline and compile the artifact; returns its row (no timings yet)."""
    import ir
    from backends.tvm.build import compile_artifact
    from passes.api import compress

    model = ir.load_model(_original_path(name, seq_len))
    started = time.monotonic()
    report = compress(model, spec, calibration=_calibration(name, seq_len, workdir))
    pass_s = time.monotonic() - started
    art_dir = workdir / f"{name}-{len(list(workdir.iterdir()))}"
    started = time.monotonic()
    manifest = compile_artifact(model, "host", art_dir, pipeline=report.pipeline)
    compile_s = time.monotonic() - started
    if profile:  # one interpreted VM call per kernel: what the instrument can time
        compile_artifact(model, "host", art_dir.with_name(art_dir.name + "-profile"),
                         pipeline=report.pipeline, merge_calls=False, exec_mode="bytecode")
    onnx_accuracy = compressed_onnx_accuracy(name, ir.to_onnx(model))
    return {"model": name, "setting": label, "spec": spec, "artifact": str(art_dir),
            "onnx_accuracy": onnx_accuracy,
            "pass_s": round(pass_s, 1), "compile_s": round(compile_s, 1),
            "macs": report.after.get("macs"), "macs_before": report.before.get("macs"),
            "kernels": kernel_summary(manifest, model), "notes": report.notes}


# -- timing (child process, one thread count) ---------------------------------------------------
def _bench_inputs(name: str, seq_len: int, input_names: list[str]) -> dict[str, np.ndarray]:
    return dict(zip(input_names, _eval_inputs(name, seq_len, input_names)[0]))


def measure(job: dict) -> dict:
    """In this process (TVM_NUM_THREADS already set): ORT on the original and every artifact,
    interleaved rounds; returns {"ort": [ms per round], artifact: [ms per round]}."""
    import onnxruntime as ort
    from backends.tvm.run import load_artifact

    threads, name, seq_len = job["threads"], job["model"], job["seq_len"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(_original_path(name, seq_len)), options,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = _bench_inputs(name, seq_len, names)
    runners = {"ort": lambda: session.run(None, feeds)}
    for path in job["artifacts"]:
        artifact = load_artifact(path)
        tensors = [artifact._tvm.runtime.tensor(a, artifact.device)
                   for a in artifact.check_inputs([feeds[n] for n in artifact.input_names])]
        runners[path] = (lambda a=artifact, t=tensors: a.run_tensors(t))
    for run in runners.values():          # warm-up (first-call allocation, page faults)
        run()
        run()
    times = {key: [] for key in runners}
    for _ in range(job["rounds"]):
        for key, run in runners.items():
            start = time.perf_counter()
            for _ in range(job["inner"]):
                run()
            times[key].append((time.perf_counter() - start) * 1e3 / job["inner"])
    return times


def measure_in_child(job: dict) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": str(job["threads"]),
           "OMP_NUM_THREADS": str(job["threads"])}
    result = subprocess.run([sys.executable, __file__, "--measure", json.dumps(job)],
                            env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"timing child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _short_kernel_name(symbol: str) -> str:
    """Fused TIR names list every fused op; the first three say what the kernel is."""
    parts = symbol.split("_")
    return symbol if len(parts) <= 4 else "_".join(parts[:4]) + "_..."


def profile(art_dir: str, name: str, seq_len: int, runs: int = 25,
            top: int = 6) -> list[tuple[str, float]]:
    """(kernel, % of the time spent in VM calls) for the `top` most expensive kernels, timed by a
    VM instrument around every call (TVM 0.27's Relax VM has no profiler of its own). Per kernel,
    the median over `runs` runs, so a run disturbed by other jobs does not dominate; the
    instrument's overhead lands in every call alike: read the shares, not absolute times."""
    from backends.tvm.run import load_artifact

    artifact = load_artifact(art_dir)
    inputs = _bench_inputs(name, seq_len, artifact.input_names)
    tensors = [artifact._tvm.runtime.tensor(a, artifact.device)
               for a in artifact.check_inputs([inputs[n] for n in artifact.input_names])]
    artifact.run_tensors(tensors)
    this_run, started = Counter(), {}

    def instrument(func, symbol, before_run, ret_value, *args):
        if before_run:
            started[symbol] = time.perf_counter()
        else:
            this_run[_short_kernel_name(str(symbol))] += time.perf_counter() - started.pop(symbol)
        return 0  # VMInstrumentReturnKind.NO_OP: run the call normally

    artifact.vm.set_instrument(instrument)
    per_run = []
    for _ in range(runs):
        this_run.clear()
        artifact.run_tensors(tensors)
        per_run.append(dict(this_run))
    kernels = {k for run in per_run for k in run}
    median = {k: float(np.median([run.get(k, 0.0) for run in per_run])) for k in kernels}
    total = sum(median.values()) or 1.0
    return [(k, round(100 * v / total, 1))
            for k, v in sorted(median.items(), key=lambda kv: -kv[1])[:top]]


# -- report -------------------------------------------------------------------------------------
def _accuracy_text(row: dict) -> str:
    """The artifact's accuracy, and the compressed ONNX model's under onnxruntime when known."""
    def one(acc):
        if "top1" in acc:
            return f"{acc['top1']:.2f}%"
        return f"{acc['cosine_mean']:.4f} (min {acc['cosine_min']:.4f})"
    text = one(row["accuracy"])
    if row.get("onnx_accuracy"):
        text += f"; ONNX {one(row['onnx_accuracy'])}"
    return text


def _meets_accuracy(name: str, row: dict, original: dict) -> bool:
    if name == "digits":
        return original["top1"] - row["accuracy"]["top1"] <= 1.0
    return row["accuracy"]["cosine_mean"] >= 0.97


def write_table(rows: list[dict], originals: dict, threads: list[int]) -> str:
    head = ("| model | setting | accuracy: artifact; compressed ONNX | "
            + " | ".join(f"ms @{t}T (speedup vs ORT)" for t in threads)
            + " | MACs kept (dense count) | kernels (weight layers) |")
    lines = [head, "|" + "---|" * (5 + len(threads))]
    for name, original in originals.items():
        ort = " | ".join(f"{original['ms'][str(t)]:.3f} (1.00x)" for t in threads)
        lines.append(f"| {name} | **onnxruntime fp32, original** | "
                     f"{_accuracy_text({'accuracy': original['accuracy']})} | {ort} | 1.00 | - |")
        for row in (r for r in rows if r["model"] == name):
            cells = " | ".join(f"{row['ms'][str(t)]:.3f} ({row['speedup'][str(t)]:.2f}x)"
                               for t in threads)
            kept = row["macs"] / row["macs_before"] if row.get("macs_before") else float("nan")
            kernels = ", ".join(f"{k}: {v}" for k, v in sorted(row["kernels"].items()))
            lines.append(f"| {name} | `{row['setting']}` | {_accuracy_text(row)} | {cells} | "
                         f"{kept:.2f} | {kernels} |")
    return "\n".join(lines)


def goal_statements(rows: list[dict], originals: dict, threads: list[int]) -> list[str]:
    out = []
    for name, original in originals.items():
        best = None
        for row in (r for r in rows if r["model"] == name):
            if not _meets_accuracy(name, row, original["accuracy"]):
                continue
            for t in threads:
                if best is None or row["speedup"][str(t)] > best[0]:
                    best = (row["speedup"][str(t)], row["setting"], t)
        fastest = max(((r["speedup"][str(t)], r["setting"], t)
                       for r in rows if r["model"] == name for t in threads), default=None)
        met = best is not None and best[0] >= 3.0
        text = (f"- **{name}: >= 3x goal {'MET' if met else 'NOT met'}** ({GOALS[name]}). ")
        text += (f"Best speedup within the accuracy budget: {best[0]:.2f}x (`{best[1]}`, "
                 f"{best[2]} thread(s)). " if best else "No setting stays within the accuracy "
                                                        "budget. ")
        if fastest:
            text += f"Fastest setting at any accuracy: {fastest[0]:.2f}x (`{fastest[1]}`, " \
                    f"{fastest[2]} thread(s))."
        out.append(text)
    return out


def plot(rows: list[dict], originals: dict, threads: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    names = list(originals)
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.8), squeeze=False)
    markers = {t: m for t, m in zip(threads, "os^D")}
    colors = {t: f"C{i}" for i, t in enumerate(threads)}
    for ax, name in zip(axes[0], names):
        key = "top1" if name == "digits" else "cosine_mean"
        for t in threads:
            pts = [(r["ms"][str(t)], r["accuracy"][key], r["setting"])
                   for r in rows if r["model"] == name]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[t],
                       color=colors[t], label=f"TVM artifacts, {t} thread(s)")
            if t == threads[0]:  # one set of labels keeps the plot readable
                for x, y, label in pts:
                    ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
            ort_ms = originals[name]["ms"][str(t)]
            ax.scatter([ort_ms], [originals[name]["accuracy"][key]], marker="*", s=180,
                       color=colors[t], edgecolors="black",
                       label=f"onnxruntime fp32 original, {t} thread(s)")
            ax.axvline(ort_ms / 3, ls=":", lw=0.8, color=colors[t])
        ax.set_xscale("log")
        # ticks at 1, 2, 5 x 10^k with plain numbers; default minor labels overlap here
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("latency, ms (log); dotted: 3x faster than onnxruntime at that thread count")
        ax.set_ylabel("test top-1 %" if name == "digits" else "cosine to original")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.machine()}"


def write_markdown(path: Path, command: str, rows, originals, threads, loads, profiles,
                   seq_len, png) -> None:
    lines = ["# Model level: original under onnxruntime fp32 vs compressed TVM artifacts", "",
             f"Machine: {_machine()}; load average {loads[0]} at the start, {loads[1]} at the "
             f"end (other jobs share the cores: absolute ms are noisy, the ratios come from "
             f"interleaved rounds in one process per thread count).", "",
             "Command:", "", f"    {command}", "",
             f"MiniLM at seq_len {seq_len}, batch 1. Latency: median over rounds of the "
             f"per-run time; each thread count in its own process (TVM_NUM_THREADS = "
             f"onnxruntime intra-op threads). Accuracy is measured on the artifact (TVM VM), "
             f"digits: top-1 on the 360 test images; MiniLM: cosine of sentence embeddings to "
             f"onnxruntime on the original model (24 evaluation sentences).", "",
             write_table(rows, originals, threads), "",
             f"![accuracy vs latency]({Path(png).name})", "", "## Goal (>= 3x faster than "
             "onnxruntime fp32 within the accuracy budget)", ""]
    lines += goal_statements(rows, originals, threads)
    if profiles:
        lines += ["", "## Where the time goes", "",
                  "Share of the time spent in VM calls per kernel (an instrument times every "
                  "call of an unmerged, bytecode-mode twin of each artifact; 1 thread; per "
                  "kernel the median over 25 runs). Kernels with the same "
                  "shapes are one function: `int8_layer0_ffn_up_...` is the FFN-up of every "
                  "layer.", ""]
        for key, top in profiles.items():
            lines.append(f"- {key}: " + ", ".join(f"{k} {v}%" for k, v in top))
    lines += ["", "Settings (pipeline specs):", ""]
    for row in rows:
        lines.append(f"- {row['model']} `{row['setting']}`: `{row['spec']}` "
                     f"(passes {row['pass_s']} s, compile {row['compile_s']} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def render(json_path: Path, md: Path, png: Path) -> int:
    """The markdown report and the plot from a previous run's JSON."""
    data = json.loads(json_path.read_text())
    threads = data.get("threads") or sorted(
        {int(t) for o in data["originals"].values() for t in o["ms"]})
    write_markdown(md, data["command"], data["rows"], data["originals"], threads, data["load"],
                   data["profiles"], data.get("seq_len", 128), png)
    plot(data["rows"], data["originals"], threads, png)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--settings", default="", help="only these setting names (comma list)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", default="digits=50,minilm=1",
                        help="runs per candidate per round, per model")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", default="bench/out/model_level.json")
    parser.add_argument("--md", default="bench/results/model_level.md")
    parser.add_argument("--png", default="bench/results/model_level.png")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite --md and --png from --json without measuring")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # child mode: a JSON job
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return 0
    if args.render_only:
        return render(Path(args.json), Path(args.md), Path(args.png))
    threads = [int(t) for t in args.threads.split(",")]
    from backends.tvm.run import set_threads
    set_threads(1)  # this process only compiles, checks accuracy and profiles (1 thread)
    inner = {k: int(v) for k, v in (item.split("=") for item in args.inner.split(","))}
    only = {s.strip() for s in args.settings.split(",") if s.strip()}
    loads = [", ".join(f"{v:.1f}" for v in os.getloadavg())]
    rows, originals, profiles = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="model_level.") as tmp:
        workdir = Path(tmp)
        for name in args.models.split(","):
            model_rows = []
            for label, spec in SETTINGS[name]:
                if only and label not in only:
                    continue
                print(f"# {name} / {label}: building ...", file=sys.stderr, flush=True)
                row = build_setting(name, label, spec, args.seq_len, workdir, args.profile)
                row["accuracy"] = artifact_accuracy(name, Path(row["artifact"]), args.seq_len)
                print(f"#   {row['accuracy']} (ONNX {row['onnx_accuracy']}) "
                      f"kernels {row['kernels']} (passes {row['pass_s']} s, compile {row['compile_s']} s)",
                      file=sys.stderr, flush=True)
                model_rows.append(row)
            originals[name] = {"accuracy": original_accuracy(name, args.seq_len), "ms": {}}
            for t in threads:
                job = {"model": name, "seq_len": args.seq_len, "threads": t,
                       "rounds": args.rounds, "inner": inner.get(name, 1),
                       "artifacts": [r["artifact"] for r in model_rows]}
                times = measure_in_child(job)
                ort_ms = float(np.median(times["ort"]))
                originals[name]["ms"][str(t)] = ort_ms
                for row in model_rows:
                    ms = float(np.median(times[row["artifact"]]))
                    row.setdefault("ms", {})[str(t)] = ms
                    row.setdefault("speedup", {})[str(t)] = ort_ms / ms
                print(f"# {name} @{t} threads: ort {ort_ms:.3f} ms; " + "; ".join(
                    f"{r['setting']} {r['ms'][str(t)]:.3f}" for r in model_rows),
                    file=sys.stderr, flush=True)
            if args.profile:
                for row in model_rows:
                    profiles[f"{name} `{row['setting']}`"] = profile(
                        row["artifact"] + "-profile", name, args.seq_len)
            rows += model_rows
    loads.append(", ".join(f"{v:.1f}" for v in os.getloadavg()))
    command = "PYTHONPATH=. python bench/model_level.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    for row in rows:
        row.pop("artifact")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"command": command, "machine": _machine(),
                                           "load": loads, "rows": rows, "threads": threads,
                                           "seq_len": args.seq_len, "originals": originals,
                                           "profiles": profiles}, indent=2))
    write_markdown(Path(args.md), command, rows, originals, threads, loads, profiles,
                   args.seq_len, args.png)
    plot(rows, originals, threads, Path(args.png))
    print(write_table(rows, originals, threads))
    print("\n".join(goal_statements(rows, originals, threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
