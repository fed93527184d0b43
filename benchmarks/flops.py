"""Matrix-multiply FLOPs of one training step, as executed (for model FLOP utilisation, MFU)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _sdpa_cpu_forward(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def sdpa_cpu_flop_mapping() -> dict:
    """``torch.utils.flop_counter`` misses the fused CPU attention kernels; count them as it counts SDPA."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward
    return mapping


def step_flops(loss_of: Callable[[dict], torch.Tensor], batches: list[dict]) -> float:
    """Mean matrix-multiply FLOPs of one forward+backward over ``batches`` (as executed)."""
    total = 0
    for batch in batches:
        with FlopCounterMode(display=False, custom_mapping=sdpa_cpu_flop_mapping()) as counter:
            loss_of(batch).backward()
        total += counter.get_total_flops()
    return total / len(batches)
