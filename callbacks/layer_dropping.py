"""Progressive layer dropping: skip deeper layers at random, more often as training goes on.

Zhang and He 2020 ("Accelerating Training of Transformer-Based Language Models with Progressive
Layer Dropping", arXiv:2010.13369), as No Train No Gain uses it (Kaddour et al. 2023, section 4.2,
docs/paper.md). With budget progress tau:

    keep level      theta(tau) = theta_bar + (1 - theta_bar) exp(-gamma_f tau)
    drop layer i    with probability p_i = (1 - theta(tau)) i / L,   i = 1..L (deeper: more often)

so E[active layers] = L - (1 - theta)(L + 1) / 2, which is (3L - 1) / 4 at saturation with
theta_bar = 0.5. Paper: gamma_f = 100 (BERT), 20 (T5), theta_bar = 0.5; no residual rescaling
(``rescale_residual=False``, the paper's code); ``True`` divides each kept layer's residual branch
by its keep probability, as the original PLD. The active set is drawn once per optimizer step from
a generator seeded by ``(seed, step)`` (the run's seed unless ``seed`` is set; ``core/seeds.py``), so every
rank drops the same layers, a resumed run draws what an uninterrupted one would, and another seed draws
other layers. All layers run in validation and test. If every droppable layer
is dropped, the first stays (the paper's code then ran *all* layers). Layers the model requires
(T5 block 0) are never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from callbacks.architecture import check_depth_schedule
from core.contracts import DepthSchedule
from core.errors import UserError
from core.seeds import check_resumed_seed, resolve_seed

__all__ = ["LayerDropping", "drop_probabilities", "expected_active_layers", "keep_level", "sample_active_layers"]


def keep_level(tau: float, gamma_f: float, theta_bar: float) -> float:
    """theta(tau) = theta_bar + (1 - theta_bar) exp(-gamma_f tau): 1 at the start, theta_bar in the limit."""
    return theta_bar + (1.0 - theta_bar) * math.exp(-gamma_f * tau)


def drop_probabilities(theta: float, num_layers: int) -> list[float]:
    """p_i = (1 - theta) i / L for layers i = 1..L (returned in 0-based layer order)."""
    return [(1.0 - theta) * (i + 1) / num_layers for i in range(num_layers)]


def expected_active_layers(theta: float, num_layers: int) -> float:
    """E[active] = L - (1 - theta)(L + 1) / 2."""
    return num_layers - (1.0 - theta) * (num_layers + 1) / 2


def sample_active_layers(
    theta: float, num_layers: int, generator: torch.Generator, required: Sequence[int] = ()
) -> list[int]:
    """Draw the layers that run; ``required`` ones always run; at least one runs."""
    probabilities = torch.tensor(drop_probabilities(theta, num_layers), dtype=torch.float64)
    kept = torch.rand(num_layers, generator=generator, dtype=torch.float64) >= probabilities
    for i in required:
        kept[i] = True
    if not kept.any():
        kept[0] = True
    return kept.nonzero().flatten().tolist()


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class LayerDropping(Callback, DepthSchedule):
    """Progressive layer dropping with the paper's keep schedule and depth rule.

    Args:
        gamma_f: how fast the keep level falls, in units of the budget (paper: BERT 100, T5 20).
        theta_bar: the keep level it falls to (paper: 0.5).
        rescale_residual: divide each kept layer's residual branch by its keep probability (original
            PLD); ``False`` is the paper's code.
        seed: seed of the per-step draws (the same on every rank); ``None`` (default): the run's seed
            (``seed_everything``), resolved at setup (``train.py plan``: when it plans) and checked on resume.
    """

    depth_is_persistent = False  # checkpoints store all layers: the per-step draw is not part of the model

    def __init__(self, gamma_f: float = 100.0, theta_bar: float = 0.5, rescale_residual: bool = False,
                 seed: int | None = None):
        super().__init__()
        if gamma_f < 0:
            raise UserError(f"LayerDropping gamma_f={gamma_f} must be >= 0 (paper: 100 for BERT, 20 for T5)")
        if not 0.0 <= theta_bar <= 1.0:
            raise UserError(f"LayerDropping theta_bar={theta_bar} must be in [0, 1] (paper: 0.5)")
        self.gamma_f = gamma_f
        self.theta_bar = theta_bar
        self.rescale_residual = rescale_residual
        self.seed = seed
        self._draw_seed: int | None = None  # the seed resolved at setup
        self._theta = 1.0
        self._keep: list[float] = []  # per-layer keep probabilities of the current step (rescaling)
        self._checked_step = -1
        self._training_selection: tuple[int, ...] | None = None
        self._hooks: list = []
        self._last_draw: tuple[int, ...] = ()
        self._resumed_draw: tuple[float, list[int]] | None = None

    def draw(self, tau: float, step: int, num_layers: int, required: Sequence[int] = ()) -> list[int]:
        """The layers that run at optimizer step ``step`` with budget progress ``tau``."""
        theta = keep_level(tau, self.gamma_f, self.theta_bar)
        return sample_active_layers(theta, num_layers, step_generator(self.draw_seed, step), required)

    @property
    def draw_seed(self) -> int:
        """The seed of the draws: ``seed``, or the run's seed (resolved at setup; before it, now)."""
        return self._draw_seed if self._draw_seed is not None else resolve_seed(self.seed)

    def planned_active_layers(self, tau: float, num_layers: int, step: int = 0, required: Sequence[int] = ()) -> int:
        """For ``train.py plan``: the number of layers the run will draw at this step (the same draw)."""
        return len(self.draw(tau, step, num_layers, required))

    def planned_phase(self, tau: float) -> str:
        return "layer dropping"

    # ----- hooks ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._draw_seed = resolve_seed(self.seed)
        check_depth_schedule(self, trainer, pl_module)
        if self.rescale_residual and not self._hooks:
            for stack in pl_module.layer_stacks():
                for index, layer in enumerate(stack):
                    self._hooks.append(layer.register_forward_hook(self._rescale_hook(pl_module, index)))

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        pl_module.set_active_layers(None)

    def _rescale_hook(self, pl_module: L.LightningModule, index: int):
        def hook(module, args, output):
            keep = self._keep[index] if self._keep else 1.0
            if not pl_module.training or keep >= 1.0:
                return output  # evaluation, nothing dropped yet, or a layer that is never dropped
            hidden_in = args[0]
            hidden_out = output[0] if isinstance(output, tuple) else output
            rescaled = hidden_in + (hidden_out - hidden_in) / keep
            return (rescaled, *output[1:]) if isinstance(output, tuple) else rescaled

        return hook

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._checked_step = -1

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed_draw is not None:
            # a resumed run continues with the last step's layers and keep level, as the run it continues had
            # them until the next step's draw: a batch selector scores the next candidates with them
            self._theta, active = self._resumed_draw
            self._resumed_draw = None
            self._set_keep_probabilities(pl_module)
            pl_module.set_active_layers(active)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._checked_step:
            return  # inside gradient accumulation: the active set stays fixed within an optimizer step
        self._checked_step = trainer.global_step
        tau = pl_module.budget_progress()
        self._theta = keep_level(tau, self.gamma_f, self.theta_bar)
        self._set_keep_probabilities(pl_module)
        active = self.draw(tau, trainer.global_step, pl_module.num_layers, pl_module.required_layers())
        self._last_draw = tuple(active)
        pl_module.set_active_layers(active)
        pl_module.log_dict(
            {"arch/drop_prob": 1.0 - self._theta, "arch/active_layers": float(len(active))},
            on_step=True,
            on_epoch=False,
        )

    def _set_keep_probabilities(self, pl_module: L.LightningModule) -> None:
        required = set(pl_module.required_layers())
        drops = drop_probabilities(self._theta, pl_module.num_layers)
        self._keep = [1.0 if i in required else 1.0 - p for i, p in enumerate(drops)]

    def _all_layers(self, pl_module: L.LightningModule) -> None:
        self._training_selection = pl_module.active_layers
        pl_module.set_active_layers(None)

    def _restore(self, pl_module: L.LightningModule) -> None:
        if self._training_selection is not None:
            pl_module.set_active_layers(self._training_selection)
            self._training_selection = None

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._all_layers(pl_module)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.set_active_layers(None)  # the trained model runs all its layers from here on

    @override
    def state_dict(self) -> dict[str, Any]:
        # draws derive from (seed, step); the last draw is kept for what runs before the next one
        state: dict[str, Any] = {"seed": self.draw_seed}
        if self._last_draw:
            state.update(theta=self._theta, active_layers=list(self._last_draw))
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("active_layers"):
            self._resumed_draw = (float(state_dict["theta"]), [int(i) for i in state_dict["active_layers"]])
        check_resumed_seed("LayerDropping seed", self.draw_seed, state_dict.get("seed"))
