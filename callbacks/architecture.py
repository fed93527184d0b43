"""Checks shared by the callbacks that change which layers run (stacking, dropping)."""

from __future__ import annotations

import lightning as L

from lightning_modules.errors import UserError

__all__ = ["check_depth_callback"]

DEPTH_CALLBACKS = ("LayerStacking", "LayerDropping")


def check_depth_callback(name: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Fail at start-up when a depth-changing callback cannot work in this run.

    - the module must offer layer control (DESIGN.md 1);
    - stacking and dropping cannot be combined: both decide the active layers;
    - under DDP the inactive layers get no gradient, so DDP must look for unused parameters
      (``strategy: ddp_find_unused_parameters_true``), else its gradient reduction waits forever.
    """
    if not callable(getattr(pl_module, "set_active_layers", None)):
        raise UserError(f"{name} needs a module with layer control; {type(pl_module).__name__} has none")
    others = sorted({type(c).__name__ for c in trainer.callbacks if type(c).__name__ in DEPTH_CALLBACKS} - {name})
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
