"""A study's report: ``results.csv`` (one row per run), ``comparison.json`` and ``report.md`` (per method and budget:
the chosen setting, the seeds that finished, failed or diverged, mean and spread over seeds, the difference to the
baseline with its interval, the test used and its p-value, the smallest difference the study could detect;
``studies.comparison``; with a random-init control, each method's pre-training gain over it), the plots and
TensorBoard's HParams view (``studies.plots``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from studies.comparison import compare_rows
from studies.control import suite_seed_scores
from studies.plots import downstream_average, write_hparams, write_plots
from studies.study import Study
from studies.tuning import choose_settings, outcomes

__all__ = ["CSV_FIELDS", "read_controls", "write_report"]

CSV_FIELDS = ["method", "variant", "stage", "budget", "seed", "setting", "status", "optimizer_steps", "tokens",
              "rst_spent_seconds", "wall_seconds", "train_loss", "val_loss", "downstream_average", "downstream", "error",
              "stale"]


def _collect(study: Study) -> tuple[list[dict[str, Any]], dict, dict[str, list[str]]]:
    choices = choose_settings(study)
    rows = outcomes(study.tuning_runs() + study.test_runs({k: c.setting for k, c in choices.items()}))
    stale_file = study.output / "stale.json"
    stale = json.loads(stale_file.read_text()) if stale_file.is_file() else {"rerun": [], "kept": []}
    for row in rows:
        row["stale"] = row["run"].run_id in stale["kept"]
    return rows, choices, stale


def read_controls(study: Study) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The study's controls on disk (``<study>/controls/<architecture>/downstream.json``): architecture -> its
    average, per-seed suite averages, seeds and file; and the architectures whose control failed -> the last line
    of its ``evaluate.log``."""
    controls: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    root = study.output / "controls"
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        result = directory / "downstream.json"
        if result.is_file():
            scores = json.loads(result.read_text())
            by_seed = suite_seed_scores(scores["tasks"])
            controls[directory.name] = {"average": scores["average"], "seed_averages": list(by_seed.values()),
                                        "seeds": list(by_seed), "file": str(result)}
        elif (directory / "evaluate.log").is_file():
            lines = [line for line in (directory / "evaluate.log").read_text().splitlines() if line.strip()]
            failed[directory.name] = lines[-1].strip() if lines else "no output"
    return controls, failed


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_report(study: Study, log=print) -> Path:
    """results.csv, comparison.json, report.md, the plots and the TensorBoard HParams view, from the runs on disk."""
    rows, choices, stale = _collect(study)
    out = study.output
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "setting": json.dumps(r.get("setting") or {}), "downstream_average": downstream_average(r),
                             "downstream": json.dumps((r.get("downstream") or {}).get("tasks")) if r.get("downstream") else ""})
    controls, failed_controls = read_controls(study) if study.control else ({}, {})
    table = compare_rows(study, rows, choices, controls if study.control else None)
    (out / "comparison.json").write_text(json.dumps(table, indent=2, default=str) + "\n")
    tested = [r for r in rows if r["stage"] == "test"]
    plots = write_plots(study, tested, out)
    write_hparams(study, tested, out)
    (out / "report.md").write_text(_markdown(study, rows, table, plots, stale, (controls, failed_controls)))
    log(f"report: {out / 'report.md'} (results.csv, {', '.join(plots)}; tensorboard --logdir {out})")
    return out / "report.md"


def _test_cells(test: dict[str, Any] | None) -> tuple[str, str, str]:
    if test is None:
        return "", "", ""
    if test.get("p_value") is None:
        return f"{test['difference']:+.4f}", "not testable", ""
    diff = f"{test['difference']:+.4f} ({test['low']:+.4f}, {test['high']:+.4f})"
    detectable = _fmt(test.get("detectable_difference"))
    return diff, f"{test['p_adjusted']:.3g} ({test['test']})", detectable


def _table_lines(table: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| budget | method | setting | seeds finished / failed / diverged | val loss | vs baseline (95 % CI) | p (test) "
        "| detectable | train loss | downstream | steps | wall s |",
        "|---|---|---|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in table:
        counts = f"{e['finished']} / {e['failed']} / {e['diverged']}" + (f" ({e['unfinished']} unfinished)" if e["unfinished"] else "")
        if e["status"] != "done":
            lines.append(f"| {e['budget']} | {e['method']} | {e['status']} | {counts} | | | | | | | | |")
            continue
        diff, p, detectable = _test_cells(e.get("val_loss_test"))
        val = f"{_fmt(e['val_loss_mean'])} ± {_fmt(e['val_loss_std'])}"
        train_loss = f"{_fmt(e['train_loss_mean'])} ± {_fmt(e['train_loss_std'])}"
        down = (f"{_fmt(e['downstream_average_mean'], 2)} ± {_fmt(e['downstream_average_std'], 2)}"
                if e["downstream_average_mean"] is not None else "n/a")
        setting = (e["variant"][len(e["method"]):] or "-") + (" (stale)" if e["stale"] else "")
        lines.append(f"| {e['budget']} | {e['method']} | {setting} | {counts} | {val} | {diff} | {p} | {detectable} | "
                     f"{train_loss} | {down} | {_fmt(e['optimizer_steps_mean'], 0)} | {_fmt(e['wall_seconds_mean'], 0)} |")
    return lines


def _tuning_lines(table: list[dict[str, Any]]) -> list[str]:
    lines = []
    for e in table:
        if len(e["candidates"]) < 2:
            continue
        where = "its tuning seeds" if e["selected_on"] == "tune" else "the tested seeds (optimistic: Bonferroni applied)"
        cells = [f"{c['variant'][len(e['method']):]} {_fmt(c['mean_val_loss'])} ({c['finished']} finished"
                 + (f", {c['failed']} failed" if c["failed"] else "") + (f", {c['diverged']} diverged" if c["diverged"] else "")
                 + ("" if c["eligible"] else ", not eligible") + ")" for c in e["candidates"]]
        lines.append(f"- {e['method']} at {e['budget']}, chosen on {where}: " + "; ".join(cells) + ".")
    return lines


def _gain_lines(study: Study, table: list[dict[str, Any]], controls: dict[str, dict[str, Any]],
                failed: dict[str, str]) -> list[str]:
    """The section on the random-init control: every method's pre-training gain, then each control."""
    lines = [
        "| budget | method | setting | downstream (runs) | control (seeds) | pre-training gain (95 % CI) | p (test) |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for e in table:
        gain = e.get("pretraining_gain")
        setting = (e["variant"] or e["method"])[len(e["method"]):] or "-"
        if gain is None:
            lines.append(f"| {e['budget']} | {e['method']} | {setting} | | | n/a | |")
            continue
        interval = f" ({gain['low']:+.2f}, {gain['high']:+.2f})" if gain["p_value"] is not None else ""
        p = f"{gain['p_value']:.3g} ({gain['test']})" if gain["p_value"] is not None else "not testable"
        lines.append(f"| {e['budget']} | {e['method']} | {setting} | {gain['run_mean']:.2f} ({gain['runs']}) | "
                     f"{gain['control_mean']:.2f} ({gain['control_seeds']}) | {gain['gain']:+.2f}{interval} | {p} |")
    lines.append("")
    for architecture, control in controls.items():
        seeds = ", ".join(f"{s} {v:.2f}" for s, v in zip(control["seeds"], control["seed_averages"], strict=True))
        lines.append(f"- Architecture `{architecture}`: the {study.control} control's downstream average "
                     f"{_fmt(control['average'], 2)} (median over seeds per task, as a run's); per seed {seeds} "
                     f"(`{Path(control['file']).relative_to(study.output)}`).")
    for architecture, error in failed.items():
        lines.append(f"- Architecture `{architecture}`: the {study.control} control failed ({error}); see "
                     f"`controls/{architecture}/evaluate.log`. It runs again on the next invocation.")
    if not controls and not failed:
        lines.append(f"- No {study.control} control has run yet: it runs after the first tested run of each "
                     "architecture is evaluated.")
    return lines


def _markdown(study: Study, rows: list[dict[str, Any]], table: list[dict[str, Any]], plots: list[str],
              stale: dict[str, list[str]],
              controls: tuple[dict[str, dict[str, Any]], dict[str, str]] = ({}, {})) -> str:
    lines = [
        f"# Study `{study.name}`",
        "",
        f"Study file `{study.path}`; base {', '.join(f'`{b}`' for b in study.base)}; budgets {', '.join(study.budgets)}; "
        f"seeds {list(study.seeds)}" + (f"; tuning seeds {list(study.tune_seeds)}" if study.tune_seeds else "")
        + f"; table `{study.table or 'from the config'}`"
        + (f"; downstream suite `{study.evaluate['suite']}`" if study.evaluate else "") + ".",
        f"Runs: {sum(r['status'] == 'done' for r in rows)} done, {sum(r['status'] == 'failed' for r in rows)} failed, "
        f"{sum(r['status'] == 'diverged' for r in rows)} diverged, "
        f"{sum(r['status'] in ('pending', 'interrupted') for r in rows)} not finished, of {len(rows)}"
        + (f"; {len(stale['rerun'])} run(s) were run again because their configuration changed" if stale["rerun"] else "")
        + (f"; {len(stale['kept'])} run(s) of an older configuration kept (--keep-stale), marked stale" if stale["kept"] else "")
        + ".",
        "",
        *_table_lines(table),
        "",
        "## Verdicts",
        "",
    ]
    lines += [f"- {e['verdict']}" for e in table if e.get("verdict")]
    lines += [f"- {e['method']} at {e['budget']}: errors: {'; '.join(e['errors'])}" for e in table if e["errors"]]
    downstream_tests = [e for e in table if (e.get("downstream_average_test") or {}).get("p_value") is not None]
    if downstream_tests:
        lines += ["", "Downstream average vs the baseline (higher is better): " + "; ".join(
            f"{e['variant']} at {e['budget']} {e['downstream_average_test']['difference']:+.2f} "
            f"(p = {e['downstream_average_test']['p_adjusted']:.3g})" for e in downstream_tests) + "."]
    if study.control:
        lines += ["", "## Pre-training gain: the random-init control", "", *_gain_lines(study, table, *controls)]
    tuning = _tuning_lines(table)
    if tuning:
        lines += ["", "## Tuning", "", *tuning]
    lines += ["", "## How to read this", "", *_how_to_read(study), ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _how_to_read(study: Study) -> list[str]:
    return [
        f"Mean ± standard deviation over the study's {len(study.seeds)} seed(s). A seed sets every source of "
        "run-to-run randomness of a run (initialisation, data order, training masks, selection and drop draws); the "
        "validation split, its masks and the tokenizer are the same for every run. A method and the baseline run "
        "with the same seed see the same data, so when every seed finished in both arms the difference is tested "
        "per seed (paired t-test); otherwise the finished values are compared by Welch's t-test. The test used is "
        "named beside each p-value. \"Beat the baseline\" means a lower validation loss at p < 0.05, two-sided. "
        "Each method is compared with the baseline's chosen setting only.",
        "",
        "A method with a grid is chosen on validation loss (never on the downstream score) among the settings whose "
        "every seed finished"
        + (", on the tuning seeds, and tested on the other seeds." if study.tune_seeds else
           "; with no `tune_seeds` the choice and the test use the same seeds, which flatters the chosen setting, "
           "so its p-value is multiplied by the grid's size (Bonferroni).")
        + " \"Detectable\" is the smallest true difference the study would find at p < 0.05 with 80 % power, "
        "given the observed seed-to-seed spread and the number of seeds: \"did not beat\" means the study could "
        "not tell a difference smaller than that, not that the methods are equal. Identical values on both sides "
        "(no spread) are not testable.",
    ] + ([
        "",
        "The pre-training gain is a method's mean downstream average over its tested runs minus the mean of the "
        f"{study.control} control's per-seed suite averages: the same architecture, recipe and fine-tuning seeds "
        "from randomly initialised weights, fine-tuned once per architecture for the whole study. The runs and the "
        "control's seeds are compared as independent samples (Welch's t-test, 95 % interval). A gain near zero "
        "means the downstream score does not show pre-training at all.",
    ] if study.control else [])
