"""Which MetaSchedule tasks get how many trials.

MetaSchedule's own task scheduler first gives every task one whole round, in task order, so a
small budget went to reshapes and means before any convolution (32 trials on the digits model:
1 on a reshape, 31 on a mean). Here tasks that are already scheduled (our BSR / int8 / dense
kernels carry `tirx.is_scheduled`) or do no arithmetic are skipped, the rest are ranked by
FLOPs x occurrences, and the budget is shared out in proportion to that among the heaviest.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TaskPlan", "plan_trials", "task_plans", "MIN_TRIALS_PER_TASK", "MIN_WORK_SHARE"]

# A task gets at least this many trials or none: fewer is not a search (one round of random
# candidates), and design-space generation costs as much as a few measurements.
MIN_TRIALS_PER_TASK = 8
# Tasks carrying less than this share of the model's FLOPs are not worth a round.
MIN_WORK_SHARE = 0.005


@dataclass
class TaskPlan:
    """One MetaSchedule task: its name, how often the model calls it, its FLOPs per call, the
    trials planned for it, and (after tuning) the trials measured, the time of the default
    schedule and the best trial's time. `skip` says why a task gets no trials: "scheduled" (our
    kernel), "no arithmetic" (reshapes, copies), "light" (< MIN_WORK_SHARE of the work) or
    "budget" (the budget ran out before it)."""
    name: str
    occurrences: int
    flops: float
    trials: int = 0
    skip: str = ""
    measured: int = 0
    default_ms: float | None = None
    best_ms: float | None = None

    @property
    def work(self) -> float:
        return self.flops * self.occurrences


def plan_trials(plans: list[TaskPlan], trials: int) -> list[TaskPlan]:
    """Share `trials` among `plans` (in place; also returned): skipped ones get 0; the heaviest
    tasks by FLOPs x occurrences, as many as can get MIN_TRIALS_PER_TASK each, get that minimum
    plus a share of the rest in proportion to their work (largest remainders round it off, so
    the shares add up to `trials` exactly)."""
    candidates = sorted((p for p in plans if not p.skip), key=lambda p: -p.work)
    total_work = sum(p.work for p in candidates)
    chosen = []
    for plan in candidates:
        if plan.work < MIN_WORK_SHARE * total_work:
            plan.skip = "light"
        elif (len(chosen) + 1) * MIN_TRIALS_PER_TASK > max(trials, MIN_TRIALS_PER_TASK):
            plan.skip = "budget"
        else:
            chosen.append(plan)
    if not chosen:
        return plans
    spare = max(0, trials - MIN_TRIALS_PER_TASK * len(chosen))
    chosen_work = sum(p.work for p in chosen)
    exact = [spare * p.work / chosen_work for p in chosen]
    extra = [int(x) for x in exact]
    by_remainder = sorted(range(len(chosen)), key=lambda i: extra[i] - exact[i])
    for i in by_remainder[:spare - sum(extra)]:
        extra[i] += 1
    for plan, more in zip(chosen, extra):
        plan.trials = min(MIN_TRIALS_PER_TASK, trials) + more
    return plans


def _is_scheduled(module) -> bool:
    """True when every PrimFunc of `module` was written already scheduled (our kernels)."""
    from tvm import tirx
    funcs = [f for f in module.functions.values() if isinstance(f, tirx.PrimFunc)]
    return bool(funcs) and all(f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled"))
                               for f in funcs)


def task_plans(tasks) -> list[TaskPlan]:
    """A TaskPlan (no trials yet) per MetaSchedule ExtractedTask, with its FLOPs estimate."""
    from tvm.s_tir.analysis import estimate_tir_flops
    plans = []
    for task in tasks:
        module = task.dispatched[0]
        try:
            flops = float(estimate_tir_flops(module))
        except Exception:  # noqa: BLE001 - data-dependent loops: no estimate, treat as light
            flops = 0.0
        skip = "scheduled" if _is_scheduled(module) else ("no arithmetic" if flops <= 0 else "")
        plans.append(TaskPlan(task.task_name, int(task.weight), flops, skip=skip))
    return plans


