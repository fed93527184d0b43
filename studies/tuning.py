"""Choosing a method's setting from its grid, and the outcomes of a study's runs.

A setting is chosen on validation loss, never on a downstream score, and only among the eligible settings:
those whose every selection run finished (a setting that lost a seed to a failure or to non-finite numbers is
not eligible unless the study says ``allow_failed_seeds: true``). With ``tune_seeds`` the selection runs are
the tuning runs and the chosen setting is then run on the study's ``seeds``; without them the selection runs
are the tested runs themselves, and the report applies a Bonferroni factor of the grid's size.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Any

from studies.study import Method, Run, Study, run_status

__all__ = ["FINISHED", "Candidate", "Choice", "choose_setting", "choose_settings", "outcomes"]

FINISHED = ("done", "failed", "diverged")  # a run with one of these has a result.json and is not run again


def outcomes(runs: list[Run]) -> list[dict[str, Any]]:
    """Every run's result (``result.json``), or its status if it has none yet; each with its ``run``."""
    rows = []
    for run in runs:
        status = run_status(run)
        if status in FINISHED:
            row = json.loads((run.directory / "result.json").read_text())
        else:
            row = {"method": run.method, "variant": run.variant, "setting": run.setting, "budget": run.budget,
                   "seed": run.seed, "status": status, "error": ""}
        row["run"] = run
        row["stage"] = run.stage
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Candidate:
    """One grid point's selection runs."""

    variant: str
    setting: dict[str, Any]
    val_losses: tuple[float, ...]
    finished: int
    failed: int
    diverged: int
    unfinished: int
    eligible: bool

    @property
    def mean_val_loss(self) -> float | None:
        return statistics.fmean(self.val_losses) if self.val_losses else None


@dataclass(frozen=True)
class Choice:
    """The setting of ``method`` at ``budget`` whose runs on the study's seeds are tested.

    ``selected_on`` is ``tune`` (chosen on the tuning seeds), ``test`` (chosen on the tested seeds: the p-value
    is optimistic) or ``single`` (no grid). ``setting`` is ``None`` while selection runs are unfinished
    (``decided`` is then ``False``) or when no setting is eligible.
    """

    method: str
    budget: str
    selected_on: str
    decided: bool
    setting: dict[str, Any] | None
    candidates: tuple[Candidate, ...] = field(default_factory=tuple)

    @property
    def grid_size(self) -> int:
        return max(1, len(self.candidates))


def _candidate(variant: str, setting: dict[str, Any], rows: list[dict[str, Any]], allow_failed: bool) -> Candidate:
    done = [r for r in rows if r["status"] == "done" and r.get("val_loss") is not None]
    failed = sum(r["status"] == "failed" for r in rows)
    diverged = sum(r["status"] == "diverged" for r in rows)
    unfinished = sum(r["status"] not in FINISHED for r in rows)
    eligible = bool(done) and unfinished == 0 and (allow_failed or len(done) == len(rows))
    return Candidate(variant, setting, tuple(r["val_loss"] for r in done), len(done), failed, diverged, unfinished,
                     eligible)


def choose_setting(study: Study, method: Method, budget: str, rows: list[dict[str, Any]]) -> Choice:
    """The setting of ``method`` at ``budget`` (see the module docstring), from the outcomes ``rows``."""
    settings = method.settings()
    if len(settings) == 1:
        return Choice(method.name, budget, "single", True, settings[0])
    stage = "tune" if study.tuned_on_own_seeds(method) else "test"
    candidates = []
    for setting in settings:
        variant = study.run(method, setting, budget, 0).variant
        selection = [r for r in rows if r["variant"] == variant and r["budget"] == budget and r["stage"] == stage]
        candidates.append(_candidate(variant, setting, selection, study.allow_failed_seeds))
    decided = all(c.unfinished == 0 for c in candidates)
    eligible = [c for c in candidates if c.eligible]
    best = min(eligible, key=lambda c: c.mean_val_loss) if decided and eligible else None
    return Choice(method.name, budget, stage, decided, best.setting if best else None, tuple(candidates))


def choose_settings(study: Study) -> dict[tuple[str, str], Choice]:
    """Every method's choice at every budget, from the runs on disk."""
    rows = outcomes(study.tuning_runs() + study.test_runs({}))
    return {(m.name, b): choose_setting(study, m, b, rows) for m in study.methods for b in study.budgets}
