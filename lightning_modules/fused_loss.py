"""Output projection and cross-entropy in one autograd step: the vocabulary logits are read once.

The training loss of both models ends in ``logits = h W^T + b`` over a large vocabulary, then the mean
cross-entropy over the target positions. Autograd runs that as a matrix product, ``log_softmax``
(writes a second ``M x V`` array), ``nll_loss`` (whose backward fills a third ``M x V`` array with
zeros), ``log_softmax``'s backward (reads two, writes one) and the backward products. Here the
forward computes the loss and, in the logits' own buffer, its gradient with respect to the logits,

    d loss / d logits = (softmax(logits) - onehot(target)) / M      (M: positions that are not ignored),

so the backward is the two matrix products alone. The loss and every gradient equal those of
``F.cross_entropy(F.linear(h, W, b), target, ignore_index=-100)`` to floating-point rounding
(``tests/test_fused_loss.py``). Logits and loss are computed in float32 whatever the dtype of the
matrix product (as ``compute_loss`` did with ``logits.float()``).
"""

from __future__ import annotations

import torch

from core.batch import IGNORE_INDEX

__all__ = ["linear_cross_entropy"]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index):  # noqa: ANN001
        logits = torch.nn.functional.linear(hidden, weight, bias)
        product_dtype = logits.dtype
        logits = logits.float()
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
        count = valid.sum().clamp(min=1)
        target_logits = logits.gather(1, safe_targets)  # before the buffer is overwritten
        maxima = logits.amax(dim=-1, keepdim=True)
        exponentials = logits.sub_(maxima).exp_()  # in the logits' buffer
        sums = exponentials.sum(dim=-1, keepdim=True)
        log_normalizer = sums.log() + maxima
        loss = ((log_normalizer - target_logits).squeeze(1) * valid).sum() / count
        weights = (valid / count).unsqueeze(1)  # 1/M at counted positions, 0 at ignored ones
        gradient = exponentials.mul_(weights / sums)  # softmax / M
        gradient.scatter_add_(1, safe_targets, -weights)  # minus onehot / M
        ctx.save_for_backward(hidden, weight, gradient)
        ctx.product_dtype, ctx.bias_dtype = product_dtype, None if bias is None else bias.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):  # noqa: ANN001
        hidden, weight, gradient = ctx.saved_tensors
        gradient = gradient.mul_(grad_loss).to(ctx.product_dtype)
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (gradient @ weight.to(ctx.product_dtype)).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (gradient.t() @ hidden.to(ctx.product_dtype)).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = gradient.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` (``(M, H)`` rows, ``(V, H)`` weight) against
    ``targets`` ``(M,)``, over the targets that are not ``ignore_index``; 0 when none is counted."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets.reshape(-1), ignore_index)
