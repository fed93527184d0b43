"""Measuring a cost table on this machine (``train.py calibrate``, and the throughput benchmark).

Times forward+backward and forward-only micro-batches at every active depth and the optimizer step
(``core.calibration``) for the model and data of a configuration, and writes the table atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.calibration import calibrate, time_optimizer_steps
from core.class_paths import import_class
from core.cost_table import CostTable
from core.errors import UserError
from training.lightning_cli import configured

__all__ = ["CalibrationSettings", "calibrate_config", "optimizer_builders"]


@dataclass(frozen=True)
class CalibrationSettings:
    """How to measure.

    Attributes:
        output: where to write the table (JSON, written atomically).
        warmup: untimed iterations before each measurement.
        iterations: timed iterations; their median is one round.
        rounds: rounds over all depths; the fastest is kept.
        optimizers: more optimizers to time besides the config's, as comma-separated class paths.
        update: time only the optimizers' steps and add them to the existing table at ``output``.
    """

    output: str
    warmup: int = 3
    iterations: int = 10
    rounds: int = 3
    optimizers: str | None = None
    update: bool = False


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


def _update_optimizer_prices(settings: CalibrationSettings, trainer, model, datamodule, builders, log) -> None:
    if not builders:
        raise UserError("--update times the optimizers named by --optimizers: name at least one")
    device = trainer.strategy.root_device
    table = CostTable.load(settings.output)
    table.check_run(micro_batch_size=datamodule.batch_size, seq_len=datamodule.seq_len, num_layers=model.num_layers)
    batch = {k: v.to(device) for k, v in datamodule.synthetic_batch(datamodule.batch_size).items()}
    model.to(device).train()

    def make_gradients() -> None:
        model.zero_grad(set_to_none=True)
        loss, _ = model.compute_loss(batch)
        loss.backward()

    measured = time_optimizer_steps(model, make_gradients, builders, device, settings.warmup, settings.iterations, settings.rounds)
    table.optimizer_step_seconds.update(measured)
    table.save(settings.output)
    for name, seconds in measured.items():
        log(f"  optimizer step ({name}): {seconds * 1e3:.3f} ms")
    log(f"updated {settings.output}: optimizer step prices for {', '.join(measured)}")


def calibrate_config(config_args: list[str], settings: CalibrationSettings, log: Callable[[str], None] = print) -> None:
    """Measure the cost table of the configuration ``config_args`` (``--config FILE`` and overrides) on this machine
    and write it to ``settings.output``; with ``settings.update``, add only the optimizers' step prices to it."""
    if settings.warmup < 0 or settings.iterations < 1 or settings.rounds < 1:
        raise UserError("--warmup must be >= 0, --iterations and --rounds >= 1")
    trainer, model, datamodule = configured(config_args)
    builders = optimizer_builders(model, settings.optimizers)
    if settings.update:
        _update_optimizer_prices(settings, trainer, model, datamodule, builders, log)
        return
    device = trainer.strategy.root_device
    log(f"Calibrating {type(model).__name__} ({model.num_layers} layers), micro-batch {datamodule.batch_size} "
          f"x {datamodule.seq_len} tokens, precision {trainer.precision}, on {device}:")
    table = calibrate(
        model,
        datamodule.synthetic_batch(datamodule.batch_size),
        device=device,
        precision=str(trainer.precision),
        seq_len=datamodule.seq_len,
        warmup=settings.warmup,
        iterations=settings.iterations,
        rounds=settings.rounds,
        extra_optimizers=builders,
    )
    table.save(settings.output)
    full = table.fwd_bwd_seconds[-1]
    log(f"wrote {settings.output}: {full * 1e3:.3f} ms per forward+backward micro-batch at {model.num_layers} layers "
          f"({datamodule.batch_size * datamodule.seq_len / full:,.0f} tokens/s)")
