"""The README's two set-up commands are the ones CI runs, and the docs point at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "the README starts with a bash block holding the two commands"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    demo, tests = readme_commands()[:2]
    assert "examples/demo.py" in demo and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    found = re.search(r"^README_TEST_COMMAND='(.*)'$", ci, re.M)
    assert found and found.group(1) == tests
    assert 'eval "$README_TEST_COMMAND"' in ci


def test_files_the_readme_names_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in set(re.findall(r"\((docs/[^)\s]+)\)", text)) | set(re.findall(r"`((?:examples|docs)/[\w./-]+\.(?:toml|py|md|json))`", text)):
        assert (ROOT / path).exists(), path
