"""Which MetaSchedule tasks get trials: our already-scheduled kernels and arithmetic-free tasks
none, the heavy ones (FLOPs x occurrences) the budget (backends/tvm/tune_plan.py)."""

from __future__ import annotations

import numpy as np
from onnx import helper

import ir
from backends.tvm.tune_plan import MIN_TRIALS_PER_TASK, TaskPlan, plan_trials, task_plans
from passes.api import compress

from .conftest import make_model

F = np.float32


def _plans(*works):
    return [TaskPlan(f"t{i}", occurrences, flops) for i, (flops, occurrences) in enumerate(works)]


def test_budget_goes_to_heavy_tasks_in_proportion():
    plans = plan_trials(_plans((1e6, 1), (3e6, 2), (1e2, 1), (0.0, 1)), 64)
    trials = {p.name: p.trials for p in plans}
    assert sum(trials.values()) == 64
    # t1 does 6x t0's work: the minimum each, the 48 spare shared 6:1 (41 + 7)
    assert trials == {"t0": MIN_TRIALS_PER_TASK + 7, "t1": MIN_TRIALS_PER_TASK + 41,
                      "t2": 0, "t3": 0}
    assert [p.skip for p in plans] == ["", "", "light", "light"]


def test_small_budget_goes_to_the_heaviest_only():
    plans = plan_trials(_plans((1e6, 1), (2e6, 1), (3e6, 1), (4e6, 1)), 2 * MIN_TRIALS_PER_TASK)
    assert [p.trials for p in plans] == [0, 0, MIN_TRIALS_PER_TASK, MIN_TRIALS_PER_TASK]
    assert [p.skip for p in plans] == ["budget", "budget", "", ""]
    # a budget below the minimum still tunes the heaviest task with what there is
    plans = plan_trials(_plans((1e6, 1), (2e6, 1)), 3)
    assert [p.trials for p in plans] == [0, 3]


def test_skipped_tasks_get_nothing():
    plans = _plans((1e9, 4), (1e6, 1))
    plans[0].skip = "scheduled"
    plan_trials(plans, 32)
    assert [p.trials for p in plans] == [0, 32]


def _sparse_and_dense_matmuls():
    """a[1,16,64] @ W1 (90% zero in 4x1 blocks, routed to our BSR kernel) @ W2 (dense)."""
    rng = np.random.default_rng(0)
    keep = rng.random((16, 64)) < 0.1
    w1 = (rng.standard_normal((64, 64)) * np.repeat(keep, 4, 0)).astype(F).T.copy()
    w2 = rng.standard_normal((64, 32)).astype(F)
    proto = make_model([helper.make_node("MatMul", ["a", "w1"], ["h"]),
                        helper.make_node("MatMul", ["h", "w2"], ["y"])],
                       [("a", F, [1, 16, 64])], [("y", F, None)], {"w1": w1, "w2": w2})
    model = ir.load_model(proto)
    compress(model, "cleanup")
    model.graph.initializers["w1"].meta["sparsity"] = {"pattern": "block", "block": [4, 1],
                                                       "density": 0.1}
    return model


def test_our_scheduled_kernels_are_not_tuned():
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from backends.tvm.lower import lower_model
    from backends.tvm.targets import parse_target

    spec = parse_target("host")
    target = spec.tvm_target()
    lowered = lower_model(_sparse_and_dense_matmuls(), target=spec)
    assert lowered.weight_meta["w1"]["kernel"]["kernel"] == "bsr"
    with target:
        mod = relax.get_pipeline("zero")(lowered.mod)
    plans = plan_trials(task_plans(ms.relax_integration.extract_tasks(mod, target)), 16)
    scheduled = [p for p in plans if p.skip == "scheduled"]
    tuned = [p for p in plans if p.trials]
    assert len(scheduled) == 1 and scheduled[0].trials == 0
    assert len(tuned) == 1 and "matmul" in tuned[0].name and tuned[0].trials == 16
    assert tuned[0].flops >= 2 * 16 * 64 * 32
