"""``train.py plan --config CFG [--table FILE] [--budget DURATION] [overrides]``: print the plan as JSON.

Simulates the configuration against a cost table without training: optimizer steps, tokens and RST per phase
(``core.planning``).
"""

from __future__ import annotations

import argparse
import json

from callbacks.rst import RSTBudget
from core.cost_table import CostTable
from core.durations import parse_duration
from core.errors import UserError
from core.planning import plan_run
from training.lightning_cli import configured

TAKES_CONFIG = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", help="RST cost table (default: the config's RSTBudget table)")
    parser.add_argument("--budget", help="RST budget, e.g. 90s, 30m, 24h (default: the config's RSTBudget)")


def run(args: argparse.Namespace) -> None:
    trainer, model, datamodule = configured(args.config_args, device="meta")
    budget = next((c for c in trainer.callbacks if isinstance(c, RSTBudget)), None)
    if args.table:
        table = CostTable.load(args.table)
    elif budget is not None and budget.table is not None:
        table = budget.table
    else:
        raise UserError("plan needs a cost table: pass --table FILE or configure an RSTBudget callback with a table")
    if args.budget:
        seconds = parse_duration(args.budget)
    elif budget is not None:
        seconds = budget.budget_seconds
    else:
        raise UserError("plan needs a budget: pass --budget DURATION (e.g. 24h) or configure an RSTBudget callback")
    print(json.dumps(plan_run(trainer, model, datamodule, table, seconds), indent=2))
