"""A study: the paper's experiment as data (``train.py compare --study FILE``).

A study file (YAML) names the base config(s), the budgets and optionally the cost table, the seeds,
the methods (each a name, overlay configs and ``overrides``, optionally a ``grid`` of settings to tune
over) and optionally an ``evaluate`` suite. Every (method, setting, budget, seed) is a ``Run``: an ordinary
``train.py fit`` of a fully resolved configuration (``resolved_config``) in its own directory.
``studies.runner`` runs them, ``studies.report`` compares them with the baseline.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from callbacks.rst import RSTBudget
from cli.lightning_cli import parsed_config
from core.class_paths import import_class
from core.durations import parse_duration
from core.errors import UserError

__all__ = ["BASELINE", "ROOT", "TRAIN", "Method", "Run", "Study", "load_study", "resolve_path", "resolved_config", "run_status",
           "slug"]

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
                        directory = self.output / "runs" / slug(partial.variant) / budget / f"seed{seed}"
                        runs.append(Run(method.name, setting, budget, seed, directory))
        return runs


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", text)


def resolve_path(path: str, relative_to: Path) -> str:
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
    base = tuple(resolve_path(b, here) for b in ([base] if isinstance(base, str) else base))
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
        table = resolve_path(table, here)
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
            configs=tuple(resolve_path(c, here) for c in ([configs] if isinstance(configs, str) else configs)),
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


def run_status(run: Run) -> str:
    """``done``, ``failed``, ``interrupted`` (a checkpoint, no result) or ``pending``."""
    result = run.directory / "result.json"
    if result.is_file():
        return json.loads(result.read_text()).get("status", "failed")
    return "interrupted" if run.last_checkpoint.is_file() else "pending"


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
            import_class(path, what=where)
        for value in node.values():
            _check_class_paths(value, where)
    elif isinstance(node, list):
        for value in node:
            _check_class_paths(value, where)


@functools.lru_cache(maxsize=64)
def _parsed(configs: tuple[str, ...], method: str) -> str:
    """The configs merged and checked by the CLI's own parser, as YAML (parsed once per list of configs)."""
    try:
        return parsed_config(configs)
    except UserError as error:
        raise UserError(f"method {method}: its configs do not parse ({error})") from None


def _is_budget(callback: dict[str, Any]) -> bool:
    """A callback entry of a resolved config that is the RST budget clock (found by type, not by name)."""
    path = callback.get("class_path")
    return isinstance(path, str) and issubclass(import_class(path, what="trainer.callbacks"), RSTBudget)


def resolved_config(study: Study, run: Run) -> dict[str, Any]:
    """The run's whole configuration: base + the method's overlays, resolved by the CLI's own parser, then the
    method's overrides and grid point, the budget (and table), the seed and the run's log directory."""
    method = next(m for m in study.methods if m.name == run.method)
    config = yaml.safe_load(_parsed(tuple(study.base) + tuple(method.configs), run.method))
    for key, value in {**study.overrides, **method.overrides, **run.setting}.items():
        _set_dotted(config, key, value.replace("{study}", str(study.output)) if isinstance(value, str) else value)
    _check_class_paths(config, f"method {run.method}")
    callbacks = config["trainer"].get("callbacks") or []
    budget = next((c for c in callbacks if _is_budget(c)), None)
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
