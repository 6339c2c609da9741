"""Kernel-level benchmark: our BSR kernel vs our dense kernel vs onnxruntime dense, side by side.

Shapes: MiniLM FFN (128 tokens, 384->1536 and 1536->384) and ResNet-50 1x1 convs (batch 1).
For each, random block-sparse weights at 50/70/80/90/95% block sparsity (blocks R x C, default
4x1 = the sparsify pass's default) are timed with our BSR kernel, next to our dense kernel
(`dense_matmul_kn`, same schedule style) and onnxruntime's dense MatMul on the same problem.
Our kernels take K-major activations X[K, P] (the 1x1-conv layout; for MatMul the dispatcher
transposes X, which is not timed here - it is a kernel-level comparison). onnxruntime runs
Y^T = W @ X^T as a MatMul of [N, K] x [K, P] so all three compute the same product.
Interleaved rounds (all kernels of a shape measured in turn, so load from other processes hits
them alike); the table uses the best round of each (the shared build machine's load makes
medians swing 2x), the JSON has medians too. Ideal = 1 / block density; "% ideal" =
(speedup over our dense) / ideal.

    python bench/sparse_kernels.py [--block 4x1] [--rounds 7] [--threads 2] [--json PATH]
    python bench/sparse_kernels.py --int8 --shapes 0,1     # int8 kernels vs float32
    python bench/sparse_kernels.py --conv                  # kxk convs: im2col + BSR vs conv2d
    python bench/sparse_kernels.py --conv --int8           # QDQ kxk convs: im2col + int8
    python bench/sparse_kernels.py --tuned --trials 32     # MetaSchedule-tuned ELL vs ours

--conv times whole lowered single-Conv modules (Relax VM, `lower_model` + `build_module`): TVM's
conv2d with our default schedule (dense) against im2col + our BSR kernel and against im2col +
the blocked-ELL kernel untuned (default schedule), 4x1 blocks; it sets the "im2col" break-even
of `backends/tvm/kernels/choice.py`. --tuned tunes the ELL kernel with MetaSchedule on one
MiniLM FFN shape at 90% and times it next to our BSR kernel and the untuned ELL kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [  # name, N (out), K (in), P (tokens or H*W)
    ("minilm ffn up 384->1536, 128 tok", 1536, 384, 128),
    ("minilm ffn down 1536->384, 128 tok", 384, 1536, 128),
    ("resnet 1x1 64->256 @56x56", 256, 64, 56 * 56),
    ("resnet 1x1 1024->256 @14x14", 256, 1024, 14 * 14),
    ("resnet 1x1 512->2048 @7x7", 2048, 512, 7 * 7),
]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]


def _block_sparse(rng, n, k, block, sparsity):
    r, c = block
    nb, kb = -(-n // r), -(-k // c)
    keep = rng.random((nb, kb)) >= sparsity
    mask = np.repeat(np.repeat(keep, r, 0), c, 1)[:n, :k]
    return (rng.standard_normal((n, k)) * mask).astype(np.float32)


def _ort_matmul(w, x, threads):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    n, k = w.shape
    p = x.shape[1]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["w", "x"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, p])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, p])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feeds = {"x": x}

    def run(number):
        start = time.perf_counter()
        for _ in range(number):
            session.run(None, feeds)
        return (time.perf_counter() - start) / number
    ref = session.run(None, feeds)[0]
    return run, ref



def _interleaved_rounds(timers: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per run of each timer, `rounds` samples each, measured in interleaved rounds (one
    sample of every timer per round) so load changes hit all kernels alike; each timer's repeat
    count is calibrated first so one sample takes ~5 ms."""
    numbers = {key: max(1, int(0.005 / max(run(1), 1e-6))) for key, run in timers.items()}
    samples = {key: [] for key in timers}
    for _ in range(rounds):
        for key, run in timers.items():
            samples[key].append(run(numbers[key]))
    return samples

def _tvm_timer(func, args, target):
    import tvm
    lib = tvm.compile(tvm.IRModule({"main": func}), tvm.target.Target(target))
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    result = tensors[-1].numpy()

    def run(number):
        evaluator = lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=1)
        return float(evaluator(*tensors).mean)
    return run, result


def bench_shape(name, n, k, p, block, rounds, threads, target, rng):
    from backends.tvm.kernels import bsr_matmul_kn, cpu_schedule, dense_matmul_kn, to_bsr
    schedule = cpu_schedule(target)
    x = rng.standard_normal((1, k, p)).astype(np.float32)
    bias = np.zeros(n, np.float32)
    y = np.zeros((1, n, p), np.float32)
    w_dense = rng.standard_normal((n, k)).astype(np.float32)
    timers = {"ours dense": _tvm_timer(dense_matmul_kn(n, k, 1, p, schedule=schedule),
                                       [x, w_dense, bias, y], target)[0],
              "ort dense": _ort_matmul(w_dense, x[0], threads)[0]}
    densities = {}
    for sparsity in SPARSITIES:
        w = _block_sparse(rng, n, k, block, sparsity)
        bsr = to_bsr(w, block)
        run, out = _tvm_timer(bsr_matmul_kn(bsr, 1, p, schedule=schedule),
                              [x, bsr.data, bsr.indices, bsr.indptr, bias, y.copy()], target)
        np.testing.assert_allclose(out[0], w @ x[0], rtol=1e-3, atol=1e-3)
        timers[f"bsr {sparsity}"] = run
        densities[sparsity] = bsr.block_density
    samples = _interleaved_rounds(timers, rounds)
    # The build machine is shared (load average often 4x its cores): the minimum over rounds is
    # the least-disturbed run and is what the ratios use; medians are reported beside it.
    best = {key: float(np.min(v)) * 1e3 for key, v in samples.items()}
    medians = {key: float(np.median(v)) * 1e3 for key, v in samples.items()}
    rows = []
    for sparsity in SPARSITIES:
        t = best[f"bsr {sparsity}"]
        ideal = 1.0 / densities[sparsity]
        rows.append({"shape": name, "N": n, "K": k, "P": p, "block": list(block),
                     "sparsity": sparsity, "block_density": densities[sparsity],
                     "ms_bsr": t, "ms_ours_dense": best["ours dense"],
                     "ms_ort_dense": best["ort dense"],
                     "median_ms": {"bsr": medians[f"bsr {sparsity}"],
                                   "ours_dense": medians["ours dense"],
                                   "ort_dense": medians["ort dense"]},
                     "speedup_vs_ours_dense": best["ours dense"] / t,
                     "speedup_vs_ort_dense": best["ort dense"] / t, "ideal": ideal,
                     "fraction_of_ideal": best["ours dense"] / t / ideal})
    return rows


def bench_int8(name, n, k, p, rounds, target, rng):
    """int8 kernel (vpmaddwd "madd" and plain "int32" inner products) vs our float32 kernels on
    the same 4x4-block weight, dense and at 90% block sparsity; on a VNNI target also the dense
    row-layout VNNI kernel (float32 out, the store the lowering uses)."""
    from backends.tvm.kernels import bsr_matmul_kn, cpu_schedule, dense_matmul_kn, to_bsr
    from backends.tvm.kernels.int8 import bsr_int8_kn, pack_activations, quantize_params
    from backends.tvm.kernels.vnni import has_vnni, int8_matmul_vnni, pack_weight_vnni
    schedule = cpu_schedule(target)
    x = rng.integers(-128, 128, (1, k, p)).astype(np.int8)
    xf = x.astype(np.float32)
    rows = []
    for sparsity in (0.0, 0.9):
        keep = rng.random((n // 4, k // 4)) >= sparsity
        w = (rng.integers(-127, 128, (n, k)) * np.repeat(np.repeat(keep, 4, 0), 4, 1))
        w = w.astype(np.int8)
        q = quantize_params(w, 0.05, 3, 0.01, 2.0, -5)
        bsr, bsr_f = to_bsr(w, (4, 4)), to_bsr(w.astype(np.float32), (4, 4))
        timers = {"fp32 bsr": _tvm_timer(
            bsr_matmul_kn(bsr_f, 1, p, schedule=schedule),
            [xf, bsr_f.data, bsr_f.indices, bsr_f.indptr, np.zeros(n, np.float32),
             np.zeros((1, n, p), np.float32)], target)[0]}
        if sparsity == 0.0:
            timers["fp32 dense"] = _tvm_timer(
                dense_matmul_kn(n, k, 1, p, schedule=schedule),
                [xf, w.astype(np.float32), np.zeros(n, np.float32),
                 np.zeros((1, n, p), np.float32)], target)[0]
        for method in ("madd", "int32"):
            func, data = bsr_int8_kn(bsr, 1, p, method=method)
            timers[f"int8 {method}"] = _tvm_timer(
                func, [pack_activations(x, method), data, bsr.data, bsr.indices, bsr.indptr,
                       q.bias_q, q.mult, np.array([q.zy], np.int32),
                       np.zeros((1, n, p), np.int8)], target)[0]
        if sparsity == 0.0 and has_vnni(target):
            # the row-layout VNNI kernel: X [P, K] uint8, float32 out (dequantizing store)
            timers["int8 vnni (dense)"] = _tvm_timer(
                int8_matmul_vnni(p, k, n),
                [(x[0].T.astype(np.int16) + 128).astype(np.uint8), pack_weight_vnni(w),
                 q.bias_q, q.mult, np.zeros(n, np.float32), np.zeros((p, n), np.float32)],
                target)[0]
        samples = _interleaved_rounds(timers, rounds)
        for key, values in samples.items():
            rows.append({"shape": name, "sparsity": sparsity, "kernel": key,
                         "ms": float(np.min(values)) * 1e3,
                         "median_ms": float(np.median(values)) * 1e3})
    return rows


CONV_SHAPES = [  # name, C in, C out, H = W, stride
    ("resnet 3x3 64->64 @28x28", 64, 64, 28, 1),
    ("resnet 3x3 128->128 @14x14", 128, 128, 14, 1),
    ("resnet 3x3 64->128 @28x28 s2", 64, 128, 28, 2),
]
CONV_SPARSITIES = [0.5, 0.7, 0.8, 0.9]


def _conv_vm_timer(proto, sparsity, tunable):
    """(run(number) -> seconds, output) of a lowered single-Conv model on the host."""
    import tvm
    from tvm import relax

    import ir
    from backends.tvm.build import build_module
    from backends.tvm.kernels import choice
    from backends.tvm.lower import lower_model
    from backends.tvm.targets import parse_target
    from passes.api import compress

    model = ir.load_model(proto)
    compress(model, "cleanup")
    if sparsity is not None:
        model.graph.initializers["w"].meta["sparsity"] = sparsity
    saved = dict(choice.BREAK_EVEN_DENSITY["x86"])
    choice.BREAK_EVEN_DENSITY["x86"].update(vector=1.01, narrow=1.01, im2col=1.01)  # force
    try:
        lowered = lower_model(model, use_kernels=sparsity is not None, tunable_kernels=tunable)
    finally:
        choice.BREAK_EVEN_DENSITY["x86"].update(saved)
    executable, _ = build_module(lowered, parse_target("host"))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = np.random.default_rng(1).standard_normal(lowered.inputs[0][1]).astype(np.float32)
    args = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(lowered.params[n])
                                      for n in lowered.param_names]
    out = vm["main"](*args)[0].numpy()

    def run(number):
        evaluator = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=1)
        return float(evaluator(*args).mean)
    return run, out


def bench_conv(name, c_in, c_out, size, stride, rounds, rng, block=(4, 1)):
    from onnx import TensorProto, helper, numpy_helper
    rows = []
    w_dense = rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32)

    def proto_of(w):
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1],
                              strides=[stride, stride])], "conv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, size, size])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        return model

    timers = {"conv2d dense": _conv_vm_timer(proto_of(w_dense), None, False)[0]}
    densities = {}
    for sparsity in CONV_SPARSITIES:
        w = _block_sparse(rng, c_out, c_in * 9, block, sparsity).reshape(c_out, c_in, 3, 3)
        meta = {"pattern": "block", "block": list(block), "density": 1 - sparsity}
        ref = _conv_vm_timer(proto_of(w), None, False)[1]
        for label, tunable in (("bsr", False), ("ell", True)):
            run, out = _conv_vm_timer(proto_of(w), meta, tunable)
            np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
            timers[f"{label} {sparsity}"] = run
        from backends.tvm.kernels import to_bsr
        densities[sparsity] = to_bsr(w.reshape(c_out, -1), block).block_density
    samples = _interleaved_rounds(timers, rounds)
    best = {key: float(np.min(v)) * 1e3 for key, v in samples.items()}
    for sparsity in CONV_SPARSITIES:
        rows.append({"shape": name, "sparsity": sparsity, "block_density": densities[sparsity],
                     "ms_conv2d_dense": best["conv2d dense"],
                     "ms_im2col_bsr": best[f"bsr {sparsity}"],
                     "ms_im2col_ell_untuned": best[f"ell {sparsity}"],
                     "speedup_bsr": best["conv2d dense"] / best[f"bsr {sparsity}"],
                     "speedup_ell": best["conv2d dense"] / best[f"ell {sparsity}"]})
    return rows


def bench_conv_int8(name, c_in, c_out, size, stride, rounds, rng):
    """A QDQ-quantized 3x3 conv (the quantize pass, per-channel int8 weights, uint8 activations):
    the float lowering of the QDQ graph (what the dispatcher replaces) vs im2col + our int8
    kernel, dense and at 90% 4x4-block sparsity."""
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax

    import ir
    import passes
    from backends.tvm.build import build_module
    from backends.tvm.lower import lower_model
    from backends.tvm.targets import parse_target

    spec = parse_target("host")
    timers, records = {}, {}
    for sparsity in (0.0, 0.9):
        w = _block_sparse(rng, c_out, c_in * 9, (4, 4), sparsity).reshape(c_out, c_in, 3, 3)
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1],
                              strides=[stride, stride])], "conv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, size, size])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(w, "w")])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 9
        calib = {"x": rng.standard_normal((4, 1, c_in, size, size)).astype(np.float32)}
        outputs = {}
        for label, use_kernels in (("float QDQ", False), ("int8", True)):
            model = ir.load_model(proto)
            passes.compress(model, "quantize", calibration=calib)
            lowered = lower_model(model, use_kernels=use_kernels, target=spec)
            records.update({f"{label} {sparsity}": v["kernel"]
                            for v in lowered.weight_meta.values() if "kernel" in v})
            executable, _ = build_module(lowered, spec)
            vm = relax.VirtualMachine(executable, tvm.cpu())
            args = [tvm.runtime.tensor(calib["x"][0])] + [
                tvm.runtime.tensor(lowered.params[n]) for n in lowered.param_names]
            outputs[label] = vm["main"](*args)[0].numpy()

            def run(number, vm=vm, args=args):
                evaluator = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=1)
                return float(evaluator(*args).mean)
            timers[f"{label} {sparsity}"] = run
        scale = np.abs(outputs["float QDQ"]).max()
        np.testing.assert_allclose(outputs["int8"], outputs["float QDQ"], atol=2e-2 * scale)
    samples = _interleaved_rounds(timers, rounds)
    best = {key: float(np.min(v)) * 1e3 for key, v in samples.items()}
    return [{"shape": name, "sparsity": sp, "ms_float_qdq": best[f"float QDQ {sp}"],
             "ms_int8": best[f"int8 {sp}"], "int8_kernel": records.get(f"int8 {sp}", {}),
             "speedup": best[f"float QDQ {sp}"] / best[f"int8 {sp}"]} for sp in (0.0, 0.9)]


def _main_conv_int8(args, rng) -> int:
    shapes = [CONV_SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes \
        else CONV_SHAPES
    rows = []
    for shape in shapes:
        rows += bench_conv_int8(*shape, args.rounds, rng)
    print(f"threads {args.threads}, host target, best of {args.rounds} interleaved rounds, "
          f"QDQ 3x3 conv (quantize pass), whole lowered module\n")
    print("| shape | 4x4-block sparsity | float QDQ lowering ms | im2col + int8 kernel ms | "
          "kernel | speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['sparsity']:.0%} | {r['ms_float_qdq']:.3f} | "
              f"{r['ms_int8']:.3f} | {r['int8_kernel'].get('kernel', '-')} "
              f"{r['int8_kernel'].get('method', '')} | {r['speedup']:.2f}x |")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"threads": args.threads, "conv_int8": rows}, indent=1))
    return 0


def _main_conv(args, block, rng) -> int:
    rows = []
    shapes = [CONV_SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes \
        else CONV_SHAPES
    for shape in shapes:
        rows += bench_conv(*shape, args.rounds, rng, block)
    print(f"threads {args.threads}, host target, best of {args.rounds} interleaved rounds, "
          f"{block[0]}x{block[1]} blocks, whole lowered Conv module (im2col included)\n")
    print("| shape | sparsity | block density | conv2d dense ms | im2col+BSR ms | "
          "im2col+ELL untuned ms | BSR vs dense | ELL vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['sparsity']:.0%} | {r['block_density']:.3f} | "
              f"{r['ms_conv2d_dense']:.3f} | {r['ms_im2col_bsr']:.3f} | "
              f"{r['ms_im2col_ell_untuned']:.3f} | {r['speedup_bsr']:.2f}x | "
              f"{r['speedup_ell']:.2f}x |")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"threads": args.threads, "block": list(block), "conv": rows},
                               indent=1))
    return 0


def _main_tuned(args, shapes, target, rng) -> int:
    """Our BSR kernel vs the blocked-ELL kernel, default-scheduled and MetaSchedule-tuned."""
    import tempfile

    import tvm

    from backends.tvm.kernels import bsr_matmul_kn, cpu_schedule, to_bsr
    from backends.tvm.kernels.ell import ell_matmul_kn, to_ell, tune_ell
    from backends.tvm.schedule import default_schedule_pass

    name, n, k, p = shapes[0]
    sparsity = 0.9
    w = _block_sparse(rng, n, k, (4, 1), sparsity)
    bsr = to_bsr(w, (4, 1))
    ell = to_ell(bsr)
    x = rng.standard_normal((1, k, p)).astype(np.float32)
    bias = np.zeros(n, np.float32)
    y = np.zeros((1, n, p), np.float32)
    tvm_target = tvm.target.Target(dict(target, **{"num-cores": args.threads}))
    timers = {"ours BSR": _tvm_timer(bsr_matmul_kn(bsr, 1, p, schedule=cpu_schedule(target)),
                                     [x, bsr.data, bsr.indices, bsr.indptr, bias, y.copy()],
                                     target)[0]}
    ell_args = [x, ell.data, ell.indices, bias, y.copy()]
    func = ell_matmul_kn(ell, 1, p)
    with tvm_target:
        untuned = default_schedule_pass(tvm_target)(tvm.IRModule({"main": func}))
    timers["ELL default schedule"] = _module_timer(untuned, ell_args, tvm_target, w @ x[0])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        tuned = tune_ell(func, tvm_target, work_dir, args.trials, ell_args)
    tune_s = time.perf_counter() - start
    if tuned is None:
        print("MetaSchedule found no valid candidate")
        return 1
    timers[f"ELL MetaSchedule ({args.trials} trials)"] = _module_timer(tuned, ell_args,
                                                                      tvm_target, w @ x[0])
    samples = _interleaved_rounds(timers, args.rounds)
    best = {key: float(np.min(v)) * 1e3 for key, v in samples.items()}
    print(f"{name}, 4x1 blocks at {sparsity:.0%} (block density {bsr.block_density:.3f}, ELL "
          f"slots {ell.slots}, padding +{ell.padding:.0%}), threads {args.threads}, best of "
          f"{args.rounds} interleaved rounds; tuning took {tune_s:.0f} s\n")
    print("| kernel | ms | vs ours BSR |")
    print("|---|---|---|")
    for key, ms in best.items():
        print(f"| {key} | {ms:.3f} | {best['ours BSR'] / ms:.2f}x |")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"threads": args.threads, "shape": name, "sparsity": sparsity,
                                "trials": args.trials, "tune_seconds": tune_s, "ms": best},
                               indent=1))
    return 0


def _module_timer(mod, args, target, reference):
    import tvm
    lib = tvm.compile(mod, target)
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    np.testing.assert_allclose(tensors[-1].numpy()[0], reference, rtol=1e-3, atol=1e-3)

    def run(number):
        evaluator = lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=1)
        return float(evaluator(*tensors).mean)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", default="4x1", help="R x C block (R output rows)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--target", default='{"kind": "llvm", "mcpu": "core-avx2"}')
    parser.add_argument("--shapes", default="",
                        help="comma-separated indices into SHAPES (CONV_SHAPES with --conv)")
    parser.add_argument("--int8", action="store_true",
                        help="int8 kernels vs float32 instead (MiniLM shapes, 4x4 blocks)")
    parser.add_argument("--conv", action="store_true",
                        help="3x3 convs: im2col + BSR / ELL vs TVM conv2d (whole lowered module)")
    parser.add_argument("--tuned", action="store_true",
                        help="MetaSchedule-tuned ELL kernel vs ours (MiniLM FFN up, 90%%)")
    parser.add_argument("--trials", type=int, default=32, help="MetaSchedule trials (--tuned)")
    parser.add_argument("--json",
                        default=str(Path(__file__).parent / "out" / "sparse_kernels.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    block = tuple(int(v) for v in args.block.lower().split("x"))
    target = json.loads(args.target)
    rng = np.random.default_rng(0)
    if args.conv and args.int8:
        return _main_conv_int8(args, rng)
    if args.conv:
        return _main_conv(args, block, rng)
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    if args.int8:
        return _main_int8(args, shapes, target, rng)
    if args.tuned:
        return _main_tuned(args, shapes, target, rng)
    rows = []
    for shape in shapes:
        rows += bench_shape(*shape, block, args.rounds, args.threads, target, rng)
    print(f"block {block[0]}x{block[1]}, threads {args.threads}, target {args.target}, "
          f"best of {args.rounds} interleaved rounds (medians in the JSON)\n")
    print("| shape | sparsity | block density | ours BSR ms | ours dense ms | ort dense ms | "
          "vs ours dense | vs ort dense | ideal | % of ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['sparsity']:.0%} | {r['block_density']:.3f} | "
              f"{r['ms_bsr']:.3f} | {r['ms_ours_dense']:.3f} | {r['ms_ort_dense']:.3f} | "
              f"{r['speedup_vs_ours_dense']:.2f}x | {r['speedup_vs_ort_dense']:.2f}x | "
              f"{r['ideal']:.1f}x | {r['fraction_of_ideal']:.0%} |")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"block": list(block), "threads": args.threads,
                                "target": target, "rows": rows}, indent=1))
    return 0


def _main_int8(args, shapes, target, rng) -> int:
    rows = []
    for shape in shapes:
        rows += bench_int8(*shape, args.rounds, target, rng)
    print(f"threads {args.threads}, target {args.target}, best of {args.rounds} rounds\n")
    print("| shape | block sparsity | kernel | ms | x fp32 dense |")
    print("|---|---|---|---|---|")
    dense = {r["shape"]: r["ms"] for r in rows if r["kernel"] == "fp32 dense"}
    for r in rows:
        print(f"| {r['shape']} | {r['sparsity']:.0%} | {r['kernel']} | {r['ms']:.3f} | "
              f"{dense[r['shape']] / r['ms']:.2f}x |")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"threads": args.threads, "target": target, "int8": rows},
                               indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
