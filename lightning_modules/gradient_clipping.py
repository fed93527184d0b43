"""Gradient clipping as Lightning does it, with two differences: a norm computed once, fused optimizers under bf16.

- A check that runs before clipping and computes the step's total gradient norm (``NonFiniteCheck``) hands it
  over (``reuse_gradient_norm``); clipping by norm then scales the gradients by it
  (``torch.nn.utils.clip_grads_with_norm_``) instead of computing it again: ``clip_grad_norm_``'s result, one
  pass over the gradients fewer.
- Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales fp16 gradients inside its
  kernel (fused AdamW). Under ``bf16-mixed`` nothing is scaled, so clipping runs as in ``32-true``; the fused
  optimizer (one kernel, and a step it can drop on the device: ``callbacks/numerics.py``) stays usable there.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from typing_extensions import override

__all__ = ["GradientClippingMixin"]


class GradientClippingMixin:
    """Mixin for LightningModules (before ``LightningModule`` in the bases)."""

    _gradient_norm: torch.Tensor | None = None  # this step's, if a check computed it

    def reuse_gradient_norm(self, norm: torch.Tensor) -> None:
        """The total gradient norm of the step being taken, computed before clipping, for clipping to use."""
        self._gradient_norm = norm

    @override
    def clip_gradients(self, optimizer: Any, gradient_clip_val: float | None = None,
                       gradient_clip_algorithm: str | None = None) -> None:
        plugin, norm, self._gradient_norm = self.trainer.precision_plugin, self._gradient_norm, None
        unscaled = getattr(plugin, "scaler", None) is None
        value = self.trainer.gradient_clip_val if gradient_clip_val is None else gradient_clip_val
        algorithm = GradClipAlgorithmType((gradient_clip_algorithm or self.trainer.gradient_clip_algorithm
                                           or "norm").lower())
        if norm is not None and value is not None and value > 0 and algorithm == GradClipAlgorithmType.NORM and unscaled:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, value, norm)
            return
        if isinstance(plugin, MixedPrecision) and unscaled:
            Precision.clip_gradients(plugin, optimizer, value or 0.0, algorithm)
            return
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
