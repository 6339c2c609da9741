"""ONNX backend test cases survive ONNX -> IR -> cleanup -> ONNX with the same outputs.

The default run takes a deterministic sample (one node case in 8, every shipped model); the slow
test runs all of them (bench/conformance.py prints the same as a table). Cases onnxruntime cannot
run are checked with onnx's reference evaluator instead, where it can run them.
"""

import pytest

from tests.conformance.harness import iter_cases, run_case

# Cases that fail for reasons outside this project (see bench/conformance.py for the reasons).
KNOWN = {"test_affine_grid_2d_expanded", "test_affine_grid_2d_align_corners_expanded"}


def _check(cases):
    """Run the cases; fail listing every unexpected failure. Returns how many matched."""
    outcomes = [run_case(case) for case in cases]
    failures = [f"{o.suite}/{o.case}: {o.status}: {o.reason}" for o in outcomes
                if o.status in ("error", "mismatch") and o.case not in KNOWN]
    failures += [f"{o.suite}/{o.case} (onnx.reference): {o.details['reference']}"
                 for o in outcomes if o.details.get("reference", "").startswith("failed")]
    assert not failures, "\n".join(failures)
    return sum(o.status == "match" or o.details.get("reference") == "match" for o in outcomes)


def test_sampled_node_cases_round_trip():
    assert _check(iter_cases(["node"], every=8)) > 200


@pytest.mark.parametrize("suite", ["simple", "pytorch-converted", "pytorch-operator"])
def test_shipped_models_round_trip(suite):
    assert _check(iter_cases([suite])) >= 9


# Their folded fully-connected weights are hundreds of MB: ~90 s of the ~110 s of the light suite.
BIG_LIGHT_MODELS = {"light_bvlc_alexnet", "light_vgg19", "light_zfnet512"}


def test_light_models_round_trip():
    cases = [c for c in iter_cases(["light"]) if c.name not in BIG_LIGHT_MODELS]
    assert _check(cases) == 6


@pytest.mark.slow
def test_all_cases_round_trip():
    light = [c for c in iter_cases(["light"]) if c.name in BIG_LIGHT_MODELS]
    assert _check(light) == 3
    assert _check(iter_cases(["node"])) > 1800
