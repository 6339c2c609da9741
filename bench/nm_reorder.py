"""N:M sparsity with and without channel reordering (`sparsify:reorder=true`) on CNNs.

    PYTHONPATH=. python bench/nm_reorder.py [--json bench/out/nm_reorder.json]

2:4 on the 1x1 convs and dense layers (`kernels=1x1`, first and last layers dense), Wanda and
SparseGPT (reordering needs a mask that sees activations), each with and without
`reorder=true`, side by side in one run:
- digits (models.digits, trained weights): top-1 on the test split and the relative error of the
  logits to the dense model's; calibration on 128 training images.
- ResNet50, SqueezeNet and Inception v2 from the onnx wheel's light zoo, whose shipped weights
  are constant: their weights are replaced by seeded random ones (N(0, 1/fan_in), biases alike),
  so these rows measure what reordering does on real topologies with unstructured weights, not on
  trained ones. Relative error of the outputs to the dense (random-weight) model on 8 random
  inputs; calibration on 8 others.
Also reported: the mean fraction of saliency the mask keeps in the reordered groups before and
after, and the seconds of the whole pass. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ir  # noqa: E402
import passes  # noqa: E402
from passes.calibration import CalibrationSet  # noqa: E402

SPEC = "sparsify:pattern=nm:nm=2of4:kernels=1x1:method={method}:samples={samples}"
ZOO = ("resnet50", "squeezenet", "inception_v2")


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: sample[None]})[0] for sample in x])


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want - want.mean()))


def _random_weights(name: str, seed: int = 0) -> onnx.ModelProto:
    from models.onnx_zoo import light_model_path
    model = ir.load_model(onnx.load(str(light_model_path(name))))
    passes.prepare(model)
    passes.compress(model, "cleanup")  # folds the in-graph ConstantOfShape weights
    rng = np.random.default_rng(seed)
    for value in model.graph.initializers.values():
        array = value.const
        if array.dtype == np.float32 and array.size > 1:
            fan_in = int(np.prod(array.shape[1:])) if array.ndim >= 2 else 100
            value.const = (rng.standard_normal(array.shape) / np.sqrt(fan_in)).astype(np.float32)
    return ir.to_onnx(model)


def _cases():
    """(model label, dense proto, evaluation inputs, calibration arrays, labels or None)."""
    from models import digits
    splits = digits.load_splits()
    yield ("digits (trained)", onnx.load(str(digits.MODEL_PATH)), splits.x_test,
           splits.x_calib[:128], splits.y_test)
    rng = np.random.default_rng(1)
    for name in ZOO:
        proto = _random_weights(name)
        shape = [d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim][1:]
        inputs = rng.standard_normal((16, *shape)).astype(np.float32)
        yield f"{name} (random weights)", proto, inputs[:8], inputs[8:], None


def bench(rows: list[dict]) -> None:
    for label, dense, x_eval, x_calib, labels in _cases():
        reference = _run(dense, x_eval)
        calibration = CalibrationSet({dense.graph.input[0].name: x_calib})
        for method in ("wanda", "sparsegpt"):
            for reorder in (False, True):
                model = ir.load_model(dense)
                spec = SPEC.format(method=method, samples=len(x_calib))
                spec += ":reorder=true" if reorder else ""
                start = time.time()
                report = passes.compress(model, spec, calibration=calibration)
                seconds = time.time() - start
                outputs = _run(ir.to_onnx(model), x_eval)
                records = report.passes[-1].details.get("reordered", [])
                row = {"model": label, "method": method, "reorder": reorder, "spec": spec,
                       "relative_error": round(_relative_error(outputs, reference), 4),
                       "groups": len(records), "seconds": round(seconds, 1)}
                if records:
                    row["kept_before"] = round(float(np.mean([r["kept_before"]
                                                              for r in records])), 4)
                    row["kept_after"] = round(float(np.mean([r["kept_after"]
                                                             for r in records])), 4)
                if labels is not None:
                    row["top1"] = round(float((outputs.argmax(axis=1) == labels).mean() * 100), 2)
                    row["dense_top1"] = round(float((reference.argmax(axis=1) == labels).mean()
                                                    * 100), 2)
                rows.append(row)
                print(_line(row), flush=True)


def _line(row: dict) -> str:
    kept = f"{row['kept_before']:.1%} -> {row['kept_after']:.1%}" if "kept_before" in row else "-"
    top1 = f"{row['top1']:.2f} (dense {row['dense_top1']:.2f})" if "top1" in row else "-"
    return (f"| {row['model']} | {row['method']} | {'yes' if row['reorder'] else 'no'} | "
            f"{row['relative_error']:.4f} | {top1} | {row['groups']} | {kept} | "
            f"{row['seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench/out/nm_reorder.json")
    args = parser.parse_args()
    print("| model | method | reorder | output rel. error | top-1 | groups reordered | "
          "saliency kept (mean) | s |")
    print("|---|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    bench(rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
