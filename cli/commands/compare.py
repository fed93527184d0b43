"""``train.py compare --study FILE [--output DIR] [--launcher local|print|slurm] [--report] [--run ID]``: run the
study's methods, budgets and seeds (skipping finished runs of an unchanged configuration, continuing interrupted
ones) and write its report."""

from __future__ import annotations

import argparse

from studies.report import write_report
from studies.runner import run_study
from studies.study import load_study

TAKES_CONFIG = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="the study file (YAML), e.g. configs/studies/smoke.yaml")
    parser.add_argument("--output", help="the study directory (default runs/studies/<name>)")
    parser.add_argument("--launcher", default="local", choices=["local", "print", "slurm"],
                        help="local: one run after another here (default); print: the runs' commands, one per line; "
                             "slurm: a job-array script")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the runs on disk")
    parser.add_argument("--run", help="run only this run (its id, e.g. baseline/60s/seed0; what print and slurm launch)")
    parser.add_argument("--keep-stale", action="store_true", help="keep finished runs whose configuration changed since "
                        "(marked stale in the report) instead of running them again")


def run(args: argparse.Namespace) -> None:
    study = load_study(args.study, args.output)

    def log(text: str) -> None:
        print(text, flush=True)

    if args.report:
        write_report(study, log)
    else:
        run_study(study, args.launcher, args.run, log, keep_stale=args.keep_stale)
