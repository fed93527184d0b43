"""Measuring a cost table on this machine (``train.py calibrate``, and the throughput benchmark).

Times forward+backward and forward-only micro-batches at every active depth and the optimizer step
(``core.calibration``) for the model and data of a configuration, and the own work of its callbacks
(``DoesOwnWork.measure_work``: an EMA update) under ``work_seconds``, and writes the table atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.calibration import calibrate, time_fwd_bwd_by_length, time_optimizer_steps
from core.class_paths import import_class
from core.contracts import DoesOwnWork, SequenceSchedule
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
        update: time only the optimizers' steps (and, with ``work``, the callbacks' own work) and add them to
            the existing table at ``output``.
        work: with ``update``, time the own work of the configuration's callbacks too.
        lengths: with ``update``, time the shorter sequence lengths of the configuration's sequence-length
            schedule too.
    """

    output: str
    warmup: int = 3
    iterations: int = 10
    rounds: int = 3
    optimizers: str | None = None
    update: bool = False
    work: bool = False
    lengths: bool = False


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


def own_work_prices(trainer, model, device, log: Callable[[str], None] = print) -> dict[str, float]:
    """Seconds of one unit of each kind of work the configuration's callbacks do of their own, on ``device``."""
    model.to(device).train()
    prices: dict[str, float] = {}
    for callback in trainer.callbacks:
        if isinstance(callback, DoesOwnWork):
            measured = callback.measure_work(model)
            missing = set(callback.work_kinds()) - set(measured)
            if missing:
                raise UserError(f"{type(callback).__name__} cannot time its work {', '.join(sorted(missing))} apart: "
                                "price it in the table's work_seconds by hand, or use RSTBudget mode=wall")
            prices.update(measured)
    for kind, seconds in prices.items():
        log(f"  {kind}: {seconds * 1e3:.3f} ms")
    return prices


def length_prices(settings: CalibrationSettings, trainer, model, datamodule, log: Callable[[str], None] = print
                  ) -> dict[int, list[float]]:
    """Forward+backward prices at every depth of each shorter length the configuration's sequence-length schedule
    can train on (none without one)."""
    schedules = [c for c in trainer.callbacks if isinstance(c, SequenceSchedule)]
    if not schedules:
        return {}
    lengths = schedules[0].lengths(datamodule.seq_len)
    log(f"  timing sequences of {', '.join(map(str, lengths))} tokens")
    batches = {n: datamodule.synthetic_batch(datamodule.batch_size, length=n) for n in lengths}
    prices = time_fwd_bwd_by_length(model, batches, device=trainer.strategy.root_device, precision=str(trainer.precision),
                                    warmup=settings.warmup, iterations=settings.iterations, rounds=settings.rounds)
    for n, seconds in prices.items():
        log(f"  {n:4d} tokens, {model.num_layers} layers: forward+backward {seconds[-1] * 1e3:9.3f} ms")
    return prices


def _update_prices(settings: CalibrationSettings, trainer, model, datamodule, builders, log) -> None:
    if not builders and not settings.work and not settings.lengths:
        raise UserError("--update times the optimizers named by --optimizers (with --work, the callbacks' own work; "
                        "with --lengths, a warm-up's sequence lengths): name at least one of them")
    device = trainer.strategy.root_device
    table = CostTable.load(settings.output)
    table.check_run(micro_batch_size=datamodule.batch_size, seq_len=datamodule.seq_len, num_layers=model.num_layers)
    if settings.lengths or settings.work:
        # the table may come from another machine: time the full length here too, and keep the table's scale
        # (a price added = the table's full-length price x what this machine measures relative to its full length)
        full = datamodule.seq_len
        anchor = time_fwd_bwd_by_length(model, {full: datamodule.synthetic_batch(datamodule.batch_size)}, device=device,
                                        precision=str(trainer.precision), warmup=settings.warmup,
                                        iterations=settings.iterations, rounds=settings.rounds)[full]
        scale = [table_price / here for table_price, here in zip(table.fwd_bwd_seconds, anchor)]
        log(f"  the table's full-length forward+backward is {scale[-1]:.3f} x this machine's: prices keep its scale")
        added = []
        if settings.lengths:
            prices = length_prices(settings, trainer, model, datamodule, log)
            if not prices:
                raise UserError("--lengths: this configuration has no sequence-length schedule (e.g. "
                                "SequenceLengthWarmup)")
            table.fwd_bwd_seconds_by_length.update(
                {n: [price * s for price, s in zip(seconds, scale)] for n, seconds in prices.items()})
            added.append(f"forward+backward of sequences of {', '.join(map(str, prices))} tokens")
        if settings.work:
            work = own_work_prices(trainer, model, device, log)
            if not work:
                raise UserError("--work: no callback of this configuration does work of its own (e.g. EMA, LAWA)")
            table.work_seconds.update({kind: seconds * scale[-1] for kind, seconds in work.items()})
            added.append(", ".join(work))
        table.save(settings.output)
        log(f"updated {settings.output}: prices of {'; '.join(added)}")
        if not builders:
            return
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
    if (settings.work or settings.lengths) and not settings.update:
        raise UserError("--work and --lengths add prices to an existing table: use them with --update (a full "
                        "calibration times the callbacks' own work and a warm-up's lengths anyway)")
    if settings.update:
        _update_prices(settings, trainer, model, datamodule, builders, log)
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
    table.work_seconds.update(own_work_prices(trainer, model, device, log))
    table.fwd_bwd_seconds_by_length.update(length_prices(settings, trainer, model, datamodule, log))
    table.save(settings.output)
    full = table.fwd_bwd_seconds[-1]
    log(f"wrote {settings.output}: {full * 1e3:.3f} ms per forward+backward micro-batch at {model.num_layers} layers "
          f"({datamodule.batch_size * datamodule.seq_len / full:,.0f} tokens/s)")
