"""Run a TVM artifact directory (made by `compile_artifact`) on the device.

    python -m backends.tvm.run DIR --input x.npy [--output y.npy] [--bench N] [--threads T]
    python DIR/run.py DIR --input name=x.npy --input other=z.npy --output name=y.npy ...

Needs only `pip install apache-tvm numpy` (this file imports nothing else from the project, so
it is also copied into every artifact). One --input per graph input (`name=path` when there are
several). --output y.npy saves the first output as .npy, --output name=y.npy (repeatable) the
output of that name. --bench N times N runs after a warm-up run and prints a last line
`median_ms=<float>`. --threads T sets TVM's thread pool size (as TVM_NUM_THREADS=T would).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["load_artifact", "Artifact", "set_threads", "main"]


class Artifact:
    """A loaded artifact: `run(*arrays) -> [outputs]` with inputs in manifest order."""

    def __init__(self, path):
        import tvm
        from tvm import relax

        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        device_name = self.manifest["target"].get("device", "cpu")
        self.device = tvm.cuda(0) if device_name == "cuda" else tvm.cpu(0)
        library = tvm.runtime.load_module(str(self.path / self.manifest["library"]))
        self.vm = relax.VirtualMachine(library, self.device)
        stored = np.load(self.path / self.manifest["params_file"])
        self.params = [tvm.runtime.tensor(stored[p["key"]], self.device)
                       for p in self.manifest["params"]]
        self._tvm = tvm

    @property
    def input_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["inputs"]]

    def check_inputs(self, arrays) -> list[np.ndarray]:
        specs = self.manifest["inputs"]
        if len(arrays) != len(specs):
            raise ValueError(f"expected {len(specs)} inputs ({', '.join(self.input_names)}), "
                             f"got {len(arrays)}")
        checked = []
        for spec, array in zip(specs, arrays):
            array = np.asarray(array)
            if list(array.shape) != list(spec["shape"]):
                raise ValueError(f"input {spec['name']!r}: shape {list(array.shape)}, "
                                 f"expected {spec['shape']}")
            checked.append(np.ascontiguousarray(array.astype(spec["dtype"], copy=False)))
        return checked

    def run_tensors(self, tensors):
        result = self.vm[self.manifest["entry"]](*tensors, *self.params)
        return list(result) if not hasattr(result, "numpy") else [result]

    def run(self, *arrays) -> list[np.ndarray]:
        tensors = [self._tvm.runtime.tensor(a, self.device) for a in self.check_inputs(arrays)]
        return [out.numpy() for out in self.run_tensors(tensors)]

    def bench(self, arrays, repeat: int) -> list[float]:
        """Milliseconds per run, after one warm-up run (inputs already on the device)."""
        tensors = [self._tvm.runtime.tensor(a, self.device) for a in self.check_inputs(arrays)]
        self.run_tensors(tensors)
        self.device.sync()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            self.run_tensors(tensors)
            self.device.sync()
            times.append((time.perf_counter() - start) * 1e3)
        return times


def load_artifact(path) -> Artifact:
    return Artifact(path)


def _read_inputs(artifact: Artifact, specs: list[str]) -> list[np.ndarray]:
    names = artifact.input_names
    named, positional = {}, []
    for spec in specs:
        name, eq, path = spec.partition("=")
        if eq and name in names:
            named[name] = np.load(path)
        else:
            positional.append(np.load(spec))
    if named and positional:
        raise SystemExit("error: give all inputs as name=path or all as paths")
    if named:
        missing = [n for n in names if n not in named]
        if missing:
            raise SystemExit(f"error: missing --input for {', '.join(missing)}")
        return [named[n] for n in names]
    if len(positional) != len(names):
        raise SystemExit(f"error: the model has {len(names)} inputs ({', '.join(names)}); "
                         f"give --input name=path for each")
    return positional


def _write_outputs(artifact: Artifact, outputs: list[np.ndarray], specs: list[str]) -> None:
    names = [o["name"] for o in artifact.manifest["outputs"]]
    for spec in specs:
        name, eq, path = spec.partition("=")
        if eq and name in names:
            np.save(path, outputs[names.index(name)])
        else:
            np.save(spec, outputs[0])
            path = spec
        print(f"wrote {path}")


def set_threads(count: int) -> None:
    """Size TVM's CPU thread pool; call it before the first run in the process. TVM creates
    the pool's workers when it first starts, as many as TVM_NUM_THREADS says (default: half the
    logical cores on x86); later the count can only be lowered. So set the variable (for a pool
    not yet started) and configure the pool (for one that runs)."""
    import os

    import tvm
    os.environ["TVM_NUM_THREADS"] = str(count)
    tvm.get_global_func("runtime.config_threadpool")(1, count)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.tvm.run",
                                     description="Run a TVM artifact directory.")
    parser.add_argument("artifact", help="artifact directory (manifest.json, model.so, ...)")
    parser.add_argument("--input", action="append", default=[], metavar="[NAME=]X.npy")
    parser.add_argument("--output", action="append", default=[], metavar="[NAME=]Y.npy",
                        help="save the first output (or the output NAME) here")
    parser.add_argument("--bench", type=int, default=0, metavar="N",
                        help="time N runs after a warm-up; last line median_ms=<float>")
    parser.add_argument("--threads", type=int, default=0, metavar="T",
                        help="CPU threads for TVM's thread pool (default: TVM_NUM_THREADS, else "
                             "TVM's default: half the logical cores on x86)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        set_threads(args.threads)
    artifact = load_artifact(args.artifact)
    try:
        arrays = _read_inputs(artifact, args.input)
        outputs = artifact.run(*arrays)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for spec, out in zip(artifact.manifest["outputs"], outputs):
        print(f"{spec['name']}: shape {list(out.shape)} {out.dtype}, "
              f"mean {float(np.mean(out)):.6g}")
    _write_outputs(artifact, outputs, args.output)
    if args.bench > 0:
        times = artifact.bench(arrays, args.bench)
        print(f"runs={len(times)} min_ms={min(times):.4f}")
        print(f"median_ms={float(np.median(times)):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
