"""The "When things go wrong" table of docs/troubleshooting.md, row by row: each bad file or value gets the one
line the table shows (``…`` stands for the parts that vary), exit status 2, before any work, leaving no run folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import cli
from core.checkpoints import write_fingerprint
from core.cost_table import CostTable
from helpers import doc, fit_fingerprint, run_until_exit, tiny_fit_args

SECTION = "## When things go wrong"


def table_rows() -> dict[str, str]:
    """``"input: problem"`` -> the error line, from the table in docs/troubleshooting.md."""
    text = doc("troubleshooting.md")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) == 3 and cells[2].startswith("`` error:"):
            rows[f"{cells[0]}: {cells[1]}"] = cells[2][3:-3]  # a double-backtick code span: it holds backticks
    return rows


def _error(args: list[str], capsys) -> str:
    code, err = run_until_exit(args, capsys)
    assert code == 2
    return err[-1]


def _budget(tmp_path: Path, budget="20s", table: str | None = None, every: str | int | None = None) -> Path:
    if table is None:
        table = str(tmp_path / "table.json")
        CostTable.from_dict({"format": "rst-table/1", "seq_len": 32, "micro_batch_size": 16, "fwd_bwd_seconds": [1, 1],
                             "optimizer_step_seconds": {"AdamW": 0.1}}).save(table)
    callbacks = [{"class_path": "callbacks.rst.RSTBudget", "init_args": {"budget": budget, "table": table}}]
    if every is not None:
        callbacks.append({"class_path": "callbacks.checkpointing.RunCheckpoint", "init_args": {"every": every}})
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"max_steps": -1, "callbacks": callbacks}}))
    return path


@pytest.fixture(scope="module")
def trained(corpus_file, tmp_path_factory):
    """A 2-step tiny run and its irreducible-loss file (for the checkpoint and RHO-loss rows)."""
    out = tmp_path_factory.mktemp("trained")
    args = tiny_fit_args(corpus_file, out, "--data.holdout_fraction", "0.2", "--trainer.max_steps", "2")
    cli.main(args)
    checkpoint = out / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt"
    losses = out / "il.npy"
    cli.main(["score", *args[1:], "--ckpt_path", str(checkpoint), "--output", str(losses)])
    return {"checkpoint": checkpoint, "losses": losses}


def _rho(tmp_path: Path, losses: Path) -> Path:
    path = tmp_path / "rho.yaml"
    path.write_text(yaml.safe_dump({"data": {"init_args": {"holdout_fraction": 0.2}}, "trainer": {"callbacks+": [
        {"class_path": "callbacks.rho_loss.RhoLoss", "init_args": {"irreducible_losses": str(losses)}}]}}))
    return path


def _copy_losses(trained, tmp_path: Path) -> Path:
    target = tmp_path / "il.npy"
    shutil.copy(trained["losses"], target)
    shutil.copy(trained["losses"].with_suffix(".json"), target.with_suffix(".json"))
    return target


def _study(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def scenario(name):
    def register(function):
        SCENARIOS[name] = function
        return function
    return register


SCENARIOS = {}


@scenario("corpus: no file matches data.corpus.data_files")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(t / "missing-*.txt", t), capsys)


@scenario("corpus: an empty file")
def _(t, corpus, trained, capsys):
    (t / "empty.txt").write_text("")
    return _error(tiny_fit_args(t / "empty.txt", t), capsys)


@scenario("corpus: too little text for one optimizer step")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--trainer.accumulate_grad_batches", "1000"), capsys)


@scenario("corpus: a file that is not UTF-8 text")
def _(t, corpus, trained, capsys):
    (t / "latin1.txt").write_bytes(corpus.read_bytes() + "café au lait\n".encode("latin-1"))
    line = _error(tiny_fit_args(t / "latin1.txt", t), capsys)
    assert f"byte {len(corpus.read_bytes()) + 3:,} (0xe9)" in line  # the offset of the é
    return line


@scenario("command line: an option the config does not have")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--trainer.max_stepz", "4"), capsys)


@scenario("command line: a class whose module is not importable")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--model.class_path", "mymethods.Sketch"), capsys)


@scenario("command line: --budget without an RSTBudget callback")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--budget", "10s"), capsys)


@scenario("command line: a callback argument for a callback the config lacks")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--trainer.callbacks.Stacking.schedule", "x"), capsys)


@scenario("corpus: an unknown data.corpus.source")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--data.corpus.source", "wikipedia"), capsys)


@scenario("tokenizer: data.tokenizer_path without tokenizer.json")
def _(t, corpus, trained, capsys):
    (t / "tok").mkdir()
    return _error(tiny_fit_args(corpus, t, "--data.tokenizer_path", str(t / "tok")), capsys)


@scenario("cost table: the file does not exist")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--config", str(_budget(t, table=str(t / "none.json")))), capsys)


@scenario("cost table: not JSON")
def _(t, corpus, trained, capsys):
    (t / "bad.json").write_text("{fwd_bwd_seconds: [1")
    return _error(tiny_fit_args(corpus, t, "--config", str(_budget(t, table=str(t / "bad.json")))), capsys)


@scenario("cost table: edited by hand")
def _(t, corpus, trained, capsys):
    config = _budget(t)
    data = json.loads((t / "table.json").read_text())
    data["fwd_bwd_seconds"] = [0.1, 0.1]
    (t / "table.json").write_text(json.dumps(data))
    return _error(tiny_fit_args(corpus, t, "--config", str(config)), capsys)


@scenario("cost table: measured for another micro-batch")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--config", str(_budget(t)), "--data.batch_size", "8"), capsys)


@scenario("duration: a budget it cannot read")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--config", str(_budget(t, budget="ten minutes"))), capsys)


@scenario("duration: a checkpoint interval it cannot read")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--config", str(_budget(t, every="10x"))), capsys)


@scenario("irreducible losses: the .npy does not exist")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--config", str(_rho(t, t / "none.npy"))), capsys)


@scenario("irreducible losses: scored for other examples")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--config", str(_rho(t, trained["losses"])), "--data.holdout_fraction",
                                "0.1"), capsys)


@scenario("irreducible losses: the sidecar edited")
def _(t, corpus, trained, capsys):
    losses = _copy_losses(trained, t)
    sidecar = json.loads(losses.with_suffix(".json").read_text())
    losses.with_suffix(".json").write_text(json.dumps({**sidecar, "passes": 2}))
    return _error(tiny_fit_args(corpus, t, "--config", str(_rho(t, losses))), capsys)


@scenario("irreducible losses: the .npy replaced")
def _(t, corpus, trained, capsys):
    losses = _copy_losses(trained, t)
    np.save(losses, np.ones_like(np.load(losses)))
    return _error(tiny_fit_args(corpus, t, "--config", str(_rho(t, losses))), capsys)


@scenario("irreducible losses: scored for fewer passes than the run reads")
def _(t, corpus, trained, capsys):
    losses = t / "il.npy"  # one pass, scored here on this session's data cache; the run reads five
    cli.main(["score", *tiny_fit_args(corpus, t, "--data.holdout_fraction", "0.2")[1:], "--ckpt_path",
              str(trained["checkpoint"]), "--output", str(losses)])
    return _error(tiny_fit_args(corpus, t, "--config", str(_rho(t, losses))), capsys)


@scenario("checkpoint: no such file")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--ckpt_path", str(t / "none.ckpt")), capsys)


@scenario("checkpoint: truncated or corrupt")
def _(t, corpus, trained, capsys):
    broken = t / "broken.ckpt"
    broken.write_bytes(trained["checkpoint"].read_bytes()[:1000])
    return _error(tiny_fit_args(corpus, t, "--ckpt_path", str(broken)), capsys)


@scenario("checkpoint: --ckpt_path last-good with every checkpoint damaged")
def _(t, corpus, trained, capsys):
    damaged = t / "runs" / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(trained["checkpoint"].read_bytes()[:1000])
    args = tiny_fit_args(corpus, t / "runs", "--ckpt_path", "last-good")
    write_fingerprint(damaged.parent.parent, fit_fingerprint(args))  # a run of this very configuration
    return _error(args, capsys)


@scenario("checkpoint: holds objects that need full unpickling")
def _(t, corpus, trained, capsys):
    import fractions

    import torch

    state = torch.load(trained["checkpoint"], weights_only=True)
    torch.save({**state, "extra": fractions.Fraction(1, 3)}, t / "foreign.ckpt")
    return _error(tiny_fit_args(corpus, t, "--ckpt_path", str(t / "foreign.ckpt")), capsys)


@scenario("checkpoint: a budget in another mode")
def _(t, corpus, trained, capsys):
    config = t / "wall.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"max_steps": -1, "callbacks": [
        {"class_path": "callbacks.rst.RSTBudget", "init_args": {"budget": "20s", "mode": "wall"}}]}}))
    table_run = t / "table-run"
    cli.main(tiny_fit_args(corpus, table_run, "--config", str(_budget(t, every=100)), "--trainer.max_steps", "1"))
    checkpoint = table_run / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt"
    return _error(tiny_fit_args(corpus, t, "--config", str(config), "--ckpt_path", str(checkpoint)), capsys)


@scenario("checkpoint: resumed with another seed")
def _(t, corpus, trained, capsys):
    return _error(tiny_fit_args(corpus, t, "--data.holdout_fraction", "0.2", "--ckpt_path", str(trained["checkpoint"]),
                                "--seed_everything", "1"), capsys)


@scenario("study file: no such file")
def _(t, corpus, trained, capsys):
    return _error(["compare", "--study", str(t / "none.yaml")], capsys)


@scenario("study file: not YAML")
def _(t, corpus, trained, capsys):
    return _error(["compare", "--study", str(_study(t, "name: [unclosed\nbase: x\n"))], capsys)


@scenario("study file: an unknown key")
def _(t, corpus, trained, capsys):
    return _error(["compare", "--study", str(_study(t, "name: s\nbudget: 60s\n"))], capsys)


@scenario("study file: a repeated seed")
def _(t, corpus, trained, capsys):
    text = "name: s\nbase: configs/bert/demo.yaml\nbudgets: [60s]\nseeds: [0, 0]\nmethods:\n  - name: baseline\n"
    return _error(["compare", "--study", str(_study(t, text))], capsys)


@scenario("study file: no baseline method")
def _(t, corpus, trained, capsys):
    text = "name: s\nbase: configs/bert/demo.yaml\nbudgets: [60s]\nmethods:\n  - name: stacking\n"
    return _error(["compare", "--study", str(_study(t, text))], capsys)


@scenario("suite: an unknown suite name")
def _(t, corpus, trained, capsys):
    return _error(["evaluate", "--ckpt_path", str(trained["checkpoint"]), "--suite", "glu", "--output",
                   str(t / "out.json")], capsys)


@scenario("suite: a task not in the suite")
def _(t, corpus, trained, capsys):
    return _error(["evaluate", "--ckpt_path", str(trained["checkpoint"]), "--suite", "glue", "--tasks", "mnli,qqq",
                   "--output", str(t / "out.json")], capsys)


def _pattern(table_line: str) -> str:
    return ".*".join(re.escape(part) for part in table_line.split("…"))


def test_every_row_of_the_troubleshooting_table_has_a_scenario_and_every_scenario_a_row():
    assert sorted(table_rows()) == sorted(SCENARIOS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_error_is_the_one_the_troubleshooting_table_shows(name, corpus_file, trained, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    capsys.readouterr()
    line = SCENARIOS[name](work, corpus_file, trained, capsys)
    expected = table_rows().get(name, "")
    assert re.fullmatch(_pattern(expected), line), (expected, line)
    assert not (work / "bert-demo").exists()  # no run folder: the error came before any work
    assert not (work / "runs" / "bert-demo" / "version_1").exists()
