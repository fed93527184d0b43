"""``train.py calibrate --config CFG --output FILE [--optimizers A,B] [--update]``: measure a cost table.

Times forward+backward and forward-only micro-batches at every active depth and the optimizer step on this
machine (``core.calibration``), and writes the table atomically.
"""

from __future__ import annotations

import argparse

from cli.lightning_cli import configured
from core.calibration import calibrate, time_optimizer_steps
from core.class_paths import import_class
from core.cost_table import CostTable
from core.errors import UserError

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


def optimizer_builders(model, class_paths: str | None) -> list:
    """Functions that build each optimizer class named in ``class_paths`` (comma-separated) over ``model``
    with the class's defaults, grouped as the module groups its parameters (``build_optimizer``)."""
    builders = []
    for path in filter(None, (class_paths or "").split(",")):
        optimizer_class = import_class(path.strip(), what="--optimizers",
                                       example="lightning_modules.optimizers.Lion,pytorch_optimizer.SOAP")

        def build(optimizer_class=optimizer_class):
            saved, model.optimizer_factory = model.optimizer_factory, optimizer_class
            try:
                return model.build_optimizer()
            finally:
                model.optimizer_factory = saved

        builders.append(build)
    return builders


def _update_optimizer_prices(args, trainer, model, datamodule, builders) -> None:
    if not builders:
        raise UserError("--update times the optimizers named by --optimizers: name at least one")
    device = trainer.strategy.root_device
    table = CostTable.load(args.output)
    table.check_run(micro_batch_size=datamodule.batch_size, seq_len=datamodule.seq_len, num_layers=model.num_layers)
    batch = {k: v.to(device) for k, v in datamodule.synthetic_batch(datamodule.batch_size).items()}
    model.to(device).train()

    def make_gradients() -> None:
        model.zero_grad(set_to_none=True)
        loss, _ = model.compute_loss(batch)
        loss.backward()

    measured = time_optimizer_steps(model, make_gradients, builders, device, args.warmup, args.iterations, args.rounds)
    table.optimizer_step_seconds.update(measured)
    table.save(args.output)
    for name, seconds in measured.items():
        print(f"  optimizer step ({name}): {seconds * 1e3:.3f} ms")
    print(f"updated {args.output}: optimizer step prices for {', '.join(measured)}")


def run(args: argparse.Namespace) -> None:
    if args.warmup < 0 or args.iterations < 1 or args.rounds < 1:
        raise UserError("--warmup must be >= 0, --iterations and --rounds >= 1")
    trainer, model, datamodule = configured(args.config_args)
    builders = optimizer_builders(model, args.optimizers)
    if args.update:
        _update_optimizer_prices(args, trainer, model, datamodule, builders)
        return
    device = trainer.strategy.root_device
    print(f"Calibrating {type(model).__name__} ({model.num_layers} layers), micro-batch {datamodule.batch_size} "
          f"x {datamodule.seq_len} tokens, precision {trainer.precision}, on {device}:")
    table = calibrate(
        model,
        datamodule.synthetic_batch(datamodule.batch_size),
        device=device,
        precision=str(trainer.precision),
        seq_len=datamodule.seq_len,
        warmup=args.warmup,
        iterations=args.iterations,
        rounds=args.rounds,
        extra_optimizers=builders,
    )
    table.save(args.output)
    full = table.fwd_bwd_seconds[-1]
    print(f"wrote {args.output}: {full * 1e3:.3f} ms per forward+backward micro-batch at {model.num_layers} layers "
          f"({datamodule.batch_size * datamodule.seq_len / full:,.0f} tokens/s)")
