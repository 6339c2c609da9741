"""The README's pass list, generated from the passes' own docstrings and options.

`python -m passes.docs` prints it and `python -m passes.docs --write README.md` puts it between
the README's pass-list markers; a test checks that README.md contains it verbatim, so the
documentation cannot drift from the code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .core import available_passes

__all__ = ["pass_list_markdown", "write_pass_list"]

_MARKERS = re.compile(r"(<!-- pass-list:start -->\n).*?(\n<!-- pass-list:end -->)", re.S)


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


def write_pass_list(readme: Path) -> None:
    """Replace the text between the pass-list markers of `readme` with the generated list."""
    text = readme.read_text()
    block = pass_list_markdown()
    readme.write_text(_MARKERS.sub(lambda m: m.group(1) + block + m.group(2), text))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write_pass_list(Path(sys.argv[2]))
    else:
        print(pass_list_markdown())
