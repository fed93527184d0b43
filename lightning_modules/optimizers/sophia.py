"""``SophiaG`` (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", arXiv:2305.14342, Algorithm 3; No Train No Gain section 6): momentum clipped by a
Gauss-Newton-Bartlett estimate of the Hessian diagonal.

It implements the ``EstimatesHessian`` contract (core/contracts.py): the training module finds it by that
type, keeps the micro-batches of every ``hessian_interval``-th step and calls ``update_hessian`` with the
gradients, neither clipped nor rescaled, of the loss against labels sampled from the model's own output
distribution (Liu et al., Algorithm 2), then ``set_batch_positions`` with the number of those labels. ``rms_scale=True`` is the T5 variant the paper ran: the rate of each tensor multiplied by
``max(1e-3, RMS(theta))``, as ``AdamWScale``; weight decay uses the unscaled rate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lightning_modules.optimizers.common import _PerTensorOptimizer, rms_scale

__all__ = ["SophiaG"]


class SophiaG(_PerTensorOptimizer):
    """Sophia with the Gauss-Newton-Bartlett Hessian estimate (Liu et al. 2023, Algorithm 3).

    Each step, for each parameter tensor ``theta`` with gradient ``g``, momentum ``m`` and Hessian
    estimate ``h``:

        theta <- theta * (1 - lr * wd)
        m     <- beta1 * m + (1 - beta1) * g
        theta <- theta - lr * sign(m) * min(|m| / (rho * bs * h + 1e-15), 1)

    Every ``hessian_interval`` steps the training module takes the loss against labels *sampled* from the
    model's own output distribution at the loss positions of ``hessian_micro_batches`` micro-batches of
    the step (a mean over those B positions, the gradients averaged over the processes), and calls
    ``update_hessian`` with its gradient ``g_hat``, unclipped: ``h <- beta2 * h + (1 - beta2) * g_hat^2``;
    then ``set_batch_positions(B)``.

    ``bs`` is that B: the number of sampled labels the last estimate averaged over, summed over the
    processes (kept in the state dict). Liu et al.'s Algorithm 2 returns the estimator ``B * g_hat^2``
    and Algorithm 3 steps by ``clip(m / max(gamma * h_paper, eps), 1)``, with ``h_paper`` the EMA of those
    estimators. Here ``h`` is the EMA of ``g_hat^2`` (as in their code) and ``bs * h = h_paper``, so
    ``rho`` is the paper's ``gamma`` (exactly so while B is the same at every estimate; BERT's masked
    count varies by a few per cent). B is the Hessian batch, not the step's batch: an estimate over half
    of the micro-batches has a ``g_hat^2`` about twice as large, and B half as large, so ``rho`` keeps
    its meaning whatever ``hessian_micro_batches`` is. Before the first estimate ``h = 0`` and ``bs`` does
    not matter (every coordinate steps by ``lr * sign(m)``). The share of coordinates whose update is not
    clipped, the quantity Sophia's authors tune ``rho`` by, is ``win_rate`` after each step.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (paper: BERT 4e-4; T5 1e-3 with ``rms_scale``).
        betas: ``(beta1, beta2)`` (Liu et al.: 0.965, 0.99).
        rho: clipping scale, Liu et al.'s gamma (paper: 0.01 for both models; see ``bs`` above).
        weight_decay: decoupled weight decay (paper BERT: 0.015; Liu et al.: 0.1 or 0.2).
        hessian_interval: optimizer steps between Hessian estimates (paper and Liu et al.: 10).
        hessian_micro_batches: micro-batches of a step used for an estimate (``None``: all of them;
            the paper's BERT: 6 of 12, 768 sequences).
        free_hessian: do not charge the Hessian passes to the budget (the paper's ablation).
        rms_scale: scale each tensor's rate by ``max(1e-3, RMS(theta))`` (the paper's T5).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        hessian_interval: int = 10,
        hessian_micro_batches: int | None = None,
        free_hessian: bool = False,
        rms_scale: bool = False,
    ) -> None:
        if lr < 0 or rho < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr}, rho={rho} and weight_decay={weight_decay} must be non-negative")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas} must be in [0, 1)")
        if hessian_interval < 1:
            raise ValueError(f"hessian_interval={hessian_interval} must be at least 1 (the paper: 10)")
        if hessian_micro_batches is not None and hessian_micro_batches < 1:
            raise ValueError(f"hessian_micro_batches={hessian_micro_batches} must be positive or None (all)")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, rms_scale=rms_scale)
        super().__init__(params, defaults)
        self.hessian_interval = hessian_interval
        self.hessian_micro_batches = hessian_micro_batches
        self.free_hessian = free_hessian
        self.batch_positions: float | torch.Tensor = 1.0
        self.win_rate: torch.Tensor | None = None

    def set_batch_positions(self, positions: float | torch.Tensor) -> None:
        """``bs`` from now on: the labels the Hessian estimate just folded in averaged over, summed over the
        processes (Liu et al. 2023, Algorithm 2's B)."""
        self.batch_positions = positions

    def state_dict(self) -> dict:
        """``torch.optim``'s state dict and ``bs`` (set only at an estimate: a resume needs it before the next)."""
        return {**super().state_dict(), "batch_positions": float(self.batch_positions)}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        positions = state_dict.pop("batch_positions", None)
        super().load_state_dict(state_dict)
        if positions is not None:
            self.batch_positions = float(positions)

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["hessian"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def update_hessian(self) -> None:
        """Fold the current gradients (of the sampled-label loss, unclipped) into the Hessian estimate:
        ``h <- beta2 * h + (1 - beta2) * g_hat^2`` (Liu et al. 2023, Algorithm 3, with ``B`` in ``bs``)."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                self._state(p)["hessian"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

    def start_step(self) -> None:
        self._unclipped, self._coordinates = None, 0

    def update(self, p: torch.Tensor, group: dict) -> None:
        state = self._state(p)
        state["step"] += 1
        lr = group["lr"] * rms_scale(p) if group["rms_scale"] else group["lr"]
        if group["weight_decay"] > 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        exp_avg = state["exp_avg"]
        exp_avg.mul_(group["betas"][0]).add_(p.grad.float(), alpha=1.0 - group["betas"][0])
        ratio = (exp_avg.abs() / (group["rho"] * self.batch_positions * state["hessian"] + 1e-15)).clamp(max=1.0)
        p.sub_((exp_avg.sign() * ratio).mul_(lr).to(p.dtype))
        wins = (ratio < 1.0).sum()
        self._unclipped = wins if self._unclipped is None else self._unclipped + wins
        self._coordinates += ratio.numel()

    def end_step(self) -> None:
        if self._unclipped is not None:  # a tensor: reading it is the caller's choice (no sync here)
            self.win_rate = self._unclipped.float() / self._coordinates
