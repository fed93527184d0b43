"""A study's report: did each method beat the baseline at each budget?

``results.csv`` (one row per run), ``comparison.json`` and ``report.md`` (per method and budget: the chosen
setting, mean and spread over seeds, the difference to the baseline with its 95 % interval and Welch's p-value,
``core.significance``), the plots and TensorBoard's HParams view (``studies.plots``). A tuned method's setting is
chosen per budget on mean validation loss, never on a downstream score.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.durations import parse_duration
from core.significance import welch_t_test
from studies.plots import downstream_average, write_hparams, write_plots
from studies.study import BASELINE, Study, run_status

__all__ = ["CSV_FIELDS", "compare_rows", "write_report"]


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
    return downstream_average(row) if key == "downstream_average" else row.get(key)


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
    plots = write_plots(study, rows, out)
    write_hparams(study, rows, out)
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


