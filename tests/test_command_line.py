"""The command line for small experiments: ``--budget``, callback arguments by class name, parser errors as
one line, a missing module named as such, and Lightning's start-up notes kept out of the output."""

from __future__ import annotations

import json

import pytest

import cli
from helpers import ROOT, run_until_exit, tiny_fit_args

DEMO = str(ROOT / "configs/bert/demo.yaml")


def _callbacks(args: list[str]) -> dict[str, object]:
    from training.lightning_cli import configured

    trainer, _, _ = configured(args, device="meta")
    return {type(c).__name__: c for c in trainer.callbacks}


def test_budget_and_a_callback_argument_by_class_name_reach_the_callbacks():
    default = _callbacks(["--config", DEMO])
    assert default["RSTBudget"].budget_seconds != 10.0
    by_flag = _callbacks(["--config", DEMO, "--budget", "10s"])
    assert by_flag["RSTBudget"].budget_seconds == 10.0
    by_name = _callbacks(["--config", DEMO, "--trainer.callbacks.RSTBudget.budget=2m",
                          "--trainer.callbacks.RunCheckpoint.every", "7"])
    assert by_name["RSTBudget"].budget_seconds == 120.0
    assert by_name["RunCheckpoint"].every == 7  # typed as YAML reads it: an int, a count of optimizer steps
    assert by_name["RSTBudget"].table is not None  # the rest of the callback as the config has it


def test_plan_takes_the_budget_by_flag_or_by_class_name_alike(capsys):
    plans = []
    for override in (["--budget", "45s"], ["--trainer.callbacks.RSTBudget.budget", "45s"], []):
        cli.main(["plan", "--config", DEMO, *override])
        plans.append(json.loads(capsys.readouterr().out))
    assert plans[0] == plans[1]
    assert plans[0]["optimizer_steps"] < plans[2]["optimizer_steps"]


def test_a_refused_argument_is_the_only_line_printed(corpus_file, tmp_path, capsys):
    """The parser's usage text is not printed before the error (the rows of docs/troubleshooting.md's table check
    each message)."""
    code, err = run_until_exit(tiny_fit_args(corpus_file, tmp_path, "--trainer.max_stepz", "4"), capsys)
    assert code == 2 and err == ["error: unrecognized arguments: --trainer.max_stepz 4 (train.py fit --help lists the options)"]


def test_a_project_subcommand_refuses_an_argument_in_one_line(capsys):
    code, err = run_until_exit(["export", "--no_such_option"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "train.py export --help lists the options" in err[0]


def test_lightnings_start_up_notes_are_left_out(corpus_file, tmp_path, capfd, monkeypatch):  # capfd: logging writes to the real stderr
    monkeypatch.setenv("NTNG_CACHE_DIR", str(tmp_path / "cache"))  # other tests expect the session's cache untouched
    cli.main(tiny_fit_args(corpus_file, tmp_path, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"))
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert "done: 2 steps" in output
    for note in ("💡 Tip", "litlogger", "GPU available", "TPU available"):
        assert note not in output, note
