"""Running a study: every run as its own ``train.py fit`` process (then ``train.py evaluate``), here one after
another (``local``) or handed to a cluster (``print``: one command per line; ``slurm``: a job-array script).

A finished run (``result.json``: ``done``, or ``diverged`` on non-finite numbers) is skipped when the study runs
again, as long as its configuration is unchanged (the hash of its resolved configuration is stored with it); a run
whose configuration changed is run again from scratch, or kept and flagged with ``--keep-stale``. An interrupted
run continues from its ``last.ckpt`` if its configuration is unchanged. A failed run is recorded with its error
and tried again on the next invocation. A fit's result is read from the ``summary.json`` it writes
(``training.summary``), never from its printed output. Methods with a grid and ``tune_seeds`` run in two stages: the
tuning runs first, then the chosen setting on the study's seeds (``studies.tuning``). With ``evaluate: {control:
random-init}`` the first tested run of each architecture to be evaluated also runs the control of that architecture
(``<study>/controls/<architecture>/downstream.json``), once for the whole study.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from core.errors import UserError
from studies.control import suite_seed_scores
from studies.report import write_report
from studies.run_config import config_hash, resolved_config
from studies.study import ROOT, TRAIN, Method, Run, Study, resolve_path, run_status, slug
from studies.tuning import FINISHED, choose_settings
from training.summary import read_summary

__all__ = ["execute", "prepare", "run_control", "run_study"]


def _python_path() -> str:
    """``PYTHONPATH`` for a run started elsewhere: the toolkit, then this process's entries made absolute (where a
    user's own methods live)."""
    entries = [str(ROOT.resolve())]
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and str(Path(entry).resolve()) not in entries:
            entries.append(str(Path(entry).resolve()))
    return os.pathsep.join(entries)


def _command(study_file: Path, output: Path, run_id: str) -> str:
    """One run's command for ``--launcher print|slurm``: absolute paths and the ``PYTHONPATH`` it needs, so that it
    runs from any directory, in a job that does not inherit this shell's environment."""
    return shlex.join(["env", f"PYTHONPATH={_python_path()}", sys.executable, str(TRAIN.resolve()), "compare",
                       "--study", str(study_file.resolve()), "--output", str(output.resolve()), "--run", run_id])


def stored_hash(run: Run) -> str | None:
    """The configuration hash a run was started (``progress.json``) or finished (``result.json``) with."""
    for name in ("result.json", "progress.json"):
        path = run.directory / name
        if path.is_file():
            return json.loads(path.read_text()).get("config_hash")
    return None


def execute(study: Study, run: Run, log=print) -> dict[str, Any]:
    """Fit (continuing from the run's last checkpoint if there is one), then evaluate; write ``result.json``."""
    run.directory.mkdir(parents=True, exist_ok=True)
    config = resolved_config(study, run)
    config_file = run.directory / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    progress_file = run.directory / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {"wall_seconds": 0.0, "attempts": 0}
    progress["config_hash"] = config_hash(config)
    command = [sys.executable, str(TRAIN), "fit", "--config", str(config_file)]
    if run.last_checkpoint.is_file():
        command += ["--ckpt_path", str(run.last_checkpoint)]
        log(f"  {run.run_id}: continuing from {run.last_checkpoint}")
    result: dict[str, Any] = {"method": run.method, "variant": run.variant, "setting": run.setting, "budget": run.budget,
                              "seed": run.seed, "stage": run.stage, "directory": str(run.directory),
                              "config_hash": progress["config_hash"]}
    start = time.perf_counter()
    with open(run.directory / "fit.log", "a") as output:
        completed = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=_environment())
    progress["wall_seconds"] += time.perf_counter() - start
    progress["attempts"] += 1
    progress_file.write_text(json.dumps(progress))
    summary = read_summary(run.log_dir)
    if summary is not None and summary.status == "diverged":
        result.update(status="diverged", error=summary.error, optimizer_steps=summary.optimizer_steps,
                      wall_seconds=progress["wall_seconds"])
        (run.directory / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return result
    if completed.returncode != 0 or summary is None or summary.status != "finished":
        lines = [line for line in (run.directory / "fit.log").read_text().splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "no output")
        result.update(status="failed", error=error.strip(), wall_seconds=progress["wall_seconds"])
        (run.directory / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return result
    result.update(
        status="done", error="", optimizer_steps=summary.optimizer_steps, tokens=summary.tokens,
        val_loss=summary.val_loss, train_loss=summary.train_loss,
        rst_spent_seconds=summary.rst_seconds, wall_seconds=progress["wall_seconds"], downstream=None,
    )
    if study.evaluate and run.stage == "test":  # a setting is chosen on validation loss, never downstream
        result["downstream"] = _evaluate(study, run, result, log)
    (run.directory / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _failed(run: Run, error: str) -> dict[str, Any]:
    run.directory.mkdir(parents=True, exist_ok=True)
    result = {"method": run.method, "variant": run.variant, "setting": run.setting, "budget": run.budget,
              "seed": run.seed, "stage": run.stage, "directory": str(run.directory), "status": "failed", "error": error}
    (run.directory / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def prepare(study: Study, method: Method, seed: int, log=print) -> None:
    """Run the method's ``prepare`` commands before its runs (e.g. RHO-loss's irreducible-loss model and its
    scores): a command once per study, or once per seed when it names ``{seed}`` (irreducible losses are scored
    with the masks of the run's seed). A stamp file per command (and seed) records that it succeeded."""
    directory = study.output / "prepare"
    for index, command in enumerate(method.prepare):
        per_seed = "{seed}" in command
        stamp = directory / f"{slug(method.name)}-{index}" f"{f'-seed{seed}' if per_seed else ''}.done"
        if stamp.is_file():
            continue
        directory.mkdir(parents=True, exist_ok=True)
        arguments = shlex.split(command.replace("{study}", str(study.output)).replace("{seed}", str(seed)))
        arguments = [resolve_path(arg, study.path.parent) if at and arguments[at - 1] == "--config" else arg
                     for at, arg in enumerate(arguments)]  # config paths resolve as the study's own do
        log(f"  preparing {method.name}: train.py {' '.join(arguments)}")
        log_file = stamp.with_suffix(".log")
        with open(log_file, "a") as output:
            completed = subprocess.run([sys.executable, str(TRAIN), *arguments], stdout=output, stderr=subprocess.STDOUT,
                                       env=_environment())
        if completed.returncode != 0:
            lines = [line for line in log_file.read_text().splitlines() if line.strip()]
            raise UserError(f"method {method.name}: preparing failed ({lines[-1].strip() if lines else 'no output'}); "
                            f"see {log_file}")
        stamp.write_text(" ".join(arguments) + "\n")


def _environment() -> dict[str, str]:
    """A run's environment: this process's, with the toolkit and the user's ``PYTHONPATH`` entries (absolute)."""
    return {**os.environ, "PYTHONPATH": _python_path()}


def _evaluate_arguments(study: Study) -> list[str]:
    """The study's ``evaluate`` settings as ``train.py evaluate`` arguments (``suite``, ``seeds`` and every other key
    but ``control``, which the runner runs once per architecture instead of beside every run)."""
    settings = dict(study.evaluate or {})
    settings.pop("control", None)
    arguments = ["--suite", str(settings.pop("suite"))]
    seeds = settings.pop("seeds", None)
    if seeds:
        arguments += ["--seeds", ",".join(str(s) for s in seeds)]
    for key, value in settings.items():
        arguments += [f"--{key}", str(value)]
    return arguments


def _last_line(log_file: Path) -> str:
    lines = [line for line in log_file.read_text().splitlines() if line.strip()] if log_file.is_file() else []
    return lines[-1].strip() if lines else "no output"


def _evaluate(study: Study, run: Run, result: dict[str, Any], log=print) -> dict[str, Any] | None:
    output = run.directory / "downstream.json"
    command = [sys.executable, str(TRAIN), "evaluate", "--ckpt_path", str(run.last_checkpoint), *_evaluate_arguments(study),
               "--output", str(output), "--no_progress"]
    with open(run.directory / "evaluate.log", "w") as log_file:
        completed = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=_environment())
    if completed.returncode != 0 or not output.is_file():
        result["status"] = "failed"
        result["error"] = "evaluate: " + _last_line(run.directory / "evaluate.log")
        return None
    scores = json.loads(output.read_text())
    summary = {"suite": scores["suite"], "average": scores["average"],
               "tasks": {task: entry["score"] for task, entry in scores["tasks"].items()},
               "architecture": scores.get("architecture"), "seed_averages": suite_seed_scores(scores["tasks"])}
    if study.control and summary["architecture"]:
        run_control(study, run, summary["architecture"], log)
    return summary


def run_control(study: Study, run: Run, architecture: str, log=print) -> Path | None:
    """The study's control (``random-init``) of ``architecture``, fine-tuned once per architecture from ``run``'s
    checkpoint (its shape; the weights are drawn afresh) with the study's evaluate settings and seeds, unless
    ``<study>/controls/<architecture>/downstream.json`` exists. A failure is logged (``evaluate.log`` beside it)
    and reported, and fails no run; the next invocation tries again. Returns the result file, or ``None``."""
    directory = study.control_directory(architecture)
    output = directory / "downstream.json"
    if output.is_file():
        return output
    directory.mkdir(parents=True, exist_ok=True)
    log(f"  {run.run_id}: the {study.control} control of architecture {architecture} (once per architecture) ...")
    command = [sys.executable, str(TRAIN), "evaluate", "--ckpt_path", str(run.last_checkpoint), *_evaluate_arguments(study),
               "--control", str(study.control), "--control_only", "--output", str(output), "--no_progress"]
    with open(directory / "evaluate.log", "w") as log_file:
        completed = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=_environment())
    if completed.returncode != 0 or not output.is_file():
        log(f"  the {study.control} control of architecture {architecture} failed ({_last_line(directory / 'evaluate.log')}); "
            f"see {directory / 'evaluate.log'}; it is tried again on the next invocation")
        return None
    return output


def _launch_elsewhere(study: Study, runs: list[Run], launcher: str, undecided: int, log) -> None:
    """``print``: the pending runs' commands, one per line; ``slurm``: a job-array script running them."""
    commands = [_command(study.path, study.output, r.run_id) for r in runs]
    (study.output / "commands.txt").write_text("\n".join(commands) + "\n")
    later = (f"; {undecided} method/budget pair(s) still tune their grid: run this command again once these runs "
             "finished, for the chosen settings' runs") if undecided else ""
    if launcher == "print":
        print("\n".join(commands))
        if later:
            log(later[2:])
        return
    script = study.output / "slurm.sh"
    script.write_text("\n".join([
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={slug(study.name)}",
        f"#SBATCH --array=1-{len(commands)}",
        f"#SBATCH --output={study.output}/slurm-%A_%a.out",
        "#SBATCH --gpus=1",
        f'eval "$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {study.output / "commands.txt"})"',
        "",
    ]))
    log(f"wrote {script}: submit with `sbatch {script}` ({len(commands)} runs){later}; then "
        f"`python train.py compare --study {study.path.resolve()} --report` builds the report")


def _bring_up_to_date(run: Run, current: str, keep_stale: bool, stale: dict[str, list[str]]) -> str:
    """The run's status once a run of an older configuration is dealt with: kept (``--keep-stale``, flagged in
    the report) or removed to be run again from scratch (a checkpoint of another configuration never resumes)."""
    status = run_status(run)
    stored = stored_hash(run)
    if status == "pending" or stored in (None, current):
        return status
    if keep_stale and status in FINISHED:
        stale["kept"].append(run.run_id)
        return status
    stale["rerun"].append(run.run_id)
    shutil.rmtree(run.directory)
    return "pending"


def _run_all(study: Study, runs: list[Run], keep_stale: bool, stale: dict[str, list[str]], log) -> list[dict[str, Any]]:
    results = []
    for index, run in enumerate(runs, 1):
        status = _bring_up_to_date(run, config_hash(resolved_config(study, run)), keep_stale, stale)
        if status in ("done", "diverged"):
            log(f"[{index}/{len(runs)}] {run.run_id}: {status}, skipped")
            result = json.loads((run.directory / "result.json").read_text())
            architecture = (result.get("downstream") or {}).get("architecture")
            if study.control and architecture:  # a control that failed or was interrupted earlier
                run_control(study, run, architecture, log)
            results.append(result)
            continue
        try:
            prepare(study, study.method(run.method), run.seed, log)
        except UserError as error:
            log(f"[{index}/{len(runs)}] {run.run_id}: failed ({error})")
            results.append(_failed(run, str(error)))
            continue
        stage = " (tuning)" if run.stage == "tune" else ""
        log(f"[{index}/{len(runs)}] {run.run_id}{stage}: fit under {run.budget} RST"
            + (" and evaluate" if study.evaluate and run.stage == "test" else "") + " ...")
        result = execute(study, run, log)
        log(f"  {run.run_id}: {result['status']}" + (f" ({result['error']})" if result.get("error") else
            f", val/loss {result.get('val_loss') or float('nan'):.4f}, {result.get('optimizer_steps')} steps, "
            f"{result['wall_seconds']:.0f} s"))
        results.append(result)
    return results


def run_study(study: Study, launcher: str = "local", only: str | None = None, log=print,
              keep_stale: bool = False) -> list[dict[str, Any]]:
    """Check every run's configuration, then run the unfinished ones (or hand them to a cluster): the tuning runs
    first, then the tested runs of the settings chosen on them."""
    every_setting = study.tuning_runs() + [study.run(m, s, b, seed) for m in study.methods for s in m.settings()
                                           for b in study.budgets for seed in study.seeds]
    for run in every_setting:  # every configuration resolves before the first run starts
        resolved_config(study, run)
    study.output.mkdir(parents=True, exist_ok=True)
    stale: dict[str, list[str]] = {"rerun": [], "kept": []}
    choices = choose_settings(study)
    known = study.tuning_runs() + study.test_runs({k: c.setting for k, c in choices.items()})
    if only is not None:
        runs = [r for r in known if r.run_id == only]
        if not runs:
            raise UserError(f"--run {only}: no such run in the study (yet); its runs: {', '.join(r.run_id for r in known)}")
        return _run_all(study, runs, keep_stale, stale, log)
    if launcher in ("print", "slurm"):
        pending = [r for r in known if run_status(r) not in ("done", "diverged")]
        _launch_elsewhere(study, pending, launcher, sum(not c.decided for c in choices.values()), log)
        return []
    results = _run_all(study, study.tuning_runs(), keep_stale, stale, log)
    choices = choose_settings(study)
    results += _run_all(study, study.test_runs({k: c.setting for k, c in choices.items()}), keep_stale, stale, log)
    (study.output / "stale.json").write_text(json.dumps(stale, indent=2) + "\n")
    write_report(study, log)
    return results
