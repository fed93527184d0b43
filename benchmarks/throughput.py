"""Throughput of this project's training step against the stock ``transformers`` alternative, on this machine.

    python benchmarks/throughput.py                       # the full run: prints a table, writes BENCHMARKS.md
    python benchmarks/throughput.py --output result.json  # ... and the raw figures as JSON

In one process, interleaving the contenders in rounds (a passing slowdown of a shared machine hits
one round of each rather than all steps of one), it measures tokens/s (median over timed optimizer
steps after warm-up; the ratios between contenders pair the medians of each round and take the median
over rounds) of

  (a) the project's module (``BertMLM``, ``T5SpanCorruption``) inside the Lightning ``Trainer`` as a
      user runs it: ``RSTBudget``, ``LearningRateMonitor``, ``ModelCheckpoint``, TensorBoard logging,
      gradient clipping, the budget-progress LR schedule;
  (b) the same module's step in a hand-written PyTorch loop (the floor for framework overhead);
  (c) the stock ``transformers`` model a user would pick instead (``BertForMaskedLM`` with its
      full-vocabulary head; ``T5ForConditionalGeneration`` computing its own loss), same dimensions,
      in a hand-written loop;

each on the same batches (made by the project's collators from random tokens), with AdamW and
gradient clipping at 0.5 (the paper's recipe). It measures the float32 matrix-multiply peak in the
same run and reports model FLOP utilisation (MFU): the matrix-multiply FLOPs of one forward+backward
of that contender, counted by ``torch.utils.flop_counter`` on its own batches, per second, over the
peak. With ``bf16-mixed`` it times (a) again, where the CPU/GPU has native bf16 (else it says so and
reports the figure without a target: emulated bf16 is slower than float32).

End to end (``--fit-args``, default the README's BERT demo): ``train.py calibrate`` measures the cost
table on this machine, ``fit`` runs under the config's RST budget (``--fit-budget`` to change it) priced
by that table, with the config's
validation, logging and checkpointing, and ``calibrate`` measures again; it reports wall seconds per
optimizer step over the calibrated RST seconds per step (the mean of both tables' prices for the
fit's work), the share of step time spent waiting for the dataloader, and the seconds from the start
of ``fit`` to the first optimizer step (data from the cache).

``--tiny`` runs everything at a tiny shape in seconds (the test suite does). ``python -m benchmarks.throughput``
runs the same (both need the project installed, ``pip install -e .``, as the README's commands do). The contenders are in ``benchmarks/contenders.py``, the measurements in
``benchmarks/measurement.py`` (the machine's in ``machine.py``, FLOP counting in ``flops.py``), the report in
``benchmarks/report.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.contenders import TINY, Contender, Shape, bert_contenders, t5_contenders
from benchmarks.machine import device_name, matmul_peak, native_bf16
from benchmarks.measurement import data_preparation, end_to_end, run_rounds
from benchmarks.report import keep_device_check, markdown, paired_ratio, ratios, summarize
from core.host_memory import GLIBC_STEADY_STATE, retain_freed_memory

ROOT = Path(__file__).resolve().parents[1]


def log(text: str) -> None:
    print(text, flush=True)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--output", help="write the figures as JSON to this file")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="the report (default: BENCHMARKS.md)")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape and few steps (seconds; for tests)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per contender and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per contender and round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: bert, t5, bf16, fit, data")
    parser.add_argument("--fit-args", default="--config configs/bert/demo.yaml",
                        help="train.py fit arguments of the end-to-end fit, one string (default: the README demo)")
    parser.add_argument("--fit-budget", default=None,
                        help="RST budget of the end-to-end fit (default: the config's own, 150s for the demo)")
    for name in Shape.__dataclass_fields__:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    args = parser.parse_args(argv)
    if args.tiny:
        args.rounds, args.steps = min(args.rounds, 2), min(args.steps, 2)
    args.skip, args.fit_args = set(filter(None, args.skip.split(","))), shlex.split(args.fit_args)
    return args


def shape_of(args: argparse.Namespace) -> Shape:
    """The default (or ``--tiny``) shape with the dimensions given on the command line."""
    shape = TINY if args.tiny else Shape()
    return replace(shape, **{k: v for k, v in vars(args).items() if k in Shape.__dataclass_fields__ and v})


def set_up_machine(device: torch.device) -> dict[str, Any]:
    """The machine's facts for the report, after keeping freed host memory in the process for the whole run.

    The project's modules keep freed host memory (core/host_memory.py) once a Trainer sets them up; the stock
    contenders run with glibc's own steady state instead."""
    retained = retain_freed_memory() if device.type == "cpu" else False
    native, evidence = native_bf16(device)
    log(f"device: {device_name(device)}; native bf16: {native} ({evidence})")
    return {"device": device_name(device), "torch": torch.__version__, "native_bf16": native,
            "bf16_evidence": evidence,
            "freed_memory_retained": retained,
            "stock_malloc_thresholds": list(GLIBC_STEADY_STATE) if retained else None}


@dataclass
class Run:
    """What the phases read (the options, the device, a scratch folder) and write (``result``, ``times``)."""

    args: argparse.Namespace
    device: torch.device
    workdir: Path
    result: dict[str, Any]
    times: dict[str, list[list[float]]] = field(default_factory=dict)  # each contender's step times by round

    @property
    def native_bf16(self) -> bool:
        return self.result["machine"]["native_bf16"]


def compare_steps(run: Run) -> None:
    """The contenders' optimizer steps, interleaved in rounds; a row for each."""
    args, shape = run.args, shape_of(run.args)
    contenders: dict[str, Contender] = {}
    if "bert" not in args.skip:
        contenders.update(bert_contenders(shape, run.device, run.workdir, bf16="bf16" not in args.skip))
    if "t5" not in args.skip:
        contenders.update(t5_contenders(shape, run.device, run.workdir))
    slow = set() if run.native_bf16 else {"bert_trainer_bf16"}
    log(f"timing {', '.join(contenders)}: {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up")
    run.times, peaks = run_rounds(contenders, args.rounds, args.steps, args.warmup, slow,
                                  lambda: matmul_peak(run.device, torch.float32, quick=args.tiny), log)
    run.result["machine"]["fp32_matmul_peak_flops_by_round"] = peaks
    tokens = {"bert": shape.batch * shape.seq_len, "t5": shape.batch * shape.seq_len}
    run.result["contenders"] = summarize(run.times, peaks, contenders, tokens)


def prepare_data(run: Run) -> None:
    run.result["data"] = data_preparation(run.args.fit_args, run.workdir, log)


def fit_end_to_end(run: Run) -> None:
    run.result["end_to_end"] = end_to_end(run.args.fit_args, run.args.fit_budget, run.workdir, log)


PHASES: tuple[tuple[frozenset[str], Callable[[Run], None]], ...] = (  # (the --skip parts that skip it, the phase)
    (frozenset(), compare_steps),
    (frozenset({"fit", "data"}), prepare_data),
    (frozenset({"fit"}), fit_end_to_end),
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device(args.device)
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": set_up_machine(device),
        "shape": asdict(shape_of(args)),
    }
    with tempfile.TemporaryDirectory(prefix="ntng-bench-") as tmp:
        run = Run(args, device, Path(tmp), result)
        for skipped_by, phase in PHASES:
            if not skipped_by & run.args.skip:
                phase(run)
    result["ratios"] = ratios(run.times, result["contenders"], result.get("end_to_end"), run.native_bf16)
    if not run.native_bf16 and "bert_trainer_bf16" in result["contenders"]:
        result["bert_bf16_vs_fp32_emulated"] = paired_ratio(run.times, "bert_trainer_bf16", "bert_trainer_fp32")
    report = markdown(result)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(keep_device_check(report, Path(args.markdown)))  # device_check.py's section
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
