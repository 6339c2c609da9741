"""Assemble bench/RESULTS.md from the per-topic tables in bench/results/*.md.

    python bench/assemble_results.py

Each topic file holds its latest table and the exact command that produced it; this script only
concatenates them in a fixed order under one header, so RESULTS.md never holds numbers that no
topic file (and so no command) stands behind.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["conformance", "prune", "sparsify", "quantize", "tvm", "sparse_kernels", "end_to_end"]


def main() -> None:
    topics = {p.stem: p for p in (HERE / "results").glob("*.md")}
    names = [n for n in ORDER if n in topics] + sorted(set(topics) - set(ORDER))
    parts = ["# Benchmark results", "",
             "Assembled by `python bench/assemble_results.py` from `bench/results/*.md`; each "
             "section states the command that produced it and the machine it ran on "
             "(2-core shared x86 VM unless said otherwise). Timings are medians measured side "
             "by side in one run.", ""]
    for name in names:
        parts.append(topics[name].read_text().rstrip())
        parts.append("")
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'} from {', '.join(names)}")


if __name__ == "__main__":
    main()
