"""``train.py calibrate --config CFG --output FILE [--optimizers A,B] [--update [--work] [--lengths]]``: measure a cost table.

Times forward+backward and forward-only micro-batches at every active depth and the optimizer step on this
machine (``training.calibration``), and the own work of the configuration's callbacks (an EMA update), and
writes the table atomically.
"""

from __future__ import annotations

import argparse

from training.calibration import CalibrationSettings, calibrate_config

TAKES_CONFIG = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="where to write the table (JSON, written atomically)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before each measurement")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations; their median is one round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all depths; the fastest is kept")
    parser.add_argument("--optimizers", help="more optimizers to time besides the config's, as class paths, "
                        "e.g. lightning_modules.optimizers.Lion,lightning_modules.optimizers.SophiaG")
    parser.add_argument("--update", action="store_true", help="time only the optimizers' steps and add them to "
                        "the existing table at --output (its other prices are kept)")
    parser.add_argument("--work", action="store_true", help="with --update: also time the own work of the config's "
                        "callbacks (e.g. an EMA update) and add its prices under work_seconds")
    parser.add_argument("--lengths", action="store_true", help="with --update: also time forward+backward at every "
                        "shorter length of the config's sequence-length warm-up (fwd_bwd_seconds_by_length)")


def run(args: argparse.Namespace) -> None:
    settings = CalibrationSettings(output=args.output, warmup=args.warmup, iterations=args.iterations, rounds=args.rounds,
                                   optimizers=args.optimizers, update=args.update, work=args.work,
                                   lengths=args.lengths)
    calibrate_config(args.config_args, settings)
