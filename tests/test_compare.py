"""`train.py compare`: a tiny study end to end, resuming, failures, bad study files (the statistics: test_significance.py)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

import cli
from core.sealing import seal
from core.significance import paired_t_test, welch_t_test
from helpers import ROOT

TINY_OVERLAY = {
    "data": {"init_args": {"vocab_size": 200, "seq_len": 32, "batch_size": 16, "validation_fraction": 0.05,
                           "max_validation_sequences": 64}},
    "model": {"init_args": {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                            "learning_rate": 5e-3}},
    "trainer": {"val_check_interval": 4, "log_every_n_steps": 2},
}
TINY_TABLE = {"format": "rst-table/1", "seq_len": 32, "micro_batch_size": 16, "fwd_bwd_seconds": [1.0, 1.0],
              "fwd_seconds": [0.25, 0.25], "optimizer_step_seconds": {"AdamW": 0.0}}


def _study(tmp_path: Path, corpus: Path, methods: list[dict], **extra) -> Path:
    overlay = json.loads(json.dumps(TINY_OVERLAY))
    overlay["data"]["init_args"]["corpus"] = {"source": "files", "data_files": str(corpus)}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(overlay))
    (tmp_path / "table.json").write_text(json.dumps(seal(TINY_TABLE)))
    study = {"name": "tiny", "base": [str(ROOT / "configs/bert/demo.yaml"), "tiny.yaml"], "table": "table.json",
             "budgets": ["8s"], "seeds": [0, 1], "methods": methods, **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


BASELINE_AND_STACKING = [{"name": "baseline"}, {"name": "stacking", "configs": [str(ROOT / "configs/bert/demo-stacking.yaml")]}]


def _compare(study: Path, out: Path, *extra: str) -> None:
    cli.main(["compare", "--study", str(study), "--output", str(out), *extra])


@pytest.mark.slow
def test_a_tiny_study_writes_every_artefact_and_a_rerun_skips_finished_runs(corpus_file, tmp_path, capsys):
    evaluate = {"suite": "offline", "tasks": "reviews", "max_train_examples": 32, "max_eval_examples": 32, "epochs": 1}
    study = _study(tmp_path, corpus_file, BASELINE_AND_STACKING, evaluate=evaluate)
    out = tmp_path / "study"
    _compare(study, out)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], r["budget"], r["seed"], r["status"]) for r in rows] == [
        ("baseline", "8s", "0", "done"), ("baseline", "8s", "1", "done"),
        ("stacking", "8s", "0", "done"), ("stacking", "8s", "1", "done")]
    for r in rows:
        assert int(r["optimizer_steps"]) == 8  # 1 RST-second per step at either depth
        assert float(r["rst_spent_seconds"]) == pytest.approx(8.0)
        assert float(r["val_loss"]) > 0 and float(r["train_loss"]) > 0 and 0 <= float(r["downstream_average"]) <= 100
        assert int(r["tokens"]) == 8 * 16 * 32
    for artefact in ("report.md", "val_loss_vs_rst.png", "train_loss_vs_rst.png", "downstream.png", "comparison.json"):
        assert (out / artefact).stat().st_size > 0, artefact
    report = (out / "report.md").read_text()
    assert "beat the baseline at 8 RST-seconds" in report and "(paired)" in report  # both seeds in both arms
    comparison = json.loads((out / "comparison.json").read_text())
    stacking = next(e for e in comparison if e["method"] == "stacking")
    values = [float(r["val_loss"]) for r in rows if r["method"] == "stacking"]
    assert stacking["val_loss_mean"] == pytest.approx(sum(values) / 2)
    assert stacking["val_loss_test"]["p_value"] == pytest.approx(paired_t_test(
        values, [float(r["val_loss"]) for r in rows if r["method"] == "baseline"]).p_value)
    assert len(list((out / "hparams").iterdir())) == 4
    logs = {p: p.stat().st_mtime for p in out.glob("runs/*/*/*/fit.log")}
    assert len(logs) == 4
    capsys.readouterr()
    _compare(study, out)
    assert capsys.readouterr().out.count("done, skipped") == 4
    assert {p: p.stat().st_mtime for p in logs} == logs  # nothing ran again


@pytest.mark.slow
def test_an_interrupted_run_continues_from_its_last_checkpoint(corpus_file, tmp_path, capsys):
    study = _study(tmp_path, corpus_file, [{"name": "baseline"}], seeds=[0])
    out = tmp_path / "study"
    run_dir = out / "runs" / "baseline" / "8s" / "seed0"
    _compare(study, out, "--launcher", "print")  # writes nothing but the commands; resolves every config
    assert capsys.readouterr().out.count("--run baseline/8s/seed0") == 1
    from studies.run_config import resolved_config
    from studies.study import load_study

    loaded = load_study(study, out)
    config = resolved_config(loaded, loaded.test_runs({})[0])
    config["trainer"]["max_steps"] = 4  # the same run, stopped after 4 of its 8 steps
    run_dir.mkdir(parents=True)
    (run_dir / "half.yaml").write_text(yaml.safe_dump(config))
    cli.main(["fit", "--config", str(run_dir / "half.yaml")])  # "interrupted" after 4 of its 8 steps
    assert (run_dir / "tb/run/checkpoints/last.ckpt").is_file() and not (run_dir / "result.json").exists()
    _compare(study, out)
    assert "continuing from" in capsys.readouterr().out
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "done" and result["optimizer_steps"] == 8 and result["rst_spent_seconds"] == pytest.approx(8.0)


@pytest.mark.slow
def test_a_method_whose_runs_fail_is_reported_as_failed(corpus_file, tmp_path):
    methods = [{"name": "baseline"}, {"name": "broken", "overrides": {"model.init_args.num_heads": 3}}]
    study = _study(tmp_path, corpus_file, methods, seeds=[0])
    out = tmp_path / "study"
    _compare(study, out)
    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["baseline"]["status"] == "done"
    assert rows["broken"]["status"] == "failed" and "num_heads" in rows["broken"]["error"]
    report = (out / "report.md").read_text()
    assert "| 8s | broken | failed | 0 / 1 / 0 |" in report and "broken at 8s: errors: error:" in report


def _one_line_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1, err
    return err[0]


def test_bad_study_files_are_refused_in_one_line_before_any_run(corpus_file, tmp_path, capsys):
    out = tmp_path / "study"
    cases = [
        ([{"name": "stacking", "configs": [str(ROOT / "configs/bert/demo-stacking.yaml")]}], {}, "no method named 'baseline'"),
        ([{"name": "baseline"}, {"name": "x", "overrides": {"model.init_args.optimizer": {"class_path": "nope.Nope"}}}], {},
         "cannot import 'nope.Nope': no module named 'nope'"),
        ([{"name": "baseline"}], {"table": "missing.json"}, "table 'missing.json' does not exist"),
        ([{"name": "baseline"}], {"evaluate": {"suite": "offline", "control": "other"}},
         "evaluate: unknown control 'other'; the control is random-init"),
    ]
    for methods, extra, message in cases:
        study = _study(tmp_path, corpus_file, methods)
        if extra:
            raw = yaml.safe_load(study.read_text())
            raw.update(extra)
            study.write_text(yaml.safe_dump(raw))
        assert message in _one_line_error(["compare", "--study", str(study), "--output", str(out)], capsys)
        assert not (out / "runs").exists()


@pytest.mark.slow
def test_the_shipped_studies_resolve_every_run():
    from studies.run_config import resolved_config
    from studies.study import load_study

    for path in sorted((ROOT / "configs/studies").glob("*.yaml")):
        study = load_study(path)
        runs = study.tuning_runs() + [study.run(m, s, b, seed) for m in study.methods for s in m.settings()
                                      for b in study.budgets for seed in study.seeds]
        assert "baseline" in {r.method for r in runs} and len({r.method for r in runs}) >= 2, path
        for run in runs:
            config = resolved_config(study, run)
            assert config["seed_everything"] == run.seed


@pytest.mark.slow
def test_a_tiny_real_study_tests_against_the_chosen_baseline_and_counts_a_failed_seed(corpus_file, tmp_path,
                                                                                       monkeypatch):
    """Defects 1 and 3 end to end: a baseline tuned over a good and a very bad learning rate, a twin of the
    baseline under another name, and a method that fails on one of the two seeds."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # the failing probe lives beside the tests
    (tmp_path / "flaky.yaml").write_text(yaml.safe_dump(
        {"trainer": {"callbacks+": [{"class_path": "ddp_probe.FailOnSeed", "init_args": {"seed": 1}}]}}))
    methods = [{"name": "baseline", "grid": {"model.init_args.learning_rate": [5e-3, 50.0]}},
               {"name": "twin", "overrides": {"model.init_args.learning_rate": 5e-3}},
               {"name": "flaky", "configs": [str(tmp_path / "flaky.yaml")]}]
    out = tmp_path / "study"
    _compare(_study(tmp_path, corpus_file, methods), out)
    table = {e["method"]: e for e in json.loads((out / "comparison.json").read_text())}
    assert table["baseline"]["setting"] == {"model.init_args.learning_rate": 5e-3}
    assert table["twin"]["val_loss_test"]["difference"] == 0.0  # the same runs, seed for seed
    assert table["twin"]["verdict"].startswith("twin did not beat the baseline at 8 RST-seconds")
    assert (table["flaky"]["finished"], table["flaky"]["failed"]) == (1, 1)
    assert "[on 1 of 2 seeds: 1 failed]" in table["flaky"]["verdict"]
    report = (out / "report.md").read_text()
    assert "| 8s | flaky | - | 1 / 1 / 0 |" in report


def test_a_rerun_reuses_only_runs_whose_configuration_is_unchanged(corpus_file, tmp_path, monkeypatch):
    """Defect 6: a rerun skipped every finished run without comparing its configuration with the one the study
    resolves now, so an edited override mixed old and new runs in one report."""
    import studies.runner as runner

    executed: list[str] = []

    def fake_execute(study, run, log=print):  # records the run, writes a finished result with its config hash
        from studies.run_config import config_hash, resolved_config

        executed.append(run.run_id)
        run.directory.mkdir(parents=True, exist_ok=True)
        result = {"method": run.method, "variant": run.variant, "setting": run.setting, "budget": run.budget,
                  "seed": run.seed, "stage": run.stage, "status": "done", "error": "", "val_loss": 3.0 + run.seed,
                  "optimizer_steps": 8, "wall_seconds": 1.0, "config_hash": config_hash(resolved_config(study, run))}
        (run.directory / "result.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(runner, "execute", fake_execute)
    monkeypatch.setattr(runner, "write_report", lambda study, log=print: None)
    methods = [{"name": "baseline"}, {"name": "m", "overrides": {"model.init_args.learning_rate": 1e-3}}]
    study_file, out = _study(tmp_path, corpus_file, methods), tmp_path / "study"
    _compare(study_file, out)
    assert sorted(executed) == ["baseline/8s/seed0", "baseline/8s/seed1", "m/8s/seed0", "m/8s/seed1"]
    executed.clear()
    _compare(study_file, out)
    assert executed == []  # nothing changed: everything reused
    raw = yaml.safe_load(study_file.read_text())
    raw["methods"][1]["overrides"]["model.init_args.learning_rate"] = 2e-3  # an edited override
    study_file.write_text(yaml.safe_dump(raw))
    _compare(study_file, out, "--keep-stale")
    assert executed == [] and json.loads((out / "stale.json").read_text())["kept"] == ["m/8s/seed0", "m/8s/seed1"]
    _compare(study_file, out)
    assert sorted(executed) == ["m/8s/seed0", "m/8s/seed1"]  # only the changed method runs again
    assert json.loads((out / "stale.json").read_text())["rerun"] == ["m/8s/seed0", "m/8s/seed1"]


def _downstream(seed_scores: dict[int, float], architecture: str, **extra) -> dict:
    """An evaluate result of one task whose one reported score is ``seed_scores`` (seed -> score)."""
    scores = list(seed_scores.values())
    median = sorted(scores)[len(scores) // 2]
    reported = {"validation/accuracy": {"median": median, "min": min(scores), "max": max(scores),
                                        "by_seed": {str(k): v for k, v in seed_scores.items()}}}
    return {"suite": "offline", "tasks": {"reviews": {"reported": reported, "score": median}}, "average": median,
            "architecture": architecture, "seeds": list(seed_scores), **extra}


def _fake_fit_and_evaluate(monkeypatch, fail_controls: set[str] = frozenset()) -> list[list[str]]:
    """``train.py fit`` finishes at once (a canned summary) and ``train.py evaluate`` writes a canned result: method
    ``wide`` exports architecture ``b...``, every other method ``a...``; the evaluate commands are recorded."""
    import subprocess
    import types

    import studies.runner as runner

    evaluations: list[list[str]] = []

    def fake_run(args, **kwargs):
        command = [str(a) for a in args[2:]]
        if command[0] == "evaluate":
            evaluations.append(command)
            output = Path(command[command.index("--output") + 1])
            architecture = "b" * 16 if "/wide/" in command[command.index("--ckpt_path") + 1] else "a" * 16
            if "--control" in command and architecture in fail_controls:
                kwargs["stdout"].write("error: the control failed\n")
                return subprocess.CompletedProcess(args, 1)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(_downstream({0: 70.0, 1: 72.0, 2: 74.0}, architecture)))
        return subprocess.CompletedProcess(args, 0)

    summary = types.SimpleNamespace(status="finished", error="", optimizer_steps=8, tokens=4096, val_loss=3.0,
                                    train_loss=3.1, rst_seconds=8.0)
    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    monkeypatch.setattr(runner, "read_summary", lambda log_dir: summary)
    monkeypatch.setattr(runner, "write_report", lambda study, log=print: None)
    return evaluations


CONTROL_STUDY = dict(seeds=[0], evaluate={"suite": "offline", "tasks": "reviews", "seeds": [0, 1, 2], "epochs": 1,
                                          "control": "random-init"})
TWO_ARCHITECTURES = [{"name": "baseline"}, {"name": "twin", "overrides": {"model.init_args.learning_rate": 1e-3}},
                     {"name": "wide", "overrides": {"model.init_args.hidden_size": 64}}]


def test_the_random_init_control_runs_once_per_architecture_and_not_again(corpus_file, tmp_path, monkeypatch):
    """Two tested runs of one architecture and one of another: two control evaluations, each with the study's
    evaluate settings and seeds, into <study>/controls/<architecture>/; a second invocation runs none."""
    evaluations = _fake_fit_and_evaluate(monkeypatch)
    study_file, out = _study(tmp_path, corpus_file, TWO_ARCHITECTURES, **CONTROL_STUDY), tmp_path / "study"
    _compare(study_file, out)
    runs = [c for c in evaluations if "--control" not in c]
    controls = [c for c in evaluations if "--control" in c]
    assert len(runs) == 3 and not any({"random-init", "--control_only"} & set(c) for c in runs)  # never a run's flag
    assert [c[c.index("--output") + 1] for c in controls] == [
        str(out / "controls" / ("a" * 16) / "downstream.json"), str(out / "controls" / ("b" * 16) / "downstream.json")]
    for control, method in zip(controls, ("baseline", "wide"), strict=True):
        assert control[control.index("--control") + 1] == "random-init" and "--control_only" in control
        assert control[control.index("--ckpt_path") + 1] == str(out / "runs" / method / "8s" / "seed0" / "tb/run/checkpoints/last.ckpt")
        settings = control[control.index("--suite"):control.index("--control")]
        assert dict(zip(settings[::2], settings[1::2], strict=True)) == {
            "--suite": "offline", "--seeds": "0,1,2", "--tasks": "reviews", "--epochs": "1"}
        assert (Path(control[control.index("--output") + 1]).parent / "evaluate.log").is_file()
    result = json.loads((out / "runs" / "baseline" / "8s" / "seed0" / "result.json").read_text())
    assert result["downstream"]["architecture"] == "a" * 16
    assert result["downstream"]["seed_averages"] == {"0": 70.0, "1": 72.0, "2": 74.0}
    evaluations.clear()
    _compare(study_file, out)
    assert evaluations == []  # every run finished and every architecture has its control


def test_a_failed_control_fails_no_run_and_runs_again_on_the_next_invocation(corpus_file, tmp_path, monkeypatch, capsys):
    evaluations = _fake_fit_and_evaluate(monkeypatch, fail_controls={"b" * 16})
    study_file, out = _study(tmp_path, corpus_file, TWO_ARCHITECTURES, **CONTROL_STUDY), tmp_path / "study"
    _compare(study_file, out)
    assert "control of architecture bbbbbbbbbbbbbbbb failed (error: the control failed)" in capsys.readouterr().out
    statuses = {p.parent.parent.parent.name: json.loads(p.read_text())["status"] for p in out.glob("runs/*/*/*/result.json")}
    assert statuses == {"baseline": "done", "twin": "done", "wide": "done"}
    from studies.report import read_controls
    from studies.study import load_study

    controls, failed = read_controls(load_study(study_file, out))
    assert list(controls) == ["a" * 16] and failed == {"b" * 16: "error: the control failed"}
    evaluations.clear()
    _compare(study_file, out)
    assert [c[c.index("--output") + 1] for c in evaluations] == [str(out / "controls" / ("b" * 16) / "downstream.json")]


def test_the_report_gives_every_method_its_pretraining_gain_over_the_control(tmp_path, monkeypatch):
    """Run averages 70, 72 and 74 against the control's per-seed averages 60, 61 and 62: a gain of 11.0, Welch's
    interval and p; a method without downstream scores gets none."""
    import studies.report as report
    from studies.comparison import gain_over_control
    from studies.study import Method, Study

    gain = gain_over_control([70.0, 72.0, 74.0], [60.0, 61.0, 62.0])
    welch = welch_t_test([70.0, 72.0, 74.0], [60.0, 61.0, 62.0])
    assert gain["gain"] == pytest.approx(11.0) and gain["control_mean"] == pytest.approx(61.0)
    assert (gain["low"], gain["high"], gain["p_value"]) == pytest.approx((welch.low, welch.high, welch.p_value))
    assert gain["test"] == "welch" and welch.p_value < 0.05
    one = gain_over_control([70.0], [60.0, 61.0, 62.0])  # one run: a gain, no interval or p
    assert one["gain"] == pytest.approx(9.0) and one["p_value"] is None and one["low"] is None
    assert gain_over_control([], [60.0]) is None

    study = Study("gain", tmp_path / "study.yaml", ("base.yaml",), ("60s",), (0, 1, 2),
                  (Method("baseline"), Method("m")), output=tmp_path / "out",
                  evaluate={"suite": "offline", "control": "random-init"})
    architecture = "c" * 16
    for method, averages in (("baseline", [70.0, 72.0, 74.0]), ("m", [None] * 3)):
        for seed, average in enumerate(averages):
            run = study.run(study.method(method), {}, "60s", seed)
            run.directory.mkdir(parents=True)
            downstream = {"average": average, "architecture": architecture} if average is not None else None
            (run.directory / "result.json").write_text(json.dumps({
                "method": method, "variant": method, "setting": {}, "budget": "60s", "seed": seed, "stage": "test",
                "status": "done", "error": "", "val_loss": 3.0 + seed / 10, "train_loss": 3.0, "optimizer_steps": 10,
                "downstream": downstream}))
    control = study.control_directory(architecture) / "downstream.json"
    control.parent.mkdir(parents=True)
    control.write_text(json.dumps(_downstream({0: 60.0, 1: 61.0, 2: 62.0}, architecture, weights="random-init control")))
    monkeypatch.setattr(report, "write_plots", lambda study, rows, out: [])
    monkeypatch.setattr(report, "write_hparams", lambda study, rows, out: None)
    report.write_report(study, log=lambda text: None)
    entries = {e["method"]: e for e in json.loads((study.output / "comparison.json").read_text())}
    assert entries["baseline"]["pretraining_gain"] == pytest.approx({**gain, "architecture": architecture})
    assert entries["m"]["pretraining_gain"] is None
    markdown = (study.output / "report.md").read_text()
    assert "## Pre-training gain: the random-init control" in markdown
    assert (f"| 60s | baseline | - | 72.00 (3) | 61.00 (3) | +11.00 ({welch.low:+.2f}, {welch.high:+.2f}) | "
            f"{welch.p_value:.3g} (welch) |") in markdown
    assert "| 60s | m | - | | | n/a | |" in markdown
    assert f"Architecture `{architecture}`: the random-init control's downstream average 61.00" in markdown


def test_the_mini_study_lists_the_runs_its_header_counts():
    """configs/studies/mini.yaml's header counts 18 tuning fits and 30 tested fits (and RHO-loss's preparation):
    6 optimizers x 3 learning rates on 1 tuning seed, then 10 methods x 3 seeds."""
    from studies.study import load_study

    study = load_study(ROOT / "configs/studies/mini.yaml")
    assert study.budgets == ("900s",) and study.seeds == (0, 1, 2) and study.tune_seeds == (100,)
    assert study.control == "random-init" and study.evaluate["seeds"] == [0, 1, 2]
    tuned = {m.name for m in study.methods if study.tuned_on_own_seeds(m)}
    assert tuned == {"baseline", "lion", "sophia", "muon", "soap", "schedule-free"}
    assert all(len(m.settings()) == 3 for m in study.methods if m.name in tuned)
    assert len(study.tuning_runs()) == 18 and {r.seed for r in study.tuning_runs()} == {100}
    assert len(study.test_runs({})) == 12  # the untuned methods, before any setting is chosen
    chosen = {(m.name, "900s"): m.settings()[1] for m in study.methods if m.name in tuned}
    runs = study.test_runs(chosen)
    assert len(runs) == 30 and {r.method for r in runs} == {m.name for m in study.methods} and len(study.methods) == 10
    prepare = study.method("rho-loss").prepare
    assert [("{seed}" in c) for c in prepare] == [False, True]  # 1 fit, 1 scoring per seed
    header = (ROOT / "configs/studies/mini.yaml").read_text()
    assert "18 tuning fits" in header and "30 tested fits" in header and "= 48 fits" in header


def test_printed_commands_run_from_anywhere_with_absolute_paths_and_pythonpath(corpus_file, tmp_path, capsys, monkeypatch):
    import shlex

    _study(tmp_path, corpus_file, [{"name": "baseline"}], seeds=[0])
    (tmp_path / "mymethods").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", "mymethods")  # a user's own methods, given relative to where they work
    _compare(Path("study.yaml"), Path("study-out"), "--launcher", "print")
    lines = [line for line in capsys.readouterr().out.splitlines() if "--run" in line]
    assert len(lines) == 1
    words = shlex.split(lines[0])
    assert words[0] == "env" and words[1].startswith("PYTHONPATH=")
    assert words[1].removeprefix("PYTHONPATH=").split(os.pathsep) == [str(ROOT.resolve()), str(tmp_path.resolve() / "mymethods")]
    assert words[words.index("--study") + 1] == str(tmp_path.resolve() / "study.yaml")
    assert words[words.index("--output") + 1] == str(tmp_path.resolve() / "study-out")
    assert Path(words[3]).is_absolute() and Path(words[3]).name == "train.py"
