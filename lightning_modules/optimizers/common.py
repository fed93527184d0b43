"""What the optimizers of this package share: the ``step(closure)`` of ``torch.optim``, written once; the
per-tensor loop of Lion and Sophia; the fusability checks; nanoT5's RMS learning-rate scale.

The RMS scale (nanoT5's ``AdamWScale``, after Adafactor's "relative step"; paper section 3 and
docs/paper.md "T5") multiplies the learning rate of each parameter tensor ``theta`` by

    max(min_scale, RMS(theta)),   RMS(theta) = ||theta||_2 / sqrt(numel(theta)),   min_scale = 1e-3
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch

__all__ = ["cpu_fused_adamw_fits", "fusable", "rms_scale", "rms_scaled_lr"]


class _StepWithClosure(torch.optim.Optimizer, ABC):
    """``step(closure)`` as ``torch.optim``'s optimizers take it: the closure (if any) re-evaluates the loss
    with gradients enabled, then ``update_parameters()`` runs without; the step returns the loss."""

    @abstractmethod
    def update_parameters(self) -> None:
        """Update every parameter that has a gradient (called without autograd)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.update_parameters()
        return loss


class _PerTensorOptimizer(_StepWithClosure):
    """A step that calls ``update(p, group)`` for each parameter with a gradient, between ``start_step``
    and ``end_step``."""

    @abstractmethod
    def update(self, p: torch.Tensor, group: dict) -> None:
        """Update one parameter tensor ``p`` (with its gradient) of ``group``."""

    def start_step(self) -> None:
        """Before the parameters of a step are updated."""

    def end_step(self) -> None:
        """After the parameters of a step are updated."""

    def update_parameters(self) -> None:
        self.start_step()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group)
        self.end_step()


def fusable(groups: Iterable) -> bool:
    """Whether PyTorch's fused (single-kernel) AdamW can update these parameters: floating-point tensors
    on a CPU or a CUDA device (not the meta tensors ``plan`` builds). Several times faster than the
    per-tensor loop on a CPU; the same update up to floating-point rounding."""
    params = [p for group in groups for p in (group["params"] if isinstance(group, dict) else [group])]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def cpu_fused_adamw_fits(params: list[torch.Tensor]) -> bool:
    """Whether ``AdamWScale`` can update ``params`` (with their gradients) by PyTorch's fused AdamW kernel:
    float32 tensors and gradients on the CPU, where it is several times faster than a loop of element-wise
    kernels; elsewhere ``torch._foreach_*`` kernels are fast (GPUs) and need no host synchronisation."""
    return hasattr(torch, "_fused_adamw_") and all(
        p.device.type == "cpu" and p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params
    )


def rms_scale(parameter: torch.Tensor, min_scale: float = 1e-3) -> torch.Tensor:
    """nanoT5's per-tensor factor ``max(min_scale, RMS(parameter))`` as a 0-d tensor on the parameter's
    device (multiplying a step by it needs no host synchronisation)."""
    return (parameter.float().norm(2) / math.sqrt(parameter.numel())).clamp(min=min_scale)


def rms_scaled_lr(lr: float, parameter: torch.Tensor, min_scale: float = 1e-3) -> float:
    """nanoT5's per-tensor rate: ``lr * max(min_scale, RMS(parameter))``."""
    return lr * float(rms_scale(parameter, min_scale))
