"""The parameter groups every pre-training optimizer is built over (weight decay on matrices only; Muon's group)."""

from __future__ import annotations

from typing import Any

import torch

from core.contracts import LayerControl

__all__ = ["muon_parameter_groups", "parameter_groups"]


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two named groups: ``decay`` (matrices and embeddings) and ``no_decay`` (biases and norm gains).

    Every parameter with fewer than two dimensions is a bias or a normalisation weight. The paper's
    code decayed LayerNorm gains through a key-name mismatch (docs/paper.md, "Departures"); we do not.
    The names label the learning-rate curves in TensorBoard (``lr/decay``, ``lr/no_decay``).
    """
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def muon_parameter_groups(module: LayerControl, weight_decay: float) -> list[dict[str, Any]]:
    """Muon's group (``"muon": True``): the weights of the ``nn.Linear`` layers inside the repeated blocks;
    then ``parameter_groups`` of everything else (embeddings, output head, biases, norms: AdamW)."""
    hidden = [
        layer.weight
        for stack in module.layer_stacks()
        for layer in stack.modules()
        if isinstance(layer, torch.nn.Linear) and layer.weight.requires_grad
    ]
    hidden_ids = {id(p) for p in hidden}
    rest = torch.nn.ParameterList([p for p in module.parameters() if id(p) not in hidden_ids])
    return [{"params": hidden, "weight_decay": weight_decay, "name": "muon", "muon": True},
            *parameter_groups(rest, weight_decay)]
