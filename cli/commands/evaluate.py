"""``train.py evaluate --ckpt_path CKPT|DIR --suite {glue,superglue,sni,offline} --output FILE.json [--seeds 0,1,2]``:
fine-tune and score the checkpoint on every task of the suite (the last epoch's scores, the median over seeds)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from core.errors import UserError
from studies.evaluation import SUITES, Recipe, evaluate_checkpoint

TAKES_CONFIG = False


def recipe_field_types() -> dict[str, type]:
    """Each ``Recipe`` field and the type its command-line value converts to (``int | None`` -> ``int``)."""
    hints = typing.get_type_hints(Recipe)
    converters = {}
    for field in dataclasses.fields(Recipe):
        hint = hints[field.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        converters[field.name] = hint
    return converters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt_path", required=True, help="a pre-training checkpoint (.ckpt) or a train.py export directory")
    parser.add_argument("--suite", required=True, help=f"one of {', '.join(SUITES)}")
    parser.add_argument("--output", required=True, help="the JSON file to write")
    parser.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds (default 0; the paper: several)")
    parser.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
    parser.add_argument("--select", default="last", choices=["last", "best"],
                        help="score of the last epoch (default) or the best epoch per metric (the paper's code; optimistic)")
    parser.add_argument("--data_dir", help="local files in the hub's schema for glue/superglue/sni (no hub access)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision of the fine-tuning (default 32-true)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--control", choices=["random-init"],
                        help="also fine-tune a randomly initialised copy of the same architecture per seed (same recipe) "
                             "and report the pre-training gain: pre-trained minus control, 95 %% interval, p over seeds")
    parser.add_argument("--control_only", action="store_true", help="fine-tune only the control (with --control)")
    parser.add_argument("--tuning", action="store_true",
                        help="score on a held-out fifth of the training split (at most max_eval_examples), not on the "
                             "validation split: for choosing a recipe")
    parser.add_argument("--no_references", action="store_true",
                        help="skip the reference scores (majority class, TF-IDF + logistic regression, lead-N)")
    for name, kind in recipe_field_types().items():
        parser.add_argument(f"--{name}", type=kind, help=f"override the suite's {name}")


def run(args: argparse.Namespace) -> None:
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {args.seeds}: give comma-separated integers, e.g. 0,1,2") from None
    overrides = {field.name: getattr(args, field.name) for field in dataclasses.fields(Recipe)}
    evaluate_checkpoint(args.ckpt_path, args.suite, args.output, seeds=seeds,
                        tasks=[t.strip() for t in args.tasks.split(",")] if args.tasks else None, overrides=overrides,
                        select=args.select, data_dir=args.data_dir, precision=args.precision, control=args.control,
                        control_only=args.control_only, tuning=args.tuning, references=not args.no_references,
                        progress=not args.no_progress and sys.stderr.isatty(),
                        log=lambda text: print(text, flush=True))
    print(f"wrote {args.output}")
