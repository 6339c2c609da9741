"""MetaSchedule tuning with a persistent database per target, trials spent where the work is.

The database (MetaSchedule's JSON workload + tuning-record files) lives in
`$GRAPH_COMPRESS_CACHE/tvm-tuning/<target-key>/` (default `~/.cache/graph-compress`), keyed by a
hash of the target JSON, so every run for the same target adds to and reuses the same records:
the evolutionary search starts from the best records already there, and functions tuned before
are compiled from the database. `--rpc HOST:PORT:KEY` measures on a remote device through a TVM
RPC tracker (see README.md); candidates are compiled here (with the target's cross compiler).

Which tasks get how many trials is decided by `tune_plan.plan_trials` (the heavy ones, not
MetaSchedule's round-robin warm-up over every task); each chosen task is then tuned on its own
with its share. Before its search, a task's default schedule (schedule.py) is measured the same
way and stored as a tuning record: the search starts from it, and the compiled model gets a
tuned schedule only where one measured faster than the default. Tasks that get no trials keep
the default schedule.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ir import CompressError

from .targets import TargetSpec
from .tune_plan import TaskPlan, plan_trials, task_plans

__all__ = ["tune_module", "tuning_dir", "parse_rpc"]

# Rounds of evolution per search round (MetaSchedule's default is 4). Each costs ~5-15 s on 2
# busy cores, as much as building a few candidates; at the budgets a small machine can afford
# (tens of trials per task) measured candidates teach more than further evolution.
SEARCH_ITERATIONS = 2


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
        runner = ms.runner.LocalRunner(timeout_sec=120)
    else:
        raise CompressError(f"tuning for {spec.name} measures on the device: give --rpc "
                            f"TRACKER_HOST:PORT:KEY (code for it cannot run here)")
    # Builder workers import TVM first; on a small, busy machine that alone can pass
    # MetaSchedule's default 30 s build timeout, so every candidate failed to "build". At load
    # 22 on 2 cores one small conv took 280-370 s to build (300 s lost 7 of 8 ResNet50 trials),
    # hence 900 s. One worker per core: builds are most of a trial's cost here.
    builder_args = dict(max_workers=os.cpu_count() or 1, timeout_sec=900)
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


def _measure_callback(plan: TaskPlan, tick: Callable[[], None]):
    """Counts the candidates measured without error for `plan` and advances the progress bar."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class CountMeasured(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            for built, ran in zip(builder_results, runner_results):
                tick()
                if built.error_msg is None and ran.error_msg is None and ran.run_secs:
                    plan.measured += 1
                    seconds = min(float(s) for s in ran.run_secs)
                    if plan.best_ms is None or seconds * 1e3 < plan.best_ms:
                        plan.best_ms = seconds * 1e3

    return CountMeasured()


def _record_default_schedules(chosen, target, device: str, builder, runner,
                               database) -> None:
    """Measure the default schedule of each (task, plan) in `chosen` with the tuning builder
    and runner (one batch: each builder call starts fresh worker processes) and commit it to
    `database` as a tuning record; sets `plan.default_ms` where it could be built and run (a
    task the default rule leaves alone gets none)."""
    from tvm.s_tir import meta_schedule as ms

    from .schedule import cpu_default_rule

    rule = cpu_default_rule(target)
    scheduled = []
    for task, plan in chosen:
        module = task.dispatched[0]
        sch = rule.apply(module["main"], target, False)
        if sch is not None:
            scheduled.append((module, plan, sch))
    if not scheduled:
        return
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, _, sch in scheduled])
    measurable = [(item, b) for item, b in zip(scheduled, built) if b.error_msg is None]
    futures = runner.run([
        ms.runner.RunnerInput(b.artifact_path, device,
                              ms.arg_info.ArgInfo.from_prim_func(module["main"]))
        for (module, _, _), b in measurable])
    for ((module, plan, sch), _), future in zip(measurable, futures):
        ran = future.result()
        if ran.error_msg is not None or not ran.run_secs:
            continue
        run_secs = [float(s) for s in ran.run_secs]
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, database.commit_workload(module), run_secs, target,
            ms.arg_info.ArgInfo.from_prim_func(module["main"])))
        plan.default_ms = min(run_secs) * 1e3


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def _trials_per_round(trials: int) -> int:
    """Candidates measured per search round of one task. Each round costs a fixed ~25 s of
    evolutionary search on 2 busy cores (plus a fresh builder process), as much as building and
    timing ~4 candidates, so rounds are large: 8 trials are one round, more are 2-4 rounds
    (the cost model learns from each before the next); 64 is MetaSchedule's default."""
    return min(64, max(8, trials // 2)) if trials > 8 else trials


def tune_module(mod, spec: TargetSpec, trials: int, rpc: str | None = None,
                progress: Callable | None = None, cache_dir: Path | None = None,
                log: Callable[[str], None] | None = None):
    """Tune the PrimFuncs of a legalized Relax module; returns (module with the database's
    schedules applied, tuning info with the per-task plan). `log` gets one line per task."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    target = spec.tvm_target()
    work_dir = tuning_dir(spec, cache_dir)
    runner, builder = _runner_and_builder(spec, rpc)
    start = time.monotonic()
    tasks = ms.relax_integration.extract_tasks(mod, target)
    plans = plan_trials(task_plans(tasks), trials)
    ticker = iter(progress(iter(range(trials)), total=trials, desc="tuning trials")) \
        if progress else iter(())
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    chosen = [(task, plan) for task, plan in zip(tasks, plans) if plan.trials > 0]
    _record_default_schedules(chosen, target, spec.device, builder, runner, database)
    for task, plan in chosen:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [task], str(work_dir), strategy=ms.search_strategy.EvolutionarySearch(
                genetic_num_iters=SEARCH_ITERATIONS))
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(work_dir),
            max_trials_global=plan.trials, num_trials_per_iter=_trials_per_round(plan.trials),
            builder=builder, runner=runner, database=database, task_scheduler="round-robin",
            measure_callbacks=ms.measure_callback.MeasureCallback.create("default")
            + [_measure_callback(plan, lambda: next(ticker, None))])
        if log:
            log(f"tuned {plan.name} (x{plan.occurrences}, {plan.flops / 1e6:.1f} MFLOP): "
                f"{plan.measured}/{plan.trials} trials measured, default schedule "
                f"{_ms(plan.default_ms)}, best trial {_ms(plan.best_ms)}")
    with target:
        mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
    return mod, {"trials": trials, "seconds": round(time.monotonic() - start, 1),
                 "database": str(work_dir), "rpc": rpc,
                 "tasks": [asdict(p) for p in sorted(plans, key=lambda p: -p.work)]}
