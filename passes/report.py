"""The human-readable table that the CLI prints (the JSON report holds the same numbers)."""

from __future__ import annotations

from .api import CompressionReport

__all__ = ["format_report"]

_ROWS = (("nodes", "nodes"), ("params", "params"), ("nonzero_params", "nonzero params"),
         ("macs", "MACs"), ("bytes", "size"))


def _size(count: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def _number(key: str, value: int) -> str:
    return _size(value) if key == "bytes" else f"{value:,}"


def _change(before: int, after: int) -> str:
    if before == 0:
        return "" if after == 0 else "new"
    return f"{(after - before) / before * 100:+.1f}%"


def format_report(report: CompressionReport, model_label: str) -> str:
    lines = [f"model:    {model_label}", f"pipeline: {report.pipeline}", ""]
    lines.append(f"{'':16}{'before':>14}{'after':>14}{'change':>10}")
    for key, label in _ROWS:
        before, after = report.before[key], report.after[key]
        lines.append(f"{label:16}{_number(key, before):>14}{_number(key, after):>14}"
                     f"{_change(before, after):>10}")
    lines.append("")
    lines.append(f"{'pass':32}{'time':>9}{'nodes':>8}{'params':>13}{'MACs':>16}{'size':>12}")
    for record in report.passes:
        after = record.after
        lines.append(f"{record.spec[:32]:32}{record.seconds:>8.2f}s{after['nodes']:>8,}"
                     f"{after['params']:>13,}{after['macs']:>16,}{_size(after['bytes']):>12}")
    if report.notes:
        lines.append("")
        lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines)
