"""Running a study: every run as its own ``train.py fit`` process (then ``train.py evaluate``), here one after
another (``local``) or handed to a cluster (``print``: one command per line; ``slurm``: a job-array script).

A finished run (``result.json`` with status ``done``) is skipped when the study runs again, an interrupted one
continues from its ``last.ckpt``, a failed one is recorded with its error. A fit's result is read from the
``summary.json`` it writes (``cli.summary``), never from its printed output.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cli.summary import read_summary
from core.errors import UserError
from studies.report import write_report
from studies.study import ROOT, TRAIN, Method, Run, Study, resolve_path, resolved_config, run_status, slug

__all__ = ["execute", "prepare", "run_study"]


def _command(study_file: Path, output: Path, run_id: str) -> str:
    return shlex.join([sys.executable, str(TRAIN), "compare", "--study", str(study_file), "--output", str(output),
                       "--run", run_id])


def execute(study: Study, run: Run, log=print) -> dict[str, Any]:
    """Fit (continuing from the run's last checkpoint if there is one), then evaluate; write ``result.json``."""
    run.directory.mkdir(parents=True, exist_ok=True)
    config_file = run.directory / "config.yaml"
    config_file.write_text(yaml.safe_dump(resolved_config(study, run), sort_keys=False))
    progress_file = run.directory / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {"wall_seconds": 0.0, "attempts": 0}
    command = [sys.executable, str(TRAIN), "fit", "--config", str(config_file)]
    if run.last_checkpoint.is_file():
        command += ["--ckpt_path", str(run.last_checkpoint)]
        log(f"  {run.run_id}: continuing from {run.last_checkpoint}")
    result: dict[str, Any] = {"method": run.method, "variant": run.variant, "setting": run.setting, "budget": run.budget,
                              "seed": run.seed, "directory": str(run.directory)}
    start = time.perf_counter()
    with open(run.directory / "fit.log", "a") as output:
        completed = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=_environment())
    progress["wall_seconds"] += time.perf_counter() - start
    progress["attempts"] += 1
    progress_file.write_text(json.dumps(progress))
    summary = read_summary(run.log_dir)
    if completed.returncode != 0 or summary is None or summary.status != "finished":
        lines = [line for line in (run.directory / "fit.log").read_text().splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "no output")
        result.update(status="failed", error=error.strip(), wall_seconds=progress["wall_seconds"])
        (run.directory / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return result
    result.update(
        status="done", error="", optimizer_steps=summary.optimizer_steps, tokens=summary.tokens,
        val_loss=None if summary.val_loss is None else round(summary.val_loss, 4), train_loss=summary.train_loss,
        rst_spent_seconds=summary.rst_seconds, wall_seconds=progress["wall_seconds"], downstream=None,
    )
    if study.evaluate:
        result["downstream"] = _evaluate(study, run, result)
    (run.directory / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _failed(run: Run, error: str) -> dict[str, Any]:
    run.directory.mkdir(parents=True, exist_ok=True)
    result = {"method": run.method, "variant": run.variant, "setting": run.setting, "budget": run.budget,
              "seed": run.seed, "directory": str(run.directory), "status": "failed", "error": error}
    (run.directory / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def prepare(study: Study, method: Method, log=print) -> None:
    """Run the method's ``prepare`` commands once per study (e.g. RHO-loss's irreducible-loss model and its
    scores); a stamp file in the study directory records that they succeeded."""
    if not method.prepare:
        return
    stamp = study.output / "prepare" / f"{slug(method.name)}.done"
    if stamp.is_file():
        return
    stamp.parent.mkdir(parents=True, exist_ok=True)
    for command in method.prepare:
        arguments = shlex.split(command.replace("{study}", str(study.output)))
        arguments = [resolve_path(arg, study.path.parent) if index and arguments[index - 1] == "--config" else arg
                     for index, arg in enumerate(arguments)]  # config paths resolve as the study's own do
        log(f"  preparing {method.name}: train.py {' '.join(arguments)}")
        with open(stamp.with_suffix(".log"), "a") as output:
            completed = subprocess.run([sys.executable, str(TRAIN), *arguments], stdout=output, stderr=subprocess.STDOUT,
                                       env=_environment())
        if completed.returncode != 0:
            lines = [line for line in stamp.with_suffix(".log").read_text().splitlines() if line.strip()]
            raise UserError(f"method {method.name}: preparing failed ({lines[-1].strip() if lines else 'no output'}); "
                            f"see {stamp.with_suffix('.log')}")
    stamp.write_text("\n".join(method.prepare) + "\n")


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _evaluate(study: Study, run: Run, result: dict[str, Any]) -> dict[str, Any] | None:
    settings = dict(study.evaluate)
    output = run.directory / "downstream.json"
    command = [sys.executable, str(TRAIN), "evaluate", "--ckpt_path", str(run.last_checkpoint), "--suite",
               str(settings.pop("suite")), "--output", str(output), "--no_progress"]
    seeds = settings.pop("seeds", None)
    if seeds:
        command += ["--seeds", ",".join(str(s) for s in seeds)]
    for key, value in settings.items():
        command += [f"--{key}", str(value)]
    with open(run.directory / "evaluate.log", "w") as log_file:
        completed = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=_environment())
    if completed.returncode != 0 or not output.is_file():
        lines = [line for line in (run.directory / "evaluate.log").read_text().splitlines() if line.strip()]
        result["status"] = "failed"
        result["error"] = "evaluate: " + (lines[-1].strip() if lines else "no output")
        return None
    scores = json.loads(output.read_text())
    return {"suite": scores["suite"], "average": scores["average"],
            "tasks": {task: summary["score"] for task, summary in scores["tasks"].items()}}


def run_study(study: Study, launcher: str = "local", only: str | None = None, log=print) -> list[dict[str, Any]]:
    """Check every run's configuration, then run the unfinished ones (or hand them to a cluster)."""
    runs = study.runs()
    if only is not None:
        runs = [r for r in runs if r.run_id == only]
        if not runs:
            raise UserError(f"--run {only}: no such run in the study; its runs: {', '.join(r.run_id for r in study.runs())}")
    for run in runs:  # every configuration resolves before the first run starts
        resolved_config(study, run)
    study.output.mkdir(parents=True, exist_ok=True)
    if launcher in ("print", "slurm"):
        pending = [r for r in runs if run_status(r) != "done"]
        commands = [_command(study.path, study.output, r.run_id) for r in pending]
        (study.output / "commands.txt").write_text("\n".join(commands) + "\n")
        if launcher == "print":
            print("\n".join(commands))
        else:
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
            log(f"wrote {script}: submit with `sbatch {script}` ({len(commands)} runs); then "
                f"`python train.py compare --study {study.path} --report` builds the report")
        return []
    results = []
    for index, run in enumerate(runs, 1):
        status = run_status(run)
        if status != "done":
            try:
                prepare(study, next(m for m in study.methods if m.name == run.method), log)
            except UserError as error:
                result = _failed(run, str(error))
                log(f"[{index}/{len(runs)}] {run.run_id}: failed ({error})")
                results.append(result)
                continue
        if status == "done":
            log(f"[{index}/{len(runs)}] {run.run_id}: done, skipped")
            results.append(json.loads((run.directory / "result.json").read_text()))
            continue
        log(f"[{index}/{len(runs)}] {run.run_id}: fit under {run.budget} RST"
            + (" and evaluate" if study.evaluate else "") + " ...")
        result = execute(study, run, log)
        log(f"  {run.run_id}: {result['status']}" + (f" ({result['error']})" if result.get("error") else
            f", val/loss {result.get('val_loss')}, {result.get('optimizer_steps')} steps, {result['wall_seconds']:.0f} s"))
        results.append(result)
    if only is None:
        write_report(study, log)
    return results
