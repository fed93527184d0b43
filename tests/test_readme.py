"""The README's promises: a Quick start with exactly two command lines, the second one run by CI."""

import re

from helpers import ROOT


def _quick_start_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_has_two_lines_and_ci_runs_the_second():
    first, second = _quick_start_lines()
    assert "train.py fit --config configs/bert/demo.yaml" in first
    assert "pytest" in second
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert second in ci


def test_configs_named_in_the_readme_exist():
    readme = (ROOT / "README.md").read_text()
    for path in sorted(set(re.findall(r"configs/[\w/.-]+\.yaml", readme))):
        assert (ROOT / path).exists(), path
