"""Every step count the configs and the docs quote is the one ``train.py plan`` computes, exactly."""

import json
import re

import pytest

import cli
from helpers import ROOT, doc

# "# plan: 31,958 optimizer steps" or, in an overlay,
# "# plan (on configs/bert/baseline.yaml): 46,824 optimizer steps = 13,830 + 10,624 + 22,370"
PLAN_LINE = re.compile(r"^# plan(?: \(on (\S+)\))?: ([\d,]+) optimizer steps(?: = ([\d,]+(?: \+ [\d,]+)*))?\s*$")
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("configs/*/*.yaml"))


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _plan(capsys, *configs: str) -> dict:
    args = ["plan"]
    for config in configs:
        args += ["--config", str(ROOT / config)]
    cli.main(args)
    return json.loads(capsys.readouterr().out)


def _quoted_plans(config: str) -> list[tuple[str | None, int, list[int] | None]]:
    quoted = []
    for line in (ROOT / config).read_text().splitlines():
        match = PLAN_LINE.match(line)
        if match:
            base, steps, phases = match.groups()
            quoted.append((base, _number(steps), [_number(p) for p in phases.split(" + ")] if phases else None))
        elif line.lstrip().startswith("#") and re.search(r"\d[\d,]* (optimizer )?steps", line):
            pytest.fail(f"{config}: a step count outside a '# plan:' line: {line!r}")
    return quoted


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_step_counts_in_config_comments_are_what_plan_says(config, capsys):
    quoted = _quoted_plans(config)
    text = (ROOT / config).read_text()
    refused = re.search(r"^# python train.py fit --config (\S+) --config " + re.escape(config), text, re.M)
    if re.search(r"plan on them is\s+(?:#\s*)?refused", text):  # the paper's tables cannot price it
        assert refused and not quoted, config
        with pytest.raises(SystemExit) as stopped:
            cli.main(["plan", "--config", str(ROOT / refused.group(1)), "--config", str(ROOT / config)])
        error = capsys.readouterr().err
        assert stopped.value.code == 2 and "--update --" in error and error.count("error:") == 1, error
        return
    uses_budget = "callbacks.rst.RSTBudget" in text or any(base for base, _, _ in quoted)
    if not uses_budget:
        assert not quoted, f"{config} quotes a plan but configures no budget"
        return
    assert quoted, f"{config}: say what `train.py plan` gives, in a '# plan: N optimizer steps' line"
    for base, steps, phases in quoted:
        plan = _plan(capsys, *([base] if base else []), config)
        assert plan["optimizer_steps"] == steps, (config, plan["optimizer_steps"])
        if phases is not None:
            assert [p["optimizer_steps"] for p in plan["phases"]] == phases, (config, plan["phases"])


@pytest.mark.slow
def test_step_counts_in_the_config_table_of_docs_usage_are_what_plan_says(capsys):
    rows = re.findall(r"^\| `(configs/[\w/.-]+\.yaml)` \|.*\(([\d,]+) steps\)", doc("usage.md"), re.M)
    assert len(rows) >= 4, rows  # the demos and the baselines
    for config, steps in rows:
        assert _plan(capsys, config)["optimizer_steps"] == _number(steps), config


@pytest.mark.slow
def test_step_counts_of_the_stacking_paragraph_of_docs_methods_are_what_plan_says(capsys):
    methods = doc("methods.md")
    for family in ("bert", "t5"):
        phases = re.search(rf"{family.upper() if family == 'bert' else 'T5'} gets ([\d,]+) \+ ([\d,]+) \+ ([\d,]+) = ([\d,]+)",
                           methods)
        assert phases, family
        *stages, total = map(_number, phases.groups())
        plan = _plan(capsys, f"configs/{family}/baseline.yaml", f"configs/{family}/stacking.yaml")
        assert [p["optimizer_steps"] for p in plan["phases"]] == stages and plan["optimizer_steps"] == total
