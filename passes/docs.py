"""The README's pass list, generated from the passes' own docstrings and options.

`python -m passes.docs` prints it; a test checks that README.md contains it verbatim, so the
documentation cannot drift from the code.
"""

from __future__ import annotations

from .core import available_passes

__all__ = ["pass_list_markdown"]


def pass_list_markdown() -> str:
    lines = []
    for name, cls in available_passes().items():
        if name.startswith("test-"):
            continue
        lines.append(f"- **`{name}`** — {cls.summary()}")
        for key, option in cls.options.items():
            choices = f" ({' / '.join(map(str, option.choices))})" if option.choices else ""
            lines.append(f"  - `{key}` = `{option.default}`{choices}: {option.help}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(pass_list_markdown())
