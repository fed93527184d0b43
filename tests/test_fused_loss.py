"""The fused output projection + cross-entropy equals the two-step computation, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.fused_loss import linear_cross_entropy


@pytest.mark.parametrize("with_bias", [True, False])
def test_loss_and_gradients_equal_linear_then_cross_entropy(with_bias):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, generator=generator, requires_grad=True)
    bias = torch.randn(300, generator=generator, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 300, (40,), generator=generator)
    targets[::5] = -100  # ignored positions count neither in the mean nor in the gradient
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    fused = linear_cross_entropy(hidden, weight, bias, targets)
    fused_grads = torch.autograd.grad(3.0 * fused, inputs)  # an upstream gradient other than 1
    reference = F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=-100)
    reference_grads = torch.autograd.grad(3.0 * reference, inputs)

    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(fused_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_no_counted_target_gives_zero_loss_and_zero_gradients():
    hidden = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, None, torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_bf16_autocast_computes_the_product_in_bf16_and_the_loss_in_float32():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(32, 16, generator=generator, requires_grad=True)
    weight = torch.randn(64, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 64, (32,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, None, targets)
        reference = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-3)
    fused.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
