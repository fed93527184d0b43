"""``Lion`` (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675,
Algorithm 2; No Train No Gain section 6): the sign of an interpolated momentum.

``rms_scale=True`` is the T5 variant the paper ran: the rate of each tensor multiplied by
``max(1e-3, RMS(theta))``, as ``AdamWScale``; weight decay uses the unscaled rate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lightning_modules.optimizers.common import _PerTensorOptimizer, rms_scale

__all__ = ["Lion"]


class Lion(_PerTensorOptimizer):
    """Lion (Chen et al. 2023, Algorithm 2), for each parameter tensor ``theta`` with gradient ``g``:

        theta <- theta * (1 - lr * wd)
        theta <- theta - lr * sign(beta1 * m + (1 - beta1) * g)
        m     <- beta2 * m + (1 - beta2) * g

    Args:
        params: parameters or parameter groups.
        lr: learning rate (paper: BERT 7e-4, T5 7.5e-4 with ``rms_scale``; Lion's authors use 3-10x
            smaller rates than AdamW).
        betas: ``(beta1, beta2)`` (Chen et al.: 0.9, 0.99).
        weight_decay: decoupled weight decay (Chen et al.: 3-10x AdamW's, since the rate is smaller).
        rms_scale: scale each tensor's rate by ``max(1e-3, RMS(theta))`` (the paper's T5).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        rms_scale: bool = False,
    ) -> None:
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr} and weight_decay={weight_decay} must be non-negative")
        if not (0.0 <= betas[0] <= 1.0 and 0.0 <= betas[1] <= 1.0):
            raise ValueError(f"betas={betas} must be in [0, 1]")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, rms_scale=rms_scale))

    def update(self, p: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        grad, exp_avg = p.grad.float(), state["exp_avg"]
        lr = group["lr"] * rms_scale(p) if group["rms_scale"] else group["lr"]
        if group["weight_decay"] > 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        update = exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1).sign_()
        p.sub_(update.mul_(lr).to(p.dtype))
        exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)
