"""Layer stacking: train a shallow model, then double its depth by copying its layers.

Gong et al. 2019 ("Efficient Training of BERT by Progressively Stacking"), as No Train No Gain uses
it (Kaddour et al. 2023, section 4.1 and appendix C.1; docs/paper.md): start with ``initial_layers`` of the L allocated
layers active; when budget progress tau reaches each of ``fractions`` (paper: 0.125 and 0.3), copy
layers ``0..n-1`` onto ``n..2n-1`` and run ``2n`` (BERT 4 -> 8 -> 16, T5 3 -> 6 -> 12 in the encoder
and the decoder alike). The learning-rate schedule runs on uninterrupted. New layers start with
fresh optimizer state (the paper's runs; its ``reset_optim`` flag was dead config) unless
``copy_optimizer_state`` copies their sources' state. Hooks: ``setup`` (checks), ``on_fit_start``
(depth after a resume), ``on_train_batch_start`` (grow at the first micro-batch of an optimizer step,
so the depth is fixed within a step), checkpoint state (the depth reached).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from callbacks.architecture import check_depth_schedule
from core.contracts import DepthSchedule
from core.errors import UserError

__all__ = ["LayerStacking", "copy_layer", "copy_optimizer_state", "depth_at"]


def depth_at(tau: float, initial_layers: int, fractions: Sequence[float]) -> int:
    """Active depth at budget progress ``tau``: ``initial_layers`` doubled once per fraction reached."""
    return initial_layers * 2 ** sum(tau >= f for f in fractions)


def copy_layer(source: nn.Module, target: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Copy ``source``'s parameters and buffers into ``target`` by name; return the parameter pairs.

    By name, not by order: T5's block 0 holds the relative position bias that other blocks lack, so
    the bias is not copied and every parameter of the target must find its namesake in the source.
    """
    source_params = dict(source.named_parameters())
    pairs = []
    with torch.no_grad():
        for name, parameter in target.named_parameters():
            if name not in source_params:
                raise UserError(f"cannot stack: the target layer's {name} has no counterpart in the source layer")
            parameter.copy_(source_params[name])
            pairs.append((source_params[name], parameter))
        source_buffers = dict(source.named_buffers())
        for name, buffer in target.named_buffers():
            if name in source_buffers:
                buffer.copy_(source_buffers[name])
    return pairs


def copy_optimizer_state(optimizer: torch.optim.Optimizer, pairs: Sequence[tuple[nn.Parameter, nn.Parameter]]) -> int:
    """Give each target parameter a copy of its source's per-parameter optimizer state; return how many."""
    copied = 0
    for source, target in pairs:
        state = optimizer.state.get(source)
        if state:
            optimizer.state[target] = {
                key: value.detach().clone() if torch.is_tensor(value) else copy.deepcopy(value)
                for key, value in state.items()
            }
            copied += 1
    return copied


class LayerStacking(Callback, DepthSchedule):
    """Progressive stacking: double the active depth at budget fractions by copying layers.

    Args:
        initial_layers: active layers at the start (paper: BERT 4 of 16, T5 3 of 12).
        fractions: budget progress at which the depth doubles (paper: 0.125 and 0.3).
        copy_optimizer_state: give the new layers a copy of their sources' optimizer state
            (moments, step counts) instead of fresh state.

    Raises:
        UserError: ``initial_layers * 2 ** len(fractions)`` differs from the model's depth, fractions
            outside (0, 1) or not increasing, or an incompatible run (see ``check_depth_callback``).
    """

    def __init__(
        self,
        initial_layers: int = 4,
        fractions: list[float] = [0.125, 0.3],  # noqa: B006 (a LightningCLI-friendly default)
        copy_optimizer_state: bool = False,
    ) -> None:
        super().__init__()
        fractions = [float(f) for f in fractions]
        if initial_layers < 1:
            raise UserError(f"LayerStacking initial_layers={initial_layers} must be at least 1")
        if not fractions or any(not 0.0 < f < 1.0 for f in fractions) or fractions != sorted(set(fractions)):
            raise UserError(f"LayerStacking fractions={fractions} must be increasing values in (0, 1), e.g. [0.125, 0.3]")
        self.initial_layers = initial_layers
        self.fractions = fractions
        self.copy_optimizer_state = copy_optimizer_state
        self._depth = initial_layers
        self._checked_step = -1

    @property
    def final_layers(self) -> int:
        return self.initial_layers * 2 ** len(self.fractions)

    def planned_active_layers(self, tau: float, num_layers: int, step: int = 0, required: Sequence[int] = ()) -> int:
        """For ``train.py plan``: the depth at budget progress ``tau``."""
        return depth_at(tau, self.initial_layers, self.fractions)

    # ----- hooks ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_depth_schedule(self, trainer, pl_module)
        if self.final_layers != pl_module.num_layers:
            raise UserError(
                f"LayerStacking grows {self.initial_layers} layers to {self.final_layers} in {len(self.fractions)} "
                f"doublings, but the model has {pl_module.num_layers}: set initial_layers to "
                f"{pl_module.num_layers / 2 ** len(self.fractions):g} or change model.num_layers"
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.set_active_layers(range(self._depth))  # the depth reached before a resume, or the start
        self._checked_step = -1

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._checked_step:
            return  # inside gradient accumulation: the depth stays fixed within an optimizer step
        self._checked_step = trainer.global_step
        target = depth_at(pl_module.budget_progress(), self.initial_layers, self.fractions)
        while self._depth < target:
            self._grow(trainer, pl_module)
        pl_module.log("arch/active_layers", float(self._depth), on_step=True, on_epoch=False)

    def _grow(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n = self._depth
        pairs = []
        for stack in pl_module.layer_stacks():
            for i in range(n):
                pairs += copy_layer(stack[i], stack[n + i])
        if self.copy_optimizer_state:
            for optimizer in trainer.optimizers:
                copy_optimizer_state(optimizer, pairs)
        self._depth = 2 * n
        pl_module.set_active_layers(range(self._depth))

    # ----- checkpoint -----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"depth": self._depth}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._depth = int(state_dict.get("depth", self.initial_layers))
