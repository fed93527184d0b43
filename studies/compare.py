"""``train.py compare --study FILE``: did a method beat the baseline at this budget? (the paper's experiment)

A study file (YAML) names the base config(s), the budgets and optionally the cost table, the seeds,
the methods (each a name, overlay configs and ``overrides``, optionally a ``grid`` of settings to tune
over) and optionally an ``evaluate`` suite. Every (method, setting, budget, seed) is an ordinary
``train.py fit`` of a fully resolved config written into its own directory, followed by
``train.py evaluate``; each runs in its own process, one after another (``--launcher print`` /
``slurm`` hand them to a cluster instead). A finished run is skipped when the study runs again, an
interrupted one continues from its ``last.ckpt``, a failed one is recorded with its error.

The report (``report.md``, ``results.csv``, plots, TensorBoard HParams) compares each method with
the baseline by Welch's t-test over seeds (``core/significance.py``); a tuned method's setting is
chosen per budget on mean validation loss, never on a downstream score.
"""

from __future__ import annotations

import csv
import functools
import importlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from core.durations import parse_duration
from core.errors import UserError
from core.significance import welch_t_test

__all__ = ["Method", "Run", "Study", "load_study", "run_study", "write_report"]

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"
BASELINE = "baseline"


@dataclass(frozen=True)
class Method:
    """A method: overlay configs and overrides on the base; ``grid`` maps setting -> values to tune over."""

    name: str
    configs: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    prepare: tuple[str, ...] = ()  # train.py commands run once before the method's runs ({study}: the study directory)

    def settings(self) -> list[dict[str, Any]]:
        """Every point of the grid ({} without one)."""
        keys = sorted(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in product(*(self.grid[k] for k in keys))] or [{}]


@dataclass(frozen=True)
class Run:
    """One fit (+ evaluate): where it lives and what it is."""

    method: str
    setting: dict[str, Any]
    budget: str
    seed: int
    directory: Path

    @property
    def variant(self) -> str:
        """The method and its grid point, e.g. ``lion[model.optimizer.init_args.lr=0.0003]``."""
        if not self.setting:
            return self.method
        return f"{self.method}[{','.join(f'{k}={v}' for k, v in sorted(self.setting.items()))}]"

    @property
    def run_id(self) -> str:
        return f"{self.variant}/{self.budget}/seed{self.seed}"

    @property
    def log_dir(self) -> Path:
        return self.directory / "tb" / "run"

    @property
    def last_checkpoint(self) -> Path:
        return self.log_dir / "checkpoints" / "last.ckpt"


@dataclass
class Study:
    """A parsed, checked study file."""

    name: str
    path: Path
    base: tuple[str, ...]
    budgets: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: tuple[Method, ...]
    table: str | None = None
    evaluate: dict[str, Any] | None = None
    output: Path = Path("runs/studies")
    overrides: dict[str, Any] = field(default_factory=dict)  # applied to every method, before its own

    def runs(self) -> list[Run]:
        runs = []
        for method in self.methods:
            for setting in method.settings():
                for budget in self.budgets:
                    for seed in self.seeds:
                        partial = Run(method.name, setting, budget, seed, Path())
                        directory = self.output / "runs" / _slug(partial.variant) / budget / f"seed{seed}"
                        runs.append(Run(method.name, setting, budget, seed, directory))
        return runs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", text)


def _resolve(path: str, relative_to: Path) -> str:
    """A config path as given if it exists from the working directory, else relative to the study file or the project."""
    for candidate in (Path(path), relative_to / path, ROOT / path):
        if candidate.exists():
            return str(candidate)
    raise UserError(f"config {path!r} not found (looked in the working directory, beside the study file and in {ROOT})")


def load_study(path: str | Path, output: str | Path | None = None) -> Study:
    """Read and check a study file: every key known, a baseline, budgets, a table that exists, configs that exist."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--study {path}: no such file")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{file}: not valid YAML{where}: fix the file (configs/studies/smoke.yaml is an example)") from None
    if not isinstance(raw, dict):
        raise UserError(f"{file}: a study is a YAML mapping (name, base, budgets, methods, ...); see configs/studies/smoke.yaml")
    known = {"name", "base", "budgets", "table", "seeds", "methods", "evaluate", "overrides"}
    unknown = set(raw) - known
    if unknown:
        raise UserError(f"{file}: unknown key {sorted(unknown)[0]!r}; a study has {', '.join(sorted(known))}")
    here = file.parent
    base = raw.get("base")
    if not base:
        raise UserError(f"{file}: name the base config(s): base: configs/bert/demo.yaml")
    base = tuple(_resolve(b, here) for b in ([base] if isinstance(base, str) else base))
    budgets = raw.get("budgets")
    if not budgets:
        raise UserError(f"{file}: give one or more budgets, e.g. budgets: [60s, 150s]")
    budgets = tuple(str(b) for b in ([budgets] if isinstance(budgets, str | int | float) else budgets))
    for budget in budgets:
        parse_duration(budget)
    table = raw.get("table")
    if table is not None:
        if not any(Path(p).is_file() for p in (table, here / table, ROOT / table)):
            raise UserError(f"{file}: table {table!r} does not exist; measure one with train.py calibrate")
        table = _resolve(table, here)
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UserError(f"{file}: seeds must be a list of integers, e.g. seeds: [0, 1]")
    methods = []
    for entry in raw.get("methods") or []:
        if not isinstance(entry, dict) or "name" not in entry:
            raise UserError(f"{file}: every method needs a name (and configs / overrides / grid)")
        extra = set(entry) - {"name", "configs", "overrides", "grid", "prepare"}
        if extra:
            raise UserError(f"{file}: method {entry['name']}: unknown key {sorted(extra)[0]!r}")
        configs = entry.get("configs") or []
        methods.append(Method(
            name=str(entry["name"]),
            configs=tuple(_resolve(c, here) for c in ([configs] if isinstance(configs, str) else configs)),
            overrides=dict(entry.get("overrides") or {}),
            grid={k: list(v) for k, v in (entry.get("grid") or {}).items()},
            prepare=tuple(str(c) for c in (entry.get("prepare") or [])),
        ))
    names = [m.name for m in methods]
    if BASELINE not in names:
        raise UserError(f"{file}: no method named {BASELINE!r}; the study compares every method with it")
    if len(set(names)) != len(names):
        raise UserError(f"{file}: method names repeat: {names}")
    evaluate = raw.get("evaluate")
    if evaluate is not None and (not isinstance(evaluate, dict) or "suite" not in evaluate):
        raise UserError(f"{file}: evaluate needs a suite, e.g. evaluate: {{suite: offline}}")
    name = str(raw.get("name") or file.stem)
    out = (Path(output) if output else Path("runs/studies") / name).resolve()
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"{file}: overrides must map dotted keys to values, e.g. overrides: {{trainer.val_check_interval: 50}}")
    return Study(name, file, base, budgets, tuple(seeds), tuple(methods), table, evaluate, out, dict(overrides))


# ----- one run's configuration ---------------------------------------------------------------------------
def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``model.learning_rate`` or ``model.init_args.learning_rate`` alike (``init_args`` is implied); in a list
    of classes a part names the class: ``trainer.callbacks.RhoLoss.irreducible_losses``."""
    node: Any = config
    parts = key.split(".")
    for index, part in enumerate(parts):
        if isinstance(node, list):
            matches = [item for item in node if isinstance(item, dict) and str(item.get("class_path", "")).split(".")[-1] == part]
            if len(matches) != 1:
                raise UserError(f"override {key}: {'.'.join(parts[:index])} holds {len(matches)} {part}")
            node = matches[0]
            continue
        if isinstance(node, dict) and part not in node and "init_args" in node and part != "init_args":
            node = node["init_args"]
        if not isinstance(node, dict):
            raise UserError(f"override {key}: {'.'.join(parts[:index])} is not a mapping")
        if index == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _check_class_paths(node: Any, where: str) -> None:
    if isinstance(node, dict):
        path = node.get("class_path")
        if isinstance(path, str):
            module_name, _, class_name = path.rpartition(".")
            try:
                getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError, ValueError):
                raise UserError(f"{where}: cannot import class {path!r}") from None
        for value in node.values():
            _check_class_paths(value, where)
    elif isinstance(node, list):
        for value in node:
            _check_class_paths(value, where)


@functools.lru_cache(maxsize=64)
def _parsed(configs: tuple[str, ...], method: str) -> str:
    """The configs merged and checked by the CLI's own parser, as YAML (parsed once per list of configs)."""
    import contextlib
    import io

    import train

    class _ConfigOnly(train.PretrainingCLI):  # only the configuration is wanted here
        def instantiate_classes(self) -> None:
            pass

        def _set_seed(self) -> None:
            pass

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            cli = _ConfigOnly(args=[arg for config in configs for arg in ("--config", config)], run=False,
                              auto_configure_optimizers=False)
            return cli.parser.dump(cli.config, skip_none=False)
    except SystemExit:
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        raise UserError(f"method {method}: its configs do not parse ({lines[-1].strip() if lines else 'no message'})") from None


def resolved_config(study: Study, run: Run) -> dict[str, Any]:
    """The run's whole configuration: base + the method's overlays, resolved by the CLI's own parser, then the
    method's overrides and grid point, the budget (and table), the seed and the run's log directory."""
    method = next(m for m in study.methods if m.name == run.method)
    config = yaml.safe_load(_parsed(tuple(study.base) + tuple(method.configs), run.method))
    for key, value in {**study.overrides, **method.overrides, **run.setting}.items():
        _set_dotted(config, key, value.replace("{study}", str(study.output)) if isinstance(value, str) else value)
    _check_class_paths(config, f"method {run.method}")
    callbacks = config["trainer"].get("callbacks") or []
    budget = next((c for c in callbacks if str(c.get("class_path", "")).endswith("RSTBudget")), None)
    if budget is None:
        raise UserError(f"method {run.method}: its config has no callbacks.rst.RSTBudget; a study compares under one RST budget")
    budget["init_args"]["budget"] = run.budget
    if study.table is not None:
        budget["init_args"]["table"] = study.table
    if not budget["init_args"].get("table"):
        raise UserError(f"method {run.method}: no cost table: set table: in the study or in the RSTBudget callback")
    config["seed_everything"] = run.seed
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": str(run.directory), "name": "tb", "version": "run",
                                                 "default_hp_metric": False}}
    config["trainer"]["enable_progress_bar"] = False
    return config


# ----- running ----------------------------------------------------------------------------------------------
def run_status(run: Run) -> str:
    """``done``, ``failed``, ``interrupted`` (a checkpoint, no result) or ``pending``."""
    result = run.directory / "result.json"
    if result.is_file():
        return json.loads(result.read_text()).get("status", "failed")
    return "interrupted" if run.last_checkpoint.is_file() else "pending"


def _command(study_file: Path, output: Path, run_id: str) -> str:
    return shlex.join([sys.executable, str(TRAIN), "compare", "--study", str(study_file), "--output", str(output),
                       "--run", run_id])


_SUMMARY = re.compile(r"done: ([\d,]+) steps, ([\d,]+) tokens, final val/loss ([\d.]+|n/a)")


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
    fit_log = (run.directory / "fit.log").read_text()
    summary = _SUMMARY.findall(fit_log)
    if completed.returncode != 0 or not summary:
        lines = [line for line in fit_log.splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "no output")
        result.update(status="failed", error=error.strip(), wall_seconds=progress["wall_seconds"])
        (run.directory / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return result
    steps, tokens, val = summary[-1]
    curves = _curves(run.log_dir)
    result.update(
        status="done", error="", optimizer_steps=int(steps.replace(",", "")), tokens=int(tokens.replace(",", "")),
        val_loss=float(val) if val != "n/a" else None,
        train_loss=curves["train/loss"][-1][1] if curves.get("train/loss") else None,
        rst_spent_seconds=curves["rst/seconds"][-1][1] if curves.get("rst/seconds") else None,
        wall_seconds=progress["wall_seconds"], downstream=None,
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
    stamp = study.output / "prepare" / f"{_slug(method.name)}.done"
    if stamp.is_file():
        return
    stamp.parent.mkdir(parents=True, exist_ok=True)
    for command in method.prepare:
        arguments = shlex.split(command.replace("{study}", str(study.output)))
        arguments = [_resolve(arg, study.path.parent) if index and arguments[index - 1] == "--config" else arg
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


def _curves(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    curves = {}
    for tag in events.Tags()["scalars"]:
        by_step = {e.step: e.value for e in events.Scalars(tag)}  # a resumed run re-logs some steps: keep the last
        curves[tag] = sorted(by_step.items())
    return curves


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
                f"#SBATCH --job-name={_slug(study.name)}",
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


# ----- the report --------------------------------------------------------------------------------------------
CSV_FIELDS = ["method", "variant", "budget", "seed", "setting", "status", "optimizer_steps", "tokens", "rst_spent_seconds",
              "wall_seconds", "train_loss", "val_loss", "downstream_average", "downstream", "error"]


def _collect(study: Study) -> list[dict[str, Any]]:
    rows = []
    for run in study.runs():
        status = run_status(run)
        if status in ("done", "failed"):
            result = json.loads((run.directory / "result.json").read_text())
        else:
            result = {"method": run.method, "variant": run.variant, "setting": run.setting, "budget": run.budget,
                      "seed": run.seed, "status": status, "error": ""}
        result["run"] = run
        rows.append(result)
    return rows


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def compare_rows(study: Study, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and budget: the chosen setting (lowest mean validation loss), mean/std over seeds, the
    difference to the baseline with its 95 % interval and Welch's p-value, for validation loss and the
    downstream average."""
    table = []
    for budget in study.budgets:
        done = [r for r in rows if r["budget"] == budget and r["status"] == "done" and r.get("val_loss") is not None]
        base = [r for r in done if r["method"] == BASELINE]
        for method in study.methods:
            candidates = {}
            for r in done:
                if r["method"] == method.name:
                    candidates.setdefault(r["variant"], []).append(r)
            runs_of_method = [r for r in rows if r["budget"] == budget and r["method"] == method.name]
            failed = [r for r in runs_of_method if r["status"] == "failed"]
            if not candidates:
                table.append({"method": method.name, "budget": budget, "variant": None, "status": "failed" if failed else
                              "not run", "failed": len(failed), "runs": 0, "errors": sorted({r["error"] for r in failed})})
                continue
            variant, chosen = min(candidates.items(), key=lambda item: statistics.fmean(r["val_loss"] for r in item[1]))
            entry: dict[str, Any] = {"method": method.name, "budget": budget, "variant": variant, "status": "done",
                                     "runs": len(chosen), "failed": len(failed), "tuned_over": len(candidates),
                                     "errors": sorted({r["error"] for r in failed})}
            for key, better in (("val_loss", "lower"), ("train_loss", "lower"), ("downstream_average", "higher")):
                values = [_value(r, key) for r in chosen if _value(r, key) is not None]
                entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std(values)
                baseline_values = [_value(r, key) for r in base if _value(r, key) is not None]
                test = welch_t_test(values, baseline_values) if method.name != BASELINE else None
                entry[f"{key}_test"] = asdict(test) if test else None
                entry[f"{key}_better"] = better
            for key in ("optimizer_steps", "wall_seconds", "rst_spent_seconds"):
                entry[f"{key}_mean"] = _mean_std([r[key] for r in chosen if r.get(key) is not None])[0]
            entry["verdict"] = _verdict(entry, budget) if method.name != BASELINE else ""
            table.append(entry)
    return table


def _value(row: dict[str, Any], key: str) -> float | None:
    if key == "downstream_average":
        return (row.get("downstream") or {}).get("average")
    return row.get(key)


def _budget_words(budget: str) -> str:
    seconds = parse_duration(budget)
    return f"{seconds / 3600:g} RST-hours" if seconds >= 3600 else f"{seconds:g} RST-seconds"


def _verdict(entry: dict[str, Any], budget: str) -> str:
    """One sentence: beat the baseline when its validation loss is lower with p < 0.05 (Welch)."""
    test = entry.get("val_loss_test")
    name = entry["variant"]
    if test is None:
        return (f"{name}: not tested against the baseline at {_budget_words(budget)} (fewer than two finished seeds "
                f"on a side).")
    beat = test["difference"] < 0 and test["p_value"] < 0.05
    worse = test["difference"] > 0 and test["p_value"] < 0.05
    outcome = "beat the baseline" if beat else ("did worse than the baseline" if worse else "did not beat the baseline")
    return (f"{name} {outcome} at {_budget_words(budget)}: validation loss {test['difference']:+.4f} "
            f"(95 % CI {test['low']:+.4f} to {test['high']:+.4f}, Welch p = {test['p_value']:.3g}).")


def write_report(study: Study, log=print) -> Path:
    """results.csv, report.md, the plots and the TensorBoard HParams view, from the runs on disk."""
    rows = _collect(study)
    out = study.output
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "setting": json.dumps(r.get("setting") or {}),
                             "downstream_average": _value(r, "downstream_average"),
                             "downstream": json.dumps((r.get("downstream") or {}).get("tasks")) if r.get("downstream") else ""})
    table = compare_rows(study, rows)
    (out / "comparison.json").write_text(json.dumps(table, indent=2) + "\n")
    plots = _plots(study, rows, out)
    _hparams(study, rows, out)
    (out / "report.md").write_text(_markdown(study, rows, table, plots))
    log(f"report: {out / 'report.md'} (results.csv, {', '.join(plots)}; tensorboard --logdir {out})")
    return out / "report.md"


def _markdown(study: Study, rows: list[dict[str, Any]], table: list[dict[str, Any]], plots: list[str]) -> str:
    seeds = len(study.seeds)
    lines = [
        f"# Study `{study.name}`",
        "",
        f"Study file `{study.path}`; base {', '.join(f'`{b}`' for b in study.base)}; budgets {', '.join(study.budgets)}; "
        f"seeds {list(study.seeds)}; table `{study.table or 'from the config'}`"
        + (f"; downstream suite `{study.evaluate['suite']}`" if study.evaluate else "") + ".",
        f"Runs: {sum(r['status'] == 'done' for r in rows)} done, {sum(r['status'] == 'failed' for r in rows)} failed, "
        f"{sum(r['status'] in ('pending', 'interrupted') for r in rows)} not finished, of {len(rows)}.",
        "",
        "| budget | method | setting | runs | val loss | vs baseline (95 % CI) | p | train loss | downstream | steps | wall s |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for e in table:
        if e["status"] != "done":
            lines.append(f"| {e['budget']} | {e['method']} | {e['status']} ({e['failed']} failed) | 0 | | | | | | | |")
            continue
        test = e.get("val_loss_test")
        diff = f"{test['difference']:+.4f} ({test['low']:+.4f}, {test['high']:+.4f})" if test else ""
        p = f"{test['p_value']:.3g}" if test else ""
        val = f"{_fmt(e['val_loss_mean'])} ± {_fmt(e['val_loss_std'])}"
        train_loss = f"{_fmt(e['train_loss_mean'])} ± {_fmt(e['train_loss_std'])}"
        down = f"{_fmt(e['downstream_average_mean'], 2)} ± {_fmt(e['downstream_average_std'], 2)}" if e["downstream_average_mean"] is not None else "n/a"
        setting = e["variant"][len(e["method"]):] or "-"
        lines.append(f"| {e['budget']} | {e['method']} | {setting} | {e['runs']} | {val} | {diff} | {p} | {train_loss} | "
                     f"{down} | {_fmt(e['optimizer_steps_mean'], 0)} | {_fmt(e['wall_seconds_mean'], 0)} |")
    lines += ["", "## Verdicts", ""]
    lines += [f"- {e['verdict']}" for e in table if e.get("verdict")]
    lines += [f"- {e['method']} at {e['budget']}: {e['status']}: {'; '.join(e['errors'])}" for e in table
              if e["status"] != "done" and e["errors"]]
    downstream_tests = [e for e in table if e.get("downstream_average_test")]
    if downstream_tests:
        lines += ["", "Downstream average vs the baseline (higher is better): " + "; ".join(
            f"{e['variant']} at {e['budget']} {e['downstream_average_test']['difference']:+.2f} "
            f"(p = {e['downstream_average_test']['p_value']:.3g})" for e in downstream_tests) + "."]
    lines += [
        "",
        "## How to read this",
        "",
        f"Mean ± standard deviation over {seeds} seed(s) per method. The difference to the baseline is the method's "
        "mean minus the baseline's, with a 95 % confidence interval and the two-sided p-value of Welch's t-test "
        "(unequal variances: a method may make training more or less stable than the baseline). \"Beat the "
        "baseline\" means a lower validation loss at p < 0.05. With few seeds the test has little power: "
        "two seeds a side leave about one degree of freedom, so only a difference many times the seed-to-seed "
        "spread reaches p < 0.05, and \"did not beat\" then says the study cannot tell, not that the methods "
        "are equal. A tuned method's setting is the one with the lowest mean validation loss at that budget "
        "(chosen on validation loss, never on the downstream score), which flatters it slightly.",
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plots(study: Study, rows: list[dict[str, Any]], out: Path) -> list[str]:
    """val_loss_vs_rst.png, train_loss_vs_rst.png (mean over seeds, min-max band), downstream.png (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    done = [r for r in rows if r["status"] == "done"]
    for tag, file_name, title in (("val/loss", "val_loss_vs_rst.png", "validation loss"),
                                  ("train/loss", "train_loss_vs_rst.png", "training loss")):
        figure, axes = plt.subplots(1, len(study.budgets), figsize=(6 * len(study.budgets), 4), squeeze=False)
        for axis, budget in zip(axes[0], study.budgets, strict=True):
            by_variant: dict[str, list[list[tuple[float, float]]]] = {}
            for r in (r for r in done if r["budget"] == budget):
                curves = _curves(r["run"].log_dir)
                rst = dict(curves.get("rst/seconds", []))
                points = [(_rst_at(rst, step), value) for step, value in curves.get(tag, [])]
                if points:
                    by_variant.setdefault(r["variant"], []).append(points)
            for variant, series in sorted(by_variant.items()):
                length = min(len(s) for s in series)
                xs = [statistics.fmean(s[i][0] for s in series) for i in range(length)]
                ys = [[s[i][1] for s in series] for i in range(length)]
                mean = [statistics.fmean(v) for v in ys]
                line, = axis.plot(xs, mean, label=variant)
                if len(series) > 1:
                    axis.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], alpha=0.2, color=line.get_color())
            axis.set_title(f"{title}, budget {budget}")
            axis.set_xlabel("RST seconds")
            axis.set_ylabel(title)
            if by_variant:
                axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / file_name, dpi=100)
        plt.close(figure)
        written.append(file_name)
    scored = [r for r in done if _value(r, "downstream_average") is not None]
    if scored:
        figure, axis = plt.subplots(figsize=(7, 4))
        labels = sorted({(r["budget"], r["variant"]) for r in scored}, key=lambda k: (parse_duration(k[0]), k[1]))
        means = [statistics.fmean(_value(r, "downstream_average") for r in scored if (r["budget"], r["variant"]) == k)
                 for k in labels]
        axis.bar(range(len(labels)), means)
        axis.set_xticks(range(len(labels)), [f"{v}\n{b}" for b, v in labels], fontsize=8)
        axis.set_ylabel("downstream average (mean over seeds)")
        axis.set_ylim(min(means) - 5, max(means) + 2)
        figure.tight_layout()
        figure.savefig(out / "downstream.png", dpi=100)
        plt.close(figure)
        written.append("downstream.png")
    return written


def _rst_at(rst: dict[int, float], step: int) -> float:
    """RST seconds at ``step`` from the logged ``rst/seconds`` curve (nearest logged step at or before it)."""
    if step in rst:
        return rst[step]
    earlier = [s for s in rst if s <= step]
    return rst[max(earlier)] if earlier else 0.0


def _hparams(study: Study, rows: list[dict[str, Any]], out: Path) -> None:
    """One HParams entry per finished run under ``<study>/hparams`` (TensorBoard's HParams dashboard)."""
    from torch.utils.tensorboard import SummaryWriter

    directory = out / "hparams"
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    for r in rows:
        if r["status"] != "done":
            continue
        hparams = {"method": r["method"], "variant": r["variant"], "budget": r["budget"], "seed": r["seed"],
                   **{k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in (r.get("setting") or {}).items()}}
        metrics = {f"result/{k}": float(r[k]) for k in ("val_loss", "train_loss", "optimizer_steps", "wall_seconds")
                   if r.get(k) is not None}
        if _value(r, "downstream_average") is not None:
            metrics["result/downstream_average"] = float(_value(r, "downstream_average"))
        with SummaryWriter(str(directory / _slug(r["run"].run_id.replace("/", "_")))) as writer:
            writer.add_hparams(hparams, metrics, run_name=".")
