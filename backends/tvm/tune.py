"""MetaSchedule tuning with a persistent database per target.

The database (MetaSchedule's JSON workload + tuning-record files) lives in
`$GRAPH_COMPRESS_CACHE/tvm-tuning/<target-key>/` (default `~/.cache/graph-compress`), keyed by a
hash of the target JSON, so every run for the same target adds to and reuses the same records:
the evolutionary search starts from the best records already there, and functions tuned before
are compiled from the database. `--rpc HOST:PORT:KEY` measures on a remote device through a TVM
RPC tracker (see README.md); candidates are cross-compiled here with the target's toolchain.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from ir import CompressError

from .targets import TargetSpec

__all__ = ["tune_module", "tuning_dir", "parse_rpc"]


def tuning_dir(spec: TargetSpec, cache_dir: Path | None = None) -> Path:
    base = Path(cache_dir) if cache_dir else Path(
        os.environ.get("GRAPH_COMPRESS_CACHE", Path.home() / ".cache" / "graph-compress"))
    path = base / "tvm-tuning" / spec.key()
    path.mkdir(parents=True, exist_ok=True)
    return path


def parse_rpc(text: str) -> tuple[str, int, str]:
    host, _, rest = text.partition(":")
    port, _, key = rest.partition(":")
    if not host or not port.isdigit() or not key:
        raise CompressError(f"bad --rpc {text!r}; expected TRACKER_HOST:PORT:KEY, "
                            f"e.g. 192.168.1.10:9190:pi4")
    return host, int(port), key


def _runner_and_builder(spec: TargetSpec, rpc: str | None):
    from tvm.s_tir import meta_schedule as ms
    if rpc:
        host, port, key = parse_rpc(rpc)
        runner = ms.runner.RPCRunner(
            ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                session_timeout_sec=120),
            ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                      enable_cpu_cache_flush=False))
    elif spec.runs_here:
        runner = "local"
    else:
        raise CompressError(f"tuning for {spec.name} measures on the device: give --rpc "
                            f"TRACKER_HOST:PORT:KEY (code for it cannot run here)")
    # Builder workers import TVM first; on a small, busy machine that alone can pass
    # MetaSchedule's default 30 s build timeout, so every candidate failed to "build".
    builder_args = dict(max_workers=1, timeout_sec=300)
    if spec.cross_toolchain is None:
        return runner, ms.builder.LocalBuilder(**builder_args)
    compiler = spec.compiler()

    def export_cross(mod):  # runs in the builder's worker processes (cloudpickled)
        import tempfile

        from tvm.support import cc
        path = os.path.join(tempfile.mkdtemp(), "tuned.so")
        mod.export_library(path, fcompile=cc.cross_compiler(compiler))
        return path

    return runner, ms.builder.LocalBuilder(f_export=export_cross, **builder_args)


def _progress_callback(total: int, progress: Callable | None):
    """A MetaSchedule measure callback that advances the pipeline's progress display."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

    ticker = iter(progress(iter(range(total)), total=total, desc="tuning trials")) \
        if progress else None

    @derived_object
    class ProgressCallback(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            for _ in measure_candidates:
                if ticker is not None:
                    next(ticker, None)

    return ProgressCallback()


def _trials_per_round(trials: int) -> int:
    """Candidates measured per task per round. The scheduler visits tasks round-robin and each
    visit spends a whole round, so a round as large as a small budget spent it all on the
    first task or two (32 trials on the digits model: 1 on a reshape, 31 on a mean, none on
    the convolutions). Small rounds spread small budgets; 64 is MetaSchedule's default."""
    return min(64, max(4, trials // 16))


def tune_module(mod, spec: TargetSpec, trials: int, rpc: str | None = None,
                progress: Callable | None = None, cache_dir: Path | None = None):
    """Tune the PrimFuncs of a legalized Relax module; returns (module with the database's
    schedules applied, tuning info)."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    target = spec.tvm_target()
    work_dir = tuning_dir(spec, cache_dir)
    runner, builder = _runner_and_builder(spec, rpc)
    callbacks = ms.measure_callback.MeasureCallback.create("default") + \
        [_progress_callback(trials, progress)]
    start = time.monotonic()
    ms.relax_integration.tune_relax(
        mod, params={}, target=target, work_dir=str(work_dir), max_trials_global=trials,
        num_trials_per_iter=_trials_per_round(trials), builder=builder, runner=runner,
        measure_callbacks=callbacks)
    with target:
        mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
    return mod, {"trials": trials, "seconds": round(time.monotonic() - start, 1),
                 "database": str(work_dir), "rpc": rpc}
