"""``AdamWScale``: nanoT5's AdamW with the learning rate of each tensor scaled by its RMS.

Adafactor's "relative step" scaling, not Adafactor's update clipping (nanoT5 issue #15), used for the
paper's T5 (paper section 3; docs/paper.md "T5"): for each parameter tensor ``theta``

    m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    step = lr * sqrt(1 - beta2^t) / (1 - beta1^t) * max(1e-3, RMS(theta)),   RMS = ||theta||_2 / sqrt(numel)
    theta = theta - step * m / (sqrt(v) + eps);   theta = theta - lr * wd * theta   (decoupled decay)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from lightning_modules.optimizers.common import _StepWithClosure, cpu_fused_adamw_fits

__all__ = ["AdamWScale"]


class AdamWScale(_StepWithClosure):
    """AdamW with per-tensor RMS learning-rate scaling (nanoT5's ``AdamWScale``): for each tensor theta,

        m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
        theta <- theta - lr * max(min_scale, RMS(theta)) * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)
        theta <- theta * (1 - lr * weight_decay)

    On a CPU each tensor is updated by PyTorch's fused AdamW kernel (with the rate and epsilon rescaled to
    this update); elsewhere all tensors of a group with ``torch._foreach_*`` kernels, with the RMS scales,
    step counts and bias corrections on the device: a step reads nothing on the host. A 0-d ``found_inf``
    attribute of 1 (set by ``callbacks.numerics.NonFiniteCheck``) drops the whole update, leaving parameters
    and state bit-identical, decided on the device.

    Args:
        params: parameters or parameter groups.
        lr: base learning rate (paper T5: 2e-2).
        betas: moment coefficients (paper T5: 0.9, 0.999).
        eps: denominator term (paper T5: 1e-6).
        weight_decay: decoupled weight decay, applied after the step (paper T5: 0).
        min_scale: floor of the RMS scale (nanoT5: 1e-3).
    """

    _fusable = staticmethod(cpu_fused_adamw_fits)  # which path a group takes (a class attribute: tests force either)

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

    accepts_found_inf = True  # a 0-d ``found_inf`` of 1 drops the whole update (callbacks.numerics.skips_on_device)

    def update_parameters(self) -> None:
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(params, group, found_inf)

    def _update_group(self, params: list[torch.Tensor], group: dict, found_inf: torch.Tensor | None) -> None:
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        states = [self.state[p] for p in params]
        grads = [p.grad.float() for p in params]
        norms = torch._foreach_norm([p.float() for p in params])
        rms = torch._foreach_div(norms, [math.sqrt(p.numel()) for p in params])  # the sizes travel as kernel arguments
        scales = torch.stack(rms).clamp_(min=group["min_scale"])  # max(min_scale, RMS(theta)), on the device
        if self._fusable(params):
            self._update_fused(params, grads, states, scales, group, found_inf)
        else:
            self._update_foreach(params, grads, states, scales, group, found_inf)

    @staticmethod
    def _update_fused(params, grads, states, scales, group: dict, found_inf: torch.Tensor | None) -> None:
        """PyTorch's fused AdamW kernel, one tensor at a time, with the step count on the host (a CPU: reading
        ``found_inf`` there waits for nothing). The kernel computes
        lr_t / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps_t): with lr_t = lr x scale and
        eps_t = eps / sqrt(1 - beta2^t) that is this update, in one pass per tensor."""
        if found_inf is not None and bool(found_inf):
            return
        beta1, beta2 = group["betas"]
        for p, grad, state, scale in zip(params, grads, states, scales.unbind(), strict=True):
            state["step"] = step = int(state["step"]) + 1
            torch._fused_adamw_(
                [p], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [torch.tensor(float(step))],
                lr=scale * group["lr"], beta1=beta1, beta2=beta2, weight_decay=0.0,
                eps=group["eps"] / math.sqrt(1.0 - beta2**step), amsgrad=False, maximize=False,
            )
        if group["weight_decay"] > 0.0:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])

    @staticmethod
    def _update_foreach(params, grads, states, scales, group: dict, found_inf: torch.Tensor | None) -> None:
        """``torch._foreach_*`` kernels over the group, with the step counts on the device, so nothing is read on
        the host; a ``found_inf`` of 1 turns every factor into the identity (1, or 0 added): bit-identical."""
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        device = params[0].device
        for state in states:  # a count saved by the fused path (an int) or loaded to the CPU moves here once
            step = state["step"]
            if not isinstance(step, torch.Tensor) or step.device != device or step.dtype != torch.float32:
                state["step"] = torch.as_tensor(float(step), dtype=torch.float32).to(device)
        steps = [state["step"] for state in states]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        if found_inf is None:  # plain numbers: no tensor is made from the host
            keep: torch.Tensor | float = 1.0
            torch._foreach_add_(steps, 1.0)
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
        else:  # the same factors, or the identity where the step is dropped (0 added, 1 multiplied): exact
            dropped = found_inf.to(device).bool()
            keep = (~dropped).float()
            torch._foreach_add_(steps, [keep] * len(steps))  # elementwise (the Tensor overload reads it on a CPU)
            for g in grads:  # a non-finite gradient must not reach the moments; adds exactly 0 below
                g.masked_fill_(dropped, 0.0)
            torch._foreach_lerp_(exp_avgs, grads, [torch.where(dropped, 0.0, 1.0 - beta1)] * len(grads))
            torch._foreach_mul_(exp_avg_sqs, torch.where(dropped, 1.0, beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        # -lr x bias correction per tensor, in float64 as the host computed it (a first step dropped: no 0/0)
        counts = torch.stack(steps).to(torch.float32 if device.type == "mps" else torch.float64).clamp(min=1.0)
        corrections = (-lr * torch.sqrt(1.0 - beta2**counts) / (1.0 - beta1**counts)).float()
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denominators, eps)
        updates = torch._foreach_div(exp_avgs, denominators)
        torch._foreach_mul_(updates, (scales * corrections * keep).unbind())
        if all(p.dtype == torch.float32 for p in params):
            torch._foreach_add_(params, updates)
        else:
            torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(updates, params, strict=True)])
        if decay > 0.0:
            factor = 1.0 - lr * decay
            torch._foreach_mul_(params, factor if found_inf is None else torch.where(dropped, 1.0, factor))
