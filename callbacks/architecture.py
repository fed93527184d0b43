"""Checks shared by the callbacks that change which layers run (stacking, dropping): ``DepthSchedule``s."""

from __future__ import annotations

import lightning as L

from core.contracts import DepthSchedule, LayerControl
from core.errors import UserError

__all__ = ["check_depth_schedule"]


def check_depth_schedule(schedule: DepthSchedule, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Fail at start-up when a depth schedule cannot work in this run.

    - the module must offer layer control (``core.contracts.LayerControl``);
    - at most one ``DepthSchedule`` per run (stacking and dropping both decide the active layers);
    - under DDP the inactive layers get no gradient, so DDP must look for unused parameters
      (``strategy: ddp_find_unused_parameters_true``), else its gradient reduction waits forever.
    """
    name = type(schedule).__name__
    if not isinstance(pl_module, LayerControl):
        raise UserError(f"{name} needs a module with layer control; {type(pl_module).__name__} has none")
    others = sorted({type(c).__name__ for c in trainer.callbacks if isinstance(c, DepthSchedule) and c is not schedule})
    if others:
        raise UserError(
            f"{name} cannot be combined with {', '.join(others)}: both decide which layers run; "
            "remove one of them from trainer.callbacks"
        )
    ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
    if ddp_kwargs is not None and trainer.world_size > 1 and not ddp_kwargs.get("find_unused_parameters", False):
        raise UserError(
            f"{name} switches layers off, so under DDP some parameters get no gradient: use "
            "--trainer.strategy ddp_find_unused_parameters_true"
        )
