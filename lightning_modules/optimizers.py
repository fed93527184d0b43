"""Optimizers that no well-kept package provides as the paper used them.

``AdamWScale`` is nanoT5's AdamW with the learning rate of each tensor scaled by its RMS
(Adafactor's "relative step" scaling, not Adafactor's update clipping; nanoT5 issue #15), used for
the paper's T5 (paper section 3; docs/paper.md "T5"): for each parameter tensor ``theta``

    m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    step = lr * sqrt(1 - beta2^t) / (1 - beta1^t) * max(1e-3, RMS(theta)),   RMS = ||theta||_2 / sqrt(numel)
    theta = theta - step * m / (sqrt(v) + eps);   theta = theta - lr * wd * theta   (decoupled decay)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["AdamWScale"]


class AdamWScale(torch.optim.Optimizer):
    """AdamW with per-tensor RMS learning-rate scaling (nanoT5's ``AdamWScale``).

    Args:
        params: parameters or parameter groups.
        lr: base learning rate (paper T5: 2e-2).
        betas: moment coefficients (paper T5: 0.9, 0.999).
        eps: denominator term (paper T5: 1e-6).
        weight_decay: decoupled weight decay, applied after the step (paper T5: 0).
        min_scale: floor of the RMS scale (nanoT5: 1e-3).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        min_scale: float = 1e-3,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr}, eps={eps} and weight_decay={weight_decay} must be non-negative")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas} must be in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_scale=min_scale)
        super().__init__(params, defaults)

    @staticmethod
    def rms(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.norm(2) / math.sqrt(tensor.numel())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                step_size = step_size * max(group["min_scale"], float(self.rms(p.float())))
                update = (exp_avg / denom).mul_(-step_size)
                p.add_(update.to(p.dtype))
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss
