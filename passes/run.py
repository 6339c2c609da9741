"""Command line: compress an ONNX model, write the result and a report.

    python -m passes.run [MODEL.onnx] [-o OUT.onnx] [--passes SPEC] [--input-shape NAME=D,D,..]
                         [--calib DATA.npz] [--report REPORT.json] [--target TARGET]
                         [--out-dir DIR] [--tune-trials N] [--tune-kernels]
                         [--rpc HOST:PORT:KEY]

Without MODEL it runs on the digits model shipped in `models/digits`, with its calibration split
unless --calib is given (the output then goes to the current directory). Every error caused by the input or the options is one line on stderr and exit
status 2; no output file is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import onnx

from ir import CompressError, load_model, parse_shape_spec, save_model, to_onnx

from .api import compress
from .core import PassContext, available_passes, stderr_progress
from .report import format_report
from .spec import build_pipeline

__all__ = ["main"]


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage otherwise)
        raise CompressError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="python -m passes.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="input ONNX model (default: shipped digits model)")
    parser.add_argument("-o", "--output", help="output model (default: MODEL.opt.onnx)")
    parser.add_argument("--passes", default="cleanup",
                        help="pipeline: name[:key=value...],... (default: cleanup)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D,D,..",
                        help="static shape of a dynamic input (repeatable)")
    parser.add_argument("--calib", help=".npz keyed by input name, first axis = samples")
    parser.add_argument("--report", help="write the report as JSON here")
    parser.add_argument("--target", help="compile with TVM for: host, rasp4b, rasp5, rasp3b, "
                        "cuda[:arch=sm_XX] or a TVM target JSON")
    parser.add_argument("--out-dir", help="artifact directory for --target")
    parser.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials")
    parser.add_argument("--tune-kernels", action="store_true",
                        help="with --tune-trials: emit the sparse kernels as tunable TIR too")
    parser.add_argument("--rpc", help="measure tuning on a remote device: HOST:PORT:KEY")
    parser.add_argument("--list-passes", action="store_true", help="list passes and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return parser


def _default_model() -> Path:
    from models.digits import MODEL_PATH
    return Path(MODEL_PATH)


def _output_path(args, model_path: Path, embedded: bool) -> Path:
    if args.output:
        return Path(args.output)
    stem = model_path.name[:-5] if model_path.name.endswith(".onnx") else model_path.name
    folder = Path.cwd() if embedded else model_path.parent
    return folder / f"{stem}.opt.onnx"


def _list_passes() -> str:
    lines = []
    for name, cls in available_passes().items():
        lines.append(f"{name}: {cls.summary()}")
        for key, option in cls.options.items():
            lines.append(f"    {key} ({option.kind.__name__}, default {option.default!r}): "
                         f"{option.help}")
    return "\n".join(lines)


def _check_loads(proto: onnx.ModelProto, original: bytes | None) -> None:
    """The result must pass the ONNX checker and load in onnxruntime (if the original did)."""
    from .calibration import make_session
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise CompressError(f"the optimized model fails the ONNX checker: "
                            f"{str(exc).splitlines()[0]}") from None
    try:
        make_session(proto)
    except Exception as exc:
        if original is not None:
            try:
                make_session(onnx.load_from_string(original))
            except Exception:
                return  # onnxruntime cannot run the original either (e.g. custom ops)
        raise CompressError(f"the optimized model does not load in onnxruntime: "
                            f"{str(exc).splitlines()[0]}") from None


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_passes:
        print(_list_passes())
        return 0
    build_pipeline(args.passes)  # a bad spec fails before any slow work
    if args.out_dir and not args.target:
        raise CompressError("--out-dir needs --target")
    if args.tune_trials < 0:
        raise CompressError("--tune-trials must be >= 0")
    shapes = dict(parse_shape_spec(spec) for spec in args.input_shape)

    embedded = args.model is None
    model_path = _default_model() if embedded else Path(args.model)
    model = load_model(model_path)
    ctx = PassContext(progress=stderr_progress)
    calibration = args.calib
    if embedded and calibration is None:  # the shipped model brings its calibration split
        from models.digits import load_splits
        calibration = {"input": load_splits().x_calib}
    report = compress(model, args.passes, calibration=calibration, input_shapes=shapes, ctx=ctx)

    proto = to_onnx(model)
    _check_loads(proto, model_path.read_bytes())
    out_path = _output_path(args, model_path, embedded)
    artifact = None
    if args.target:
        from backends.tvm.build import compile_artifact  # heavy import, only when asked
        out_dir = Path(args.out_dir) if args.out_dir else out_path.with_suffix("").with_name(
            out_path.stem + f".{args.target.split(':')[0]}")
        artifact = compile_artifact(model, target=args.target, out_dir=out_dir,
                                    pipeline=report.pipeline, tune_trials=args.tune_trials,
                                    rpc=args.rpc, progress=stderr_progress,
                                    tune_kernels=args.tune_kernels)
    save_model(proto, out_path)
    print(format_report(report, str(model_path)))
    print(f"\nwrote {out_path}")
    if artifact is not None:
        print(f"wrote TVM artifact for {args.target} in {artifact['out_dir']}")
    if args.report:
        payload = {"model": str(model_path), "output": str(out_path), **report.to_json()}
        if artifact is not None:
            payload["artifact"] = artifact
        _write_json(Path(args.report), payload)
        print(f"wrote {args.report}")
    return 0


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        return run(argv)
    except CompressError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless --debug asks for the traceback
        if debug:
            raise
        print(f"error: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(rerun with --debug)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
