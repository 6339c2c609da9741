"""Conformance benchmark: every ONNX backend test case through ONNX -> IR -> cleanup -> ONNX.

    python bench/conformance.py [--json bench/out/conformance.json] [--every K] [--suites a,b]

Prints a markdown table per suite (cases, runnable by onnxruntime, matched, failed; and for the
cases onnxruntime cannot run, the same check made with onnx's reference evaluator) and every
failure with its reason; writes the same as JSON. See tests/conformance/harness.py for the method.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("ORT_LOG_LEVEL", "4")

from tests.conformance.harness import SUITES, iter_cases, run_case  # noqa: E402

# Known exceptions: cases that fail for a reason outside this project, with that reason.
KNOWN = {
    "test_affine_grid_2d_expanded": "the model feeds Range 1-element 1-D tensors where the spec "
    "requires scalars; onnxruntime accepts that only while they come out of an If. Constant "
    "folding makes the If condition constant, onnxruntime then inlines the branch and its shape "
    "inference rejects the (spec-invalid) Range",
    "test_affine_grid_2d_align_corners_expanded": "same as test_affine_grid_2d_expanded",
}

HEADER = ["suite", "cases", "runnable by onnxruntime", "matched", "failed",
          "not runnable: checked with onnx.reference", "reference matched", "reference failed"]


def count(outcomes, suites):
    """Per-suite counters and the totals row."""
    rows = {}
    for suite in suites:
        mine = [o for o in outcomes if o.suite == suite]
        not_runnable = [o for o in mine if o.status == "not-runnable"]
        checked = [o for o in not_runnable if o.details.get("reference") != "cannot run"]
        rows[suite] = collections.Counter(
            cases=len(mine), runnable=len(mine) - len(not_runnable),
            matched=sum(o.status == "match" for o in mine),
            failed=sum(o.status in ("error", "mismatch") for o in mine),
            reference_checked=len(checked),
            reference_matched=sum(o.details.get("reference") == "match" for o in checked),
            reference_failed=sum(o.details.get("reference", "").startswith("failed")
                                 for o in checked))
    rows["all"] = sum(rows.values(), collections.Counter())
    return rows


def table(rows) -> str:
    keys = ["cases", "runnable", "matched", "failed", "reference_checked", "reference_matched",
            "reference_failed"]
    lines = ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    for suite, counts in rows.items():
        name = f"**{suite}**" if suite == "all" else suite
        lines.append("| " + " | ".join([name] + [str(counts[k]) for k in keys]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="bench/out/conformance.json")
    parser.add_argument("--every", type=int, default=1, help="keep one node case in K")
    parser.add_argument("--suites", default=",".join(SUITES))
    args = parser.parse_args()
    import onnxruntime
    onnxruntime.set_default_logger_severity(4)  # constant folding tries nodes that may not run
    suites = args.suites.split(",")
    start = time.time()
    outcomes = [run_case(case) for case in iter_cases(suites, every=args.every)]
    seconds = time.time() - start
    rows = count(outcomes, suites)
    total = rows["all"]
    print(table(rows))
    print(f"\nmatched {total['matched']}/{total['runnable']} cases runnable by onnxruntime "
          f"({total['matched'] / max(total['runnable'], 1):.2%}); onnx.reference matched "
          f"{total['reference_matched']}/{total['reference_checked']} of the others; {seconds:.0f} s")
    failures = [o for o in outcomes if o.status in ("error", "mismatch")]
    reference_failures = [o for o in outcomes
                          if o.details.get("reference", "").startswith("failed")]
    for outcome in failures:
        known = KNOWN.get(outcome.case)
        print(f"- {outcome.suite}/{outcome.case}: {outcome.status}: {outcome.reason}"
              + (f" — known: {known}" if known else ""))
    for outcome in reference_failures:
        print(f"- {outcome.suite}/{outcome.case} (onnx.reference): {outcome.details['reference']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "seconds": round(seconds, 1), "table": {s: dict(c) for s, c in rows.items()},
        "failures": [{"suite": o.suite, "case": o.case, "status": o.status, "reason": o.reason,
                      "known": KNOWN.get(o.case)} for o in failures],
        "not_runnable": [{"suite": o.suite, "case": o.case, "reason": o.reason,
                          "reference": o.details.get("reference")}
                         for o in outcomes if o.status == "not-runnable"]}, indent=1))


if __name__ == "__main__":
    main()
