"""Conformance benchmark: every ONNX backend test case through ONNX -> IR -> cleanup -> ONNX.

    python bench/conformance.py [--json bench/out/conformance.json] [--every K]

Prints a markdown table per suite (cases, runnable by onnxruntime, matched, failed) and every
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
    "test_affine_grid_2d_expanded": "constant folding makes the If condition constant; "
    "onnxruntime then inlines the branch, which feeds Range 1-element 1-D tensors where the "
    "spec requires scalars, and its shape inference rejects the (spec-invalid) result",
    "test_affine_grid_2d_align_corners_expanded": "same as test_affine_grid_2d_expanded",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="bench/out/conformance.json")
    parser.add_argument("--every", type=int, default=1, help="keep one node case in K")
    parser.add_argument("--suites", default=",".join(SUITES))
    args = parser.parse_args()
    import onnxruntime
    onnxruntime.set_default_logger_severity(4)  # constant folding tries nodes that may not run
    start = time.time()
    outcomes = [run_case(case) for case in iter_cases(args.suites.split(","), every=args.every)]
    table = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        table[outcome.suite][outcome.status] += 1
    lines = ["| suite | cases | runnable by onnxruntime | matched | failed |",
             "|---|---:|---:|---:|---:|"]
    totals = collections.Counter()
    for suite in args.suites.split(","):
        counts = table[suite]
        cases = sum(counts.values())
        runnable = cases - counts["not-runnable"]
        failed = counts["error"] + counts["mismatch"]
        totals.update(cases=cases, runnable=runnable, matched=counts["match"], failed=failed)
        lines.append(f"| {suite} | {cases} | {runnable} | {counts['match']} | {failed} |")
    lines.append(f"| **all** | {totals['cases']} | {totals['runnable']} | {totals['matched']} | "
                 f"{totals['failed']} |")
    failures = [o for o in outcomes if o.status in ("error", "mismatch")]
    print("\n".join(lines))
    print(f"\nmatched {totals['matched']}/{totals['runnable']} runnable cases "
          f"({totals['matched'] / max(totals['runnable'], 1):.2%}) in {time.time() - start:.0f} s")
    for outcome in failures:
        known = KNOWN.get(outcome.case)
        print(f"- {outcome.suite}/{outcome.case}: {outcome.status}: {outcome.reason}"
              + (f" — known: {known}" if known else ""))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "table": {s: dict(c) for s, c in table.items()}, "totals": dict(totals),
        "failures": [{"suite": o.suite, "case": o.case, "status": o.status, "reason": o.reason,
                      "known": KNOWN.get(o.case)} for o in failures],
        "not_runnable": [{"suite": o.suite, "case": o.case, "reason": o.reason}
                         for o in outcomes if o.status == "not-runnable"]}, indent=1))


if __name__ == "__main__":
    main()
