"""The whole GPU check in one command: cost tables, throughput, compile, host syncs and memory, on this device.

    python benchmarks/device_check.py                  # on one CUDA GPU (H100, H200): sized for at most 8 minutes
    python benchmarks/device_check.py --write-tables   # ... and save the tables as configs/rst/{bert,t5}-<gpu>-bf16.json
    python benchmarks/device_check.py --dry-run        # every part at a tiny shape, in under a minute (the tests)

On a GPU, ``--dry-run`` runs the CUDA code at the tiny shape first (a minute, mostly compiling): a cheap rehearsal.

It runs these parts in turn at the paper's shapes (``configs/bert/baseline.yaml``, ``configs/t5/baseline.yaml``),
each writing its own entry of the JSON; a part that fails records ``{"error": ...}`` and the next one runs
(the exit status is then 1):

  tables      ``train.py calibrate`` of both baselines in bf16-mixed (``training.calibration``), with the step
              of every optimizer a shipped config names (``configs/{bert,t5}/*.yaml``) priced too; the
              tables' prices go into the JSON, the tables themselves, sealed as ``calibrate`` seals them, into a
              scratch folder (``--write-tables``: into ``configs/rst/``, named by the GPU model, e.g. ``h100``);
  throughput  the contenders of ``benchmarks/throughput.py`` (the module in the Trainer, in a hand loop, the
              stock ``transformers`` model) at the paper's shapes, in interleaved rounds, with their model FLOP
              utilisation (MFU) against the bf16 (and fp32) matrix-multiply peak measured in the same run;
  compile     short BERT fits by step budget with ``compile_blocks`` on and off across a layer-stacking
              boundary (``configs/bert/stacking.yaml``), and one compiled fit with layer dropping
              (``configs/bert/dropping.yaml``): optimizer steps/s after warm-up, and whether
              ``torch.compile`` compiles again on every step (dynamo's frame counter read after each step);
  host_syncs  the host-device synchronisations per optimizer step of a BERT and a T5 fit with a table-mode
              ``RSTBudget`` and the default ``NonFiniteCheck``: the median over steady steps (not the first
              ones, nor logging steps) of the reads ``core.host_sync.HostReadCounter`` counts and, on a GPU, of
              the warnings of ``torch.cuda.set_sync_debug_mode("warn")``, with the code lines that make them;
  memory      the peak memory of each part: ``torch.cuda.max_memory_allocated`` (a CPU: the process's peak RSS).

The fits train on a generated corpus (the device needs no network), in a scratch folder. Options:

  --dry-run          a tiny shape, one round of one step, fits of a few steps (on the CPU: under a minute)
  --output FILE      the JSON (default: ``benchmarks/device_check-<gpu>.json`` on a GPU; none in a dry run)
  --markdown FILE    the report whose device-check section (between ``<!-- device-check:start -->`` and
                     ``<!-- device-check:end -->``) is written in place or appended, the rest of the file kept
                     (default: ``BENCHMARKS.md`` on a GPU; none in a dry run); ``throughput.py`` keeps the section
                     when it rewrites that file
  --write-tables     save the calibrated tables under ``configs/rst/``
  --skip PART,...    leave parts out: tables, throughput, compile, host_syncs
  --device DEVICE    where to run (default: ``cuda`` where there is one; ``cpu`` only with ``--dry-run``)

The JSON holds ``date``, ``command``, ``device``, ``torch``, ``dry_run``, ``seconds`` (the whole run and each
part) and one entry per part. Without a CUDA device only ``--dry-run`` runs.
"""


from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.device_parts import run_part
from benchmarks.device_report import markdown_section, write_markdown
from benchmarks.device_setup import DRY_SCALE, PARTS, ROOT, Check, full_scale, gpu_slug, log
from benchmarks.machine import device_name


# ----- main ----------------------------------------------------------------------------------------
def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="every part at a tiny shape (seconds; for tests)")
    parser.add_argument("--output", help="the JSON (default: benchmarks/device_check-<gpu>.json; none in a dry run)")
    parser.add_argument("--markdown", help="the report to put the section in (default: BENCHMARKS.md; none in a dry run)")
    parser.add_argument("--write-tables", action="store_true",
                        help="save the tables as configs/rst/<model>-<gpu>-bf16.json")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda where there is one)")
    args = parser.parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    if args.skip - set(PARTS):
        parser.error(f"--skip: unknown parts {', '.join(sorted(args.skip - set(PARTS)))}; the parts: {', '.join(PARTS)}")
    if torch.device(args.device).type != "cuda" and not args.dry_run:
        parser.error("no CUDA device: the check runs at the paper's shapes on a GPU; use --dry-run here")
    if args.write_tables and args.dry_run:
        parser.error("--write-tables saves the paper-scale tables: a dry run's tiny ones stay in its scratch folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device(args.device)
    if args.dry_run:  # tiny shapes: one thread is as fast, and a busy machine cannot stall its spinning peers
        torch.set_num_threads(1)
    name = device_name(device)
    if not args.dry_run:
        args.output = args.output or str(ROOT / "benchmarks" / f"device_check-{gpu_slug(name)}.json")
        args.markdown = args.markdown or str(ROOT / "BENCHMARKS.md")
    measure = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process (cumulative)"
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/device_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": name, "torch": torch.__version__, "dry_run": args.dry_run, "seconds": {},
        "memory": {"measure": measure, "peak_bytes": {}},
    }
    scope = "a dry run" if args.dry_run else "the paper's shapes"
    log(f"device check on {name} ({scope})")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ntng-device-check-") as tmp:
        check = Check(args, device, DRY_SCALE if args.dry_run else full_scale(), Path(tmp))
        ok = [run_part(check, part, result) for part in PARTS if part not in args.skip]
    result["seconds"]["total"] = time.perf_counter() - start
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.output}")
    if args.markdown:
        write_markdown(Path(args.markdown), markdown_section(result))
        log(f"wrote the device-check section of {args.markdown}")
    log(f"device check: {sum(ok)} of {len(ok)} parts passed in {result['seconds']['total']:.0f} s")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
