"""Optimizers that no well-kept package provides as the paper used them.

- ``AdamWScale``: nanoT5's AdamW with RMS learning-rate scaling (the paper's T5).
- ``Lion`` (Chen et al. 2023, arXiv:2302.06675; No Train No Gain section 6): sign of an interpolated momentum.
- ``SophiaG`` (Liu et al. 2023, arXiv:2305.14342; No Train No Gain section 6): momentum clipped by a
  Gauss-Newton-Bartlett estimate of the Hessian diagonal.
- ``MuonWithAdamW``: ``torch.optim.Muon`` (Jordan et al. 2024) on the hidden weight matrices, AdamW on
  everything else, as one optimizer object.

Lion and Sophia take ``rms_scale=True`` for the T5 variant the paper ran (the learning rate of each
tensor multiplied by ``max(1e-3, RMS(theta))``, as ``AdamWScale``; weight decay uses the unscaled rate).

``AdamWScale`` is nanoT5's AdamW with the learning rate of each tensor scaled by its RMS
(Adafactor's "relative step" scaling, not Adafactor's update clipping; nanoT5 issue #15), used for
the paper's T5 (paper section 3; docs/paper.md "T5"): for each parameter tensor ``theta``

    m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    step = lr * sqrt(1 - beta2^t) / (1 - beta1^t) * max(1e-3, RMS(theta)),   RMS = ||theta||_2 / sqrt(numel)
    theta = theta - step * m / (sqrt(v) + eps);   theta = theta - lr * wd * theta   (decoupled decay)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch

__all__ = ["AdamWScale", "Lion", "MuonWithAdamW", "SophiaG", "fusable", "rms_scale", "rms_scaled_lr"]


class _PerTensorOptimizer(torch.optim.Optimizer, ABC):
    """A ``step`` that evaluates the closure and calls ``update(p, group)`` for each parameter with a gradient."""

    @abstractmethod
    def update(self, p: torch.Tensor, group: dict) -> None:
        """Update one parameter tensor ``p`` (with its gradient) of ``group``."""

    def start_step(self) -> None:
        """Before the parameters of a step are updated."""

    def end_step(self) -> None:
        """After the parameters of a step are updated."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.start_step()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group)
        self.end_step()
        return loss


def fusable(groups: Iterable) -> bool:
    """Whether PyTorch's fused (single-kernel) AdamW can update these parameters: floating-point tensors
    on a CPU or a CUDA device (not the meta tensors ``plan`` builds). Several times faster than the
    per-tensor loop on a CPU; the same update up to floating-point rounding."""
    params = [p for group in groups for p in (group["params"] if isinstance(group, dict) else [group])]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def rms_scale(parameter: torch.Tensor, min_scale: float = 1e-3) -> torch.Tensor:
    """nanoT5's per-tensor factor ``max(min_scale, RMS(parameter))`` as a 0-d tensor on the parameter's
    device (multiplying a step by it needs no host synchronisation)."""
    return (parameter.float().norm(2) / math.sqrt(parameter.numel())).clamp(min=min_scale)


def rms_scaled_lr(lr: float, parameter: torch.Tensor, min_scale: float = 1e-3) -> float:
    """nanoT5's per-tensor rate: ``lr * max(min_scale, RMS(parameter))``."""
    return lr * float(rms_scale(parameter, min_scale))


class AdamWScale(torch.optim.Optimizer):
    """AdamW with per-tensor RMS learning-rate scaling (nanoT5's ``AdamWScale``): for each tensor theta,

        m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
        theta <- theta - lr * max(min_scale, RMS(theta)) * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)
        theta <- theta * (1 - lr * weight_decay)

    On a CPU each tensor is updated by PyTorch's fused AdamW kernel (with the rate and epsilon rescaled to
    this update); elsewhere all tensors of a group with ``torch._foreach_*`` kernels. The RMS scales stay
    on the device (no host synchronisation per tensor).

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
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(params, group)
        return loss

    @staticmethod
    def _fusable(params: list[torch.Tensor]) -> bool:
        """PyTorch's fused AdamW kernel on the CPU for float32 tensors (several times faster than a loop
        of element-wise kernels there); elsewhere ``torch._foreach_*`` (fast on GPUs, no host sync)."""
        return hasattr(torch, "_fused_adamw_") and all(
            p.device.type == "cpu" and p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params
        )

    def _update_group(self, params: list[torch.Tensor], group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        grads = [p.grad.float() for p in params]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
        states = [self.state[p] for p in params]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        sizes = torch.tensor([math.sqrt(p.numel()) for p in params], device=params[0].device)
        norms = torch.stack(torch._foreach_norm([p.float() for p in params]))
        scales = (norms / sizes).clamp_(min=group["min_scale"])  # max(min_scale, RMS(theta)), on the device
        if self._fusable(params):
            # PyTorch's fused AdamW kernel computes lr_t / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps_t):
            # with lr_t = lr x scale and eps_t = eps / sqrt(1 - beta2^t) that is this update, in one pass per tensor
            for p, grad, exp_avg, exp_avg_sq, state, scale in zip(
                params, grads, exp_avgs, exp_avg_sqs, states, scales.unbind(), strict=True
            ):
                step = state["step"]
                torch._fused_adamw_(
                    [p], [grad], [exp_avg], [exp_avg_sq], [], [torch.tensor(float(step))],
                    lr=scale * lr, beta1=beta1, beta2=beta2, weight_decay=0.0,
                    eps=eps / math.sqrt(1.0 - beta2**step), amsgrad=False, maximize=False,
                )
        else:
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            corrections = torch.tensor(  # -lr x bias correction, one per parameter
                [-lr * math.sqrt(1.0 - beta2 ** s["step"]) / (1.0 - beta1 ** s["step"]) for s in states],
                device=params[0].device,
            )
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denominators, eps)
            updates = torch._foreach_div(exp_avgs, denominators)
            torch._foreach_mul_(updates, (scales * corrections).unbind())
            if all(p.dtype == torch.float32 for p in params):
                torch._foreach_add_(params, updates)
            else:
                torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(updates, params, strict=True)])
        if group["weight_decay"] > 0.0:
            torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])


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


class SophiaG(_PerTensorOptimizer):
    """Sophia with the Gauss-Newton-Bartlett Hessian estimate (Liu et al. 2023, Algorithm 3).

    Each step, for each parameter tensor ``theta`` with gradient ``g``, momentum ``m`` and Hessian
    estimate ``h``:

        theta <- theta * (1 - lr * wd)
        m     <- beta1 * m + (1 - beta1) * g
        theta <- theta - lr * sign(m) * min(|m| / (rho * bs * h + 1e-15), 1)

    where ``bs`` is the number of positions the loss averaged over in this step, on every process
    (``set_batch_positions``). Every ``hessian_interval`` steps the training module computes the loss
    against labels *sampled* from the model's own output distribution at those positions and calls
    ``update_hessian``: ``h <- beta2 * h + (1 - beta2) * g_hat^2``. The share of coordinates whose update
    is not clipped, the quantity Sophia's authors tune ``rho`` by, is ``win_rate`` after each step.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (paper: BERT 4e-4; T5 1e-3 with ``rms_scale``).
        betas: ``(beta1, beta2)`` (Liu et al.: 0.965, 0.99).
        rho: clipping scale (paper: 0.01 for both models).
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
        """``bs`` of the next step: the positions the loss averaged over, summed over the processes."""
        self.batch_positions = positions

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["hessian"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def update_hessian(self) -> None:
        """Fold the current gradients (of the sampled-label loss) into the Hessian estimate."""
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


class MuonWithAdamW(torch.optim.Optimizer):
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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

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
