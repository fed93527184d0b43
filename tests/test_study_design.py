"""The design of a study and its verdicts, on synthetic results (no training): which runs are tested against
what, how a setting is chosen, how failures count, when a finished run is reused.

Each test names the defect of the earlier `compare` it guards against.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core.errors import UserError
from studies.comparison import compare_rows
from studies.study import Method, Study, load_study
from studies.tuning import choose_settings, outcomes

LR = "model.init_args.learning_rate"


def _study(tmp_path: Path, methods: tuple[Method, ...], seeds=(0, 1, 2), tune_seeds=(), allow_failed=False) -> Study:
    return Study("synthetic", tmp_path / "study.yaml", ("base.yaml",), ("60s",), tuple(seeds), methods,
                 output=tmp_path / "out", tune_seeds=tuple(tune_seeds), allow_failed_seeds=allow_failed)


def _result(study: Study, method: str, setting: dict, seed: int, val_loss: float | None, status: str = "done",
            stage: str = "test") -> None:
    run = study.run(study.method(method), setting, "60s", seed, stage)
    run.directory.mkdir(parents=True, exist_ok=True)
    result = {"method": run.method, "variant": run.variant, "setting": setting, "budget": "60s", "seed": seed,
              "stage": stage, "status": status, "error": "" if status == "done" else f"error: {status}",
              "val_loss": val_loss, "train_loss": val_loss, "optimizer_steps": 10}
    (run.directory / "result.json").write_text(json.dumps(result))


def _table(study: Study) -> dict[str, dict]:
    choices = choose_settings(study)
    rows = outcomes(study.tuning_runs() + study.test_runs({k: c.setting for k, c in choices.items()}))
    return {e["method"]: e for e in compare_rows(study, rows, choices)}


GOOD, BAD = {LR: 0.003}, {LR: 50.0}
GOOD_LOSSES = {0: 6.4618, 1: 6.4688, 2: 6.4650}
BAD_LOSSES = {0: 90_000.0, 1: 250_000.0, 2: 40_000.0}


def test_a_twin_of_the_chosen_baseline_setting_is_compared_with_that_setting_alone(tmp_path):
    """Defect 1: the baseline's grid was pooled, so a method equal to the tuned baseline got a difference of
    -94,633.86 against the mixture of a good and a diverging learning rate."""
    study = _study(tmp_path, (Method("baseline", grid={LR: [0.003, 50.0]}), Method("twin", overrides=GOOD)))
    for seed in (0, 1, 2):
        _result(study, "baseline", GOOD, seed, GOOD_LOSSES[seed])
        _result(study, "baseline", BAD, seed, BAD_LOSSES[seed])
        _result(study, "twin", {}, seed, GOOD_LOSSES[seed])
    table = _table(study)
    assert table["baseline"]["setting"] == GOOD
    test = table["twin"]["val_loss_test"]
    assert test["difference"] == 0.0 and test["test"] == "paired" and test["p_value"] is None
    assert table["twin"]["verdict"].startswith("twin did not beat the baseline at 60 RST-seconds: not testable")


def test_a_method_is_tested_with_the_paired_test_when_every_seed_is_in_both_arms_and_welch_otherwise(tmp_path):
    """Defect 5's consequence: seeds of a method and the baseline share data, so the comparison is paired."""
    study = _study(tmp_path, (Method("baseline"), Method("m")))
    for seed, (b, m) in enumerate([(3.0, 2.9), (3.2, 3.0), (3.1, 3.0)]):
        _result(study, "baseline", {}, seed, b)
        _result(study, "m", {}, seed, m)
    paired = _table(study)["m"]["val_loss_test"]
    assert paired["test"] == "paired" and paired["difference"] == pytest.approx(-0.1333333, abs=1e-6)
    # differences -0.1, -0.2, -0.1: mean -0.1333, sd 0.05774, t = -4.0 on 2 df, p = 0.0572
    assert paired["t"] == pytest.approx(-4.0, abs=1e-6) and paired["p_value"] == pytest.approx(0.05719, abs=1e-4)
    assert paired["detectable_difference"] > abs(paired["difference"])  # three pairs: too few to tell it apart
    _result(study, "m", {}, 2, None, status="failed")
    welch = _table(study)["m"]["val_loss_test"]
    assert welch["test"] == "welch" and "not every seed finished" in welch["why"]


def test_a_setting_that_lost_a_seed_is_not_chosen_and_the_verdict_counts_the_loss(tmp_path):
    """Defect 3: a grid setting that diverged on 2 of 3 seeds was chosen on its one survivor, silently."""
    study = _study(tmp_path, (Method("baseline"), Method("lion", grid={LR: [1e-4, 1e-3]})))
    for seed in (0, 1, 2):
        _result(study, "baseline", {}, seed, 3.0 + seed / 100)
        _result(study, "lion", {LR: 1e-4}, seed, 2.95 + seed / 100)
    _result(study, "lion", {LR: 1e-3}, 0, 1.0)  # the best loss, on its one surviving seed
    _result(study, "lion", {LR: 1e-3}, 1, None, status="diverged")
    _result(study, "lion", {LR: 1e-3}, 2, None, status="failed")
    entry = _table(study)["lion"]
    assert entry["setting"] == {LR: 1e-4}
    lost = next(c for c in entry["candidates"] if c["setting"] == {LR: 1e-3})
    assert (lost["finished"], lost["failed"], lost["diverged"], lost["eligible"]) == (1, 1, 1, False)
    # allowed explicitly, the one survivor wins, and the verdict says on how many seeds
    study = _study(tmp_path, study.methods, allow_failed=True)
    entry = _table(study)["lion"]
    assert entry["setting"] == {LR: 1e-3} and (entry["finished"], entry["failed"], entry["diverged"]) == (1, 1, 1)
    assert "[on 1 of 3 seeds: 1 failed, 1 diverged]" in entry["verdict"]


def test_a_setting_chosen_on_the_tested_seeds_has_its_p_value_multiplied_by_the_grid_size(tmp_path):
    """Defect 4: selection and test used the same numbers, so with k settings false wins grew about k-fold."""
    study = _study(tmp_path, (Method("baseline"), Method("m", grid={LR: [1, 2, 3, 4]})))
    for seed, base in enumerate([3.0, 3.2, 3.1]):
        _result(study, "baseline", {}, seed, base)
        for lr in (1, 2, 3, 4):
            _result(study, "m", {LR: lr}, seed, base - 0.05 * lr - (0.01 if seed == 1 else 0.0))
    entry = _table(study)["m"]
    test = entry["val_loss_test"]
    assert entry["setting"] == {LR: 4} and entry["selected_on"] == "test" and test["bonferroni"] == 4
    assert test["p_adjusted"] == pytest.approx(min(1.0, 4 * test["p_value"]))
    assert "x4 Bonferroni" in entry["verdict"]


def test_with_tuning_seeds_only_the_chosen_setting_runs_on_the_study_seeds(tmp_path):
    """Defect 4, the cure: the grid is chosen on tune_seeds, then the chosen setting alone runs on seeds."""
    study = _study(tmp_path, (Method("baseline"), Method("m", grid={LR: [1, 2]})), seeds=(0, 1), tune_seeds=(100, 101))
    assert {(r.setting[LR], r.seed) for r in study.tuning_runs()} == {(1, 100), (1, 101), (2, 100), (2, 101)}
    assert not [r for r in study.test_runs({}) if r.method == "m"]  # nothing to test before the choice
    for seed in (100, 101):
        _result(study, "m", {LR: 1}, seed, 3.0, stage="tune")
        _result(study, "m", {LR: 2}, seed, 2.9, stage="tune")
    choice = choose_settings(study)[("m", "60s")]
    assert choice.decided and choice.setting == {LR: 2} and choice.selected_on == "tune"
    assert {(r.setting[LR], r.seed) for r in study.test_runs({("m", "60s"): choice.setting}) if r.method == "m"} == {
        (2, 0), (2, 1)}
    for seed in (0, 1):
        _result(study, "baseline", {}, seed, 3.0 + seed / 10)
        _result(study, "m", {LR: 2}, seed, 2.9 + seed / 10 + seed / 100)
    assert _table(study)["m"]["val_loss_test"]["bonferroni"] == 1


def _study_file(tmp_path: Path, **fields) -> Path:
    (tmp_path / "base.yaml").write_text("{}\n")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": "base.yaml", "budgets": ["60s"],
                                    "methods": [{"name": "baseline"}], **fields}))
    return path


def test_repeated_seeds_and_tuning_seeds_among_the_seeds_are_refused(tmp_path):
    """Defect 2: `seeds: [0, 0]` ran one run twice and reported agreement between its "seeds" as p = 0."""
    with pytest.raises(UserError, match=r"seeds repeats \[0\]"):
        load_study(_study_file(tmp_path, seeds=[0, 0]))
    with pytest.raises(UserError, match=r"tune_seeds \[1\] are also in seeds"):
        load_study(_study_file(tmp_path, seeds=[0, 1], tune_seeds=[1, 2]))
    assert load_study(_study_file(tmp_path, seeds=[0, 1], tune_seeds=[2, 3])).tune_seeds == (2, 3)


def test_a_prepare_command_naming_seed_runs_once_per_seed_and_the_others_once(tmp_path, monkeypatch):
    """RHO-loss's irreducible losses must be scored with each seed's masks (a seed sets the training masks), while
    its irreducible model is trained once: `{seed}` decides which commands run per seed."""
    import subprocess

    import studies.runner as runner

    commands: list[list[str]] = []
    monkeypatch.setattr(runner.subprocess, "run",
                        lambda args, **kw: commands.append(args[2:]) or subprocess.CompletedProcess(args, 0))
    method = Method("rho", prepare=("fit --trainer.logger.init_args.save_dir {study}/prepare",
                                    "score --seed_everything {seed} --output {study}/losses-seed{seed}.npy"))
    study = _study(tmp_path, (Method("baseline"), method))
    for seed in (0, 1, 0):
        runner.prepare(study, method, seed, log=lambda text: None)
    out = study.output
    assert commands == [["fit", "--trainer.logger.init_args.save_dir", f"{out}/prepare"],
                        ["score", "--seed_everything", "0", "--output", f"{out}/losses-seed0.npy"],
                        ["score", "--seed_everything", "1", "--output", f"{out}/losses-seed1.npy"]]
