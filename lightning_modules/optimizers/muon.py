"""``MuonWithAdamW``: ``torch.optim.Muon`` (Jordan et al. 2024, "Muon: An optimizer for hidden layers in
neural networks"; torch 2.9 and later) on the hidden weight matrices, ``torch.optim.AdamW`` on everything
else, as one optimizer object. Not in the paper.

Muon keeps a momentum ``B`` of each 2-D weight matrix and steps along its orthogonalisation, computed by
``k`` Newton-Schulz iterations with coefficients ``(a, b, c)`` (torch.optim.Muon's documentation):

    B <- mu B + g;   O = NS_k(g + mu B if nesterov else B)
    theta <- theta - lr * wd * theta;   theta <- theta - AdjustLR(lr, shape(theta)) * O
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from core.errors import UserError
from lightning_modules.optimizers.common import _StepWithClosure

__all__ = ["MuonWithAdamW"]


class MuonWithAdamW(_StepWithClosure):
    """``torch.optim.Muon`` on the hidden weight matrices, AdamW on everything else, as one optimizer.

    Muon (Jordan et al. 2024) orthogonalizes the momentum of 2-D weight matrices; its authors keep the
    embeddings, the output head, biases and norm gains on AdamW. The training module passes the
    hidden matrices (the 2-D weights of the ``nn.Linear`` layers inside the repeated blocks) as the
    first parameter group; every other group goes to AdamW. One object to Lightning keeps automatic
    optimization, gradient clipping and the learning-rate schedule (both parts follow it: ``lr`` is
    Muon's rate, ``adamw_lr`` AdamW's at the peak).

    Args:
        params: parameter groups; those with ``"muon": True`` go to Muon.
        lr: Muon's learning rate (Muon's authors: 0.02 with ``adjust_lr_fn="match_rms_adamw"`` off).
        momentum: Muon's momentum (0.95).
        weight_decay: weight decay of both parts (a group's own ``weight_decay`` wins).
        adamw_lr: AdamW's learning rate.
        adamw_betas: AdamW's betas.
        adamw_eps: AdamW's eps.
        adjust_lr_fn: ``torch.optim.Muon``'s learning-rate adjustment (``original`` or ``match_rms_adamw``).

    Raises:
        UserError: the installed torch has no ``torch.optim.Muon`` (older than 2.9).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.01,
        adamw_lr: float = 1e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.98),
        adamw_eps: float = 1e-12,
        adjust_lr_fn: str | None = None,
    ) -> None:
        if not hasattr(torch.optim, "Muon"):  # torch 2.9 is the first release with it
            raise UserError(
                f"MuonWithAdamW needs torch.optim.Muon, which torch {torch.__version__} lacks: it came with "
                "torch 2.9; upgrade (pip install 'torch>=2.9') or choose another optimizer"
            )
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]
        muon_groups = [g for g in groups if g.get("muon")]
        adamw_groups = [g for g in groups if not g.get("muon")]
        for group in muon_groups:
            if any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D weight matrices only")
        self.muon = torch.optim.Muon(
            [{k: v for k, v in g.items() if k != "muon"} for g in muon_groups],
            lr=lr, momentum=momentum, weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn,
        ) if muon_groups else None
        self.adamw = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "muon"} for g in adamw_groups],
            lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=weight_decay,
        ) if adamw_groups else None
        self.parts = [o for o in (self.muon, self.adamw) if o is not None]
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, adamw_lr=adamw_lr)
        # torch.optim.Optimizer bookkeeping without a second copy of the groups
        self.defaults = defaults
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}
        self._zero_grad_profile_name = "Optimizer.zero_grad#MuonWithAdamW.zero_grad"

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    @property
    def state(self):
        merged = {}
        for part in self.parts:
            merged.update(part.state)
        return _MergedState(self.parts, merged)

    def update_parameters(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(state)

    def __repr__(self) -> str:
        return f"MuonWithAdamW(muon={self.muon!r}, adamw={self.adamw!r})"


class _MergedState(dict):
    """The per-parameter state of both parts; writes go to the part that owns the parameter."""

    def __init__(self, parts, merged) -> None:
        super().__init__(merged)
        self._parts = parts

    def __setitem__(self, parameter, value) -> None:
        super().__setitem__(parameter, value)
        for part in self._parts:
            if any(parameter is p for group in part.param_groups for p in group["params"]):
                part.state[parameter] = value
                return
