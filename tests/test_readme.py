"""The README's promises: a Quick start with exactly two command lines, the second one run by CI; a README
short enough to read to the end; documentation whose config names and links all lead somewhere."""

import re
from pathlib import Path

import pytest

from helpers import ROOT, doc, documentation

README_MAX_LINES = 300
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _quick_start_lines() -> list[str]:
    section = doc("README.md").split("## Quick start", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_has_two_lines_and_ci_runs_the_second():
    first, second = _quick_start_lines()
    assert "train.py fit --config configs/bert/demo.yaml" in first
    assert "pytest" in second
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert second in ci


def test_the_readme_is_at_most_300_lines():
    lines = doc("README.md").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move reference material to docs/"


@pytest.mark.parametrize("page", documentation(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_configs_named_in_the_docs_exist(page: Path):
    for path in sorted(set(re.findall(r"configs/[\w/.-]+\.yaml", page.read_text()))):
        assert (ROOT / path).exists(), path


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of ``page``'s headings (outside code blocks); a repeated heading gets -1, -2, ... as on GitHub."""
    names, counts = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M):
        base = slug(heading)
        names.add(f"{base}-{counts[base]}" if base in counts else base)
        counts[base] = counts.get(base, 0) + 1
    return names


def test_heading_anchors_are_made_as_github_makes_them():
    assert slug("Reference System Time (RST)") == "reference-system-time-rst"
    assert slug("Comparing methods: `train.py compare`") == "comparing-methods-trainpy-compare"
    assert slug("Pre-emption, resuming and bad numbers") == "pre-emption-resuming-and-bad-numbers"


@pytest.mark.parametrize("page", documentation(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_to_a_file_and_heading(page: Path):
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} -> no such file"
        if anchor:
            assert linked.suffix == ".md", f"{page.name}: {target} -> an anchor into a file that is not Markdown"
            assert anchor in anchors(linked), f"{page.name}: {target} -> {linked.name} has no such heading"
