"""A study: the paper's experiment as data (``train.py compare --study FILE``).

A study file (YAML) names the base config(s), the budgets and optionally the cost table, the seeds,
the methods (each a name, overlay configs and ``overrides``, optionally a ``grid`` of settings to tune
over) and optionally an ``evaluate`` suite. Every (method, setting, budget, seed) is a ``Run``: an ordinary
``train.py fit`` of a fully resolved configuration (``studies.run_config``) in its own directory.
``studies.runner`` runs them, ``studies.report`` compares them with the baseline.

A method with a grid is tuned on ``tune_seeds`` (runs of stage ``tune``): the chosen setting is then run on
``seeds``, disjoint from them, and only those runs are tested (``studies.tuning``). Without ``tune_seeds`` a
grid is chosen and tested on the same seeds, and the report says the p-value is optimistic.

``evaluate: {..., control: random-init}`` also fine-tunes a randomly initialised copy of each architecture the
tested runs export, once per architecture (``studies.runner``), and the report gives every method's pre-training
gain over it (``studies.comparison``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Literal

import yaml

from core.durations import parse_duration
from core.errors import UserError
from studies.control import CONTROLS

__all__ = ["BASELINE", "ROOT", "TRAIN", "Method", "Run", "Study", "load_study", "resolve_path", "run_status", "slug"]

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
    prepare: tuple[str, ...] = ()  # train.py commands run before the method's runs ({study}: the study directory;
    # with {seed}, once per seed)

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
    stage: Literal["tune", "test"] = "test"  # tune: a grid point on a tuning seed; test: a run the verdict tests

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
    tune_seeds: tuple[int, ...] = ()  # a grid's setting is chosen on these, then run on ``seeds`` and tested there
    allow_failed_seeds: bool = False  # a setting that lost a seed may still be chosen

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)

    @property
    def control(self) -> str | None:
        """The downstream control (``random-init``) run once per architecture, if the study asks for one."""
        return (self.evaluate or {}).get("control")

    def control_directory(self, architecture: str) -> Path:
        """Where the control of one architecture (``train.py evaluate``'s ``architecture`` hash) is written."""
        return self.output / "controls" / architecture

    def run(self, method: Method, setting: dict[str, Any], budget: str, seed: int, stage: str = "test") -> Run:
        """The run of ``method`` at grid point ``setting``, ``budget`` and ``seed``, in its own directory."""
        partial = Run(method.name, setting, budget, seed, Path())
        return Run(method.name, setting, budget, seed, self.output / "runs" / slug(partial.variant) / budget / f"seed{seed}",
                   stage)

    def tuned_on_own_seeds(self, method: Method) -> bool:
        """The method's grid is chosen on ``tune_seeds``, apart from the seeds its verdict is tested on."""
        return len(method.settings()) > 1 and bool(self.tune_seeds)

    def tuning_runs(self) -> list[Run]:
        """Every grid point of every method tuned on its own seeds, on every tuning seed."""
        return [self.run(method, setting, budget, seed, "tune")
                for method in self.methods if self.tuned_on_own_seeds(method)
                for setting in method.settings() for budget in self.budgets for seed in self.tune_seeds]

    def test_runs(self, choices: dict[tuple[str, str], dict[str, Any] | None]) -> list[Run]:
        """The runs whose results are tested: per method and budget, the chosen setting on ``seeds`` (``choices``
        maps (method, budget) to it; ``None`` or missing: not chosen yet) or, for a grid without tuning seeds,
        every setting on ``seeds`` (chosen and tested on the same seeds)."""
        runs = []
        for method in self.methods:
            for budget in self.budgets:
                if self.tuned_on_own_seeds(method):
                    chosen = choices.get((method.name, budget))
                    settings = [chosen] if chosen is not None else []
                else:
                    settings = method.settings()
                runs += [self.run(method, setting, budget, seed) for setting in settings for seed in self.seeds]
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
    known = {"name", "base", "budgets", "table", "seeds", "tune_seeds", "allow_failed_seeds", "methods", "evaluate",
             "overrides"}
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
    seeds = _seed_list(raw.get("seeds", [0]), "seeds", file)
    tune_seeds = _seed_list(raw.get("tune_seeds", []), "tune_seeds", file, allow_empty=True)
    if set(seeds) & set(tune_seeds):
        raise UserError(f"{file}: tune_seeds {sorted(set(seeds) & set(tune_seeds))} are also in seeds: a setting is chosen "
                        "on tuning seeds and tested on other seeds, e.g. tune_seeds: [100, 101] and seeds: [0, 1, 2]")
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
    if evaluate is not None and "control" in evaluate and evaluate["control"] not in CONTROLS:
        raise UserError(f"{file}: evaluate: unknown control {evaluate['control']!r}; the control is "
                        f"{' or '.join(CONTROLS)}, e.g. evaluate: {{suite: offline, control: {CONTROLS[0]}}}")
    name = str(raw.get("name") or file.stem)
    out = (Path(output) if output else Path("runs/studies") / name).resolve()
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"{file}: overrides must map dotted keys to values, e.g. overrides: {{trainer.val_check_interval: 50}}")
    allow_failed = raw.get("allow_failed_seeds", False)
    if not isinstance(allow_failed, bool):
        raise UserError(f"{file}: allow_failed_seeds is true or false")
    return Study(name, file, base, budgets, seeds, tuple(methods), table, evaluate, out, dict(overrides), tune_seeds,
                 allow_failed)


def _seed_list(value: Any, key: str, file: Path, allow_empty: bool = False) -> tuple[int, ...]:
    """A list of distinct integers; a repeated seed would run the same run twice and fake agreement between seeds."""
    if not isinstance(value, list) or not (value or allow_empty) or not all(isinstance(s, int) for s in value):
        raise UserError(f"{file}: {key} must be a list of integers, e.g. {key}: [0, 1, 2]")
    repeated = sorted({s for s in value if value.count(s) > 1})
    if repeated:
        raise UserError(f"{file}: {key} repeats {repeated}: every seed must differ (a repeated seed is the same run twice, "
                        "which makes the seeds look like they agree)")
    return tuple(value)


def run_status(run: Run) -> str:
    """``done``, ``failed`` or ``diverged`` (from ``result.json``), ``interrupted`` (a checkpoint, no result) or
    ``pending``."""
    result = run.directory / "result.json"
    if result.is_file():
        return json.loads(result.read_text()).get("status", "failed")
    return "interrupted" if run.last_checkpoint.is_file() else "pending"
