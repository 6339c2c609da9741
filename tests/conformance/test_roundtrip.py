"""ONNX backend test cases survive ONNX -> IR -> cleanup -> ONNX with the same outputs.

The default run takes a deterministic sample (one node case in 8, every shipped model); the slow
test runs all of them (bench/conformance.py prints the same as a table).
"""

import pytest

from tests.conformance.harness import iter_cases, run_case

# Cases that fail for reasons outside this project (see bench/conformance.py for the reasons).
KNOWN = {"test_affine_grid_2d_expanded", "test_affine_grid_2d_align_corners_expanded"}


def _check(cases):
    outcomes = [run_case(case) for case in cases]
    failures = [f"{o.suite}/{o.case}: {o.status}: {o.reason}" for o in outcomes
                if o.status in ("error", "mismatch") and o.case not in KNOWN]
    matched = sum(o.status == "match" for o in outcomes)
    assert not failures, "\n".join(failures)
    return matched


def test_sampled_node_cases_round_trip():
    assert _check(iter_cases(["node"], every=8)) > 150


@pytest.mark.parametrize("suite", ["simple", "pytorch-converted", "pytorch-operator", "light"])
def test_shipped_models_round_trip(suite):
    assert _check(iter_cases([suite])) >= 5


@pytest.mark.slow
def test_all_node_cases_round_trip():
    assert _check(iter_cases(["node"])) > 1300
