"""Did a method beat the baseline? The study's statistics, per method and budget.

The design (docs/comparing.md):

- each method, the baseline included, is represented by its chosen setting (``studies.tuning``) and only that
  setting's runs on the study's ``seeds`` are tested; the baseline's other settings never enter a test;
- a method and the baseline run with the same seed share that seed's data order, masks and draws, so when every
  seed finished in both arms the test is **paired** (a t-test on the per-seed differences); otherwise it is
  **Welch's** t-test on the finished values; the entry says which and why;
- a setting chosen on the same seeds it is tested on gets its p-value multiplied by the grid's size (Bonferroni),
  and the report says the test is optimistic;
- with zero spread the test is "not testable", never p = 0;
- the smallest difference the study could detect (two-sided, p < 0.05, 80 % power) is stated from the observed
  seed-to-seed spread, so "did not beat" reads "could not tell a difference smaller than X";
- finished, failed and diverged seeds are counted, and a verdict on fewer seeds than planned says so;
- with a random-init control (``evaluate: {control: random-init}``), each method's pre-training gain: the mean
  of its tested runs' downstream averages minus the mean of the control's per-seed suite averages, with Welch's
  interval and p (the runs and the control's seeds are independent samples).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

from core.durations import parse_duration
from core.significance import minimum_detectable_difference, paired_t_test, welch_t_test
from studies.control import with_test
from studies.plots import downstream_average
from studies.study import BASELINE, Study
from studies.tuning import FINISHED, Choice

__all__ = ["ALPHA", "compare_rows", "gain_over_control", "verdict"]

ALPHA = 0.05
METRICS = (("val_loss", "lower"), ("train_loss", "lower"), ("downstream_average", "higher"))


def _value(row: dict[str, Any], key: str) -> float | None:
    return downstream_average(row) if key == "downstream_average" else row.get(key)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _by_seed(rows: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {r["seed"]: _value(r, key) for r in rows if r["status"] == "done" and _value(r, key) is not None}


def compare_metric(method_rows: list[dict[str, Any]], baseline_rows: list[dict[str, Any]], key: str, seeds: tuple[int, ...],
                   bonferroni: int = 1) -> dict[str, Any] | None:
    """The test of ``key`` between a method's tested runs and the baseline's: paired when every seed is in both
    arms, Welch otherwise; the p-value times ``bonferroni`` (at most 1); the minimum detectable difference."""
    ours, theirs = _by_seed(method_rows, key), _by_seed(baseline_rows, key)
    if set(ours) == set(theirs) == set(seeds) and len(seeds) >= 2:
        order = sorted(seeds)
        a, b = [ours[s] for s in order], [theirs[s] for s in order]
        result, kind = paired_t_test(a, b), "paired"
        why = f"every seed ({len(order)}) finished in both arms: the per-seed differences are tested"
        differences = [x - y for x, y in zip(a, b, strict=True)]
        spread = statistics.stdev(differences)
        detectable = minimum_detectable_difference(spread, len(order), paired=True, alpha=ALPHA)
    else:
        a, b = list(ours.values()), list(theirs.values())
        result, kind = welch_t_test(a, b), "welch"
        why = (f"not every seed finished in both arms ({len(a)} and {len(b)} of {len(seeds)}): the finished values "
               "are compared as independent samples")
        sd_a = statistics.stdev(a) if len(a) > 1 else None
        sd_b = statistics.stdev(b) if len(b) > 1 else None
        detectable = (minimum_detectable_difference((sd_a, sd_b), len(a), len(b), alpha=ALPHA)
                      if sd_a is not None and sd_b is not None else None)
    if result is None:
        return None
    test = asdict(result)
    test.update(test=kind, why=why, bonferroni=bonferroni, detectable_difference=detectable)
    p = test.get("p_value")
    test["p_adjusted"] = None if p is None else min(1.0, p * bonferroni)
    return test


def _counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {"finished": sum(r["status"] == "done" for r in rows), "failed": sum(r["status"] == "failed" for r in rows),
            "diverged": sum(r["status"] == "diverged" for r in rows),
            "unfinished": sum(r["status"] not in FINISHED for r in rows)}


def _tested_rows(study: Study, choice: Choice, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if choice.setting is None:
        return []
    variant = study.run(study.method(choice.method), choice.setting, choice.budget, 0).variant
    return [r for r in rows if r["variant"] == variant and r["budget"] == choice.budget and r["stage"] == "test"]


def gain_over_control(run_averages: list[float], control_seed_averages: list[float],
                      confidence: float = 0.95) -> dict[str, Any] | None:
    """The pre-training gain on the downstream average: the mean of a method's run averages minus the mean of the
    control's per-seed suite averages, with Welch's ``confidence`` interval and two-sided p (``None`` for either
    when a side has fewer than two values or neither varies); ``None`` when a side has no value at all."""
    if not run_averages or not control_seed_averages:
        return None
    gain: dict[str, Any] = {
        "gain": statistics.fmean(run_averages) - statistics.fmean(control_seed_averages), "low": None, "high": None,
        "p_value": None, "test": "welch", "confidence": confidence, "runs": len(run_averages),
        "run_mean": statistics.fmean(run_averages), "control_seeds": len(control_seed_averages),
        "control_mean": statistics.fmean(control_seed_averages)}
    return with_test(gain, welch_t_test(run_averages, control_seed_averages, confidence),
                     "fewer than two values on a side: no interval or p-value")


def _gain_entry(tested: list[dict[str, Any]], controls: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The pre-training gain of a method's tested runs over the control of their architecture (``None`` without
    evaluated runs, when they span several architectures, or when that architecture's control is missing)."""
    scored = [r for r in tested if r["status"] == "done" and downstream_average(r) is not None]
    architectures = {(r.get("downstream") or {}).get("architecture") for r in scored}
    if len(architectures) != 1 or next(iter(architectures)) not in controls:
        return None
    architecture = next(iter(architectures))
    gain = gain_over_control([downstream_average(r) for r in scored], list(controls[architecture]["seed_averages"]))
    return None if gain is None else {**gain, "architecture": architecture}


def compare_rows(study: Study, rows: list[dict[str, Any]], choices: dict[tuple[str, str], Choice],
                 controls: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per budget and method: the chosen setting, counts, mean and spread over seeds, and the test against the
    baseline's chosen setting (see the module docstring); with ``controls`` (architecture -> the control's
    ``seed_averages``), the pre-training gain over the control of the runs' architecture."""
    table = []
    for budget in study.budgets:
        baseline_rows = _tested_rows(study, choices[(BASELINE, budget)], rows)
        for method in study.methods:
            choice = choices[(method.name, budget)]
            tested = _tested_rows(study, choice, rows)
            entry: dict[str, Any] = {
                "method": method.name, "budget": budget, "selected_on": choice.selected_on, "decided": choice.decided,
                "grid_size": choice.grid_size, "setting": choice.setting,
                "variant": study.run(method, choice.setting, budget, 0).variant if choice.setting is not None else None,
                "candidates": [asdict(c) | {"mean_val_loss": c.mean_val_loss} for c in choice.candidates],
                "seeds": len(study.seeds), **_counts(tested), "errors": sorted({r["error"] for r in tested if r.get("error")}),
                "stale": sum(bool(r.get("stale")) for r in tested),
            }
            entry["status"] = ("done" if entry["finished"] else "failed" if entry["failed"] + entry["diverged"]
                               else "not chosen" if choice.setting is None else "not run")
            bonferroni = choice.grid_size if choice.selected_on == "test" else 1
            for key, better in METRICS:
                values = [_value(r, key) for r in tested if r["status"] == "done" and _value(r, key) is not None]
                entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std(values)
                entry[f"{key}_better"] = better
                entry[f"{key}_test"] = (compare_metric(tested, baseline_rows, key, study.seeds, bonferroni)
                                        if method.name != BASELINE else None)
            for key in ("optimizer_steps", "wall_seconds", "rst_spent_seconds"):
                entry[f"{key}_mean"] = _mean_std([r[key] for r in tested if r["status"] == "done" and r.get(key) is not None])[0]
            entry["verdict"] = verdict(entry) if method.name != BASELINE else ""
            if controls is not None:
                entry["pretraining_gain"] = _gain_entry(tested, controls)
            table.append(entry)
    return table


def budget_words(budget: str) -> str:
    seconds = parse_duration(budget)
    return f"{seconds / 3600:g} RST-hours" if seconds >= 3600 else f"{seconds:g} RST-seconds"


def _lost_seeds(entry: dict[str, Any]) -> str:
    lost = [f"{entry[k]} {k}" for k in ("failed", "diverged", "unfinished") if entry[k]]
    if not lost:
        return ""
    return f" [on {entry['finished']} of {entry['seeds']} seeds: {', '.join(lost)}]"


def verdict(entry: dict[str, Any]) -> str:
    """One sentence: beat the baseline when its validation loss is lower with (adjusted) p < 0.05."""
    name, budget = entry["variant"] or entry["method"], budget_words(entry["budget"])
    if entry["variant"] is None:
        why = "its grid is still being tuned" if not entry["decided"] else "no setting finished every tuning seed"
        return f"{entry['method']}: not compared at {budget} ({why})."
    test = entry.get("val_loss_test")
    if test is None:
        return f"{name}: not tested against the baseline at {budget} (fewer than two finished seeds on a side).{_lost_seeds(entry)}"
    if test.get("p_value") is None:
        return (f"{name} did not beat the baseline at {budget}: not testable ({test.get('reason') or 'no spread'}; "
                f"difference {test['difference']:+.4f}).{_lost_seeds(entry)}")
    p = test["p_adjusted"]
    beat, worse = test["difference"] < 0 and p < ALPHA, test["difference"] > 0 and p < ALPHA
    outcome = "beat the baseline" if beat else ("did worse than the baseline" if worse else "did not beat the baseline")
    detectable = test.get("detectable_difference")
    could_not_tell = (f"; the study could not tell a difference smaller than {detectable:.4f}"
                      if not beat and not worse and detectable is not None else "")
    adjusted = f", x{test['bonferroni']} Bonferroni for a setting chosen on these seeds" if test["bonferroni"] > 1 else ""
    return (f"{name} {outcome} at {budget}: validation loss {test['difference']:+.4f} "
            f"(95 % CI {test['low']:+.4f} to {test['high']:+.4f}, {test['test']} p = {p:.3g}{adjusted})"
            f"{could_not_tell}.{_lost_seeds(entry)}")
