"""Batch collators for pre-training objectives.

Masked language modelling as in BERT (Devlin et al. 2019) and the paper's BERT setup (PAPER.md 2.1):
each non-special token is selected with probability ``mlm_probability`` (0.15); of the selected
tokens 80 % become ``[MASK]``, 10 % a random non-special token and 10 % stay unchanged. Labels hold
the original token at selected positions and -100 everywhere else.

Validation masks are a function of ``(seed, example_id)`` only, so every evaluation of every method
scores identical inputs (the paper re-drew them at random on every call, PAPER.md 6.1 item 9).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "MLMCollator", "apply_mlm_masking"]

IGNORE_INDEX = -100


def apply_mlm_masking(
    input_ids: torch.Tensor,
    select_noise: torch.Tensor,
    action_noise: torch.Tensor,
    random_tokens: torch.Tensor,
    special_mask: torch.Tensor,
    mask_token_id: int,
    mlm_probability: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 80/10/10 rule as a pure function of its random inputs.

    Args:
        input_ids: token ids ``(B, T)``.
        select_noise: uniforms in [0, 1) ``(B, T)``; a token is selected where ``< mlm_probability``.
        action_noise: uniforms in [0, 1) ``(B, T)``: ``< 0.8`` -> ``[MASK]``, ``< 0.9`` -> random token, else kept.
        random_tokens: replacement ids ``(B, T)`` used where the random action applies.
        special_mask: ``True`` at positions that must never be selected ``(B, T)``.
        mask_token_id: id of ``[MASK]``.
        mlm_probability: selection rate.

    Returns:
        ``(masked_input_ids, labels)`` with ``labels == -100`` at unselected positions.
    """
    selected = (select_noise < mlm_probability) & ~special_mask
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    to_mask = selected & (action_noise < 0.8)
    to_random = selected & (action_noise >= 0.8) & (action_noise < 0.9)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_tokens, masked)
    return masked, labels


@dataclass
class MLMCollator:
    """Stack packed sequences and apply MLM masking.

    Args:
        mask_token_id: id of ``[MASK]``.
        vocab_size: size of the tokenizer's vocabulary; random replacements are drawn from the
            non-special ids ``[num_special_tokens, vocab_size)``.
        special_token_ids: ids that are never selected for prediction.
        num_special_tokens: the special tokens occupy ids ``0 .. num_special_tokens-1``.
        mlm_probability: selection rate (paper: 0.15).
        fixed_masks: if ``True`` (validation) masks depend only on ``(seed, example_id)``.
        seed: seed of the fixed masks.
    """

    mask_token_id: int
    vocab_size: int
    special_token_ids: Sequence[int]
    num_special_tokens: int = 5
    mlm_probability: float = 0.15
    fixed_masks: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability={self.mlm_probability} is outside (0, 1); the paper uses 0.15")

    def _noise(self, shape: tuple[int, int], example_ids: torch.Tensor):
        if not self.fixed_masks:
            return (
                torch.rand(shape),
                torch.rand(shape),
                torch.randint(self.num_special_tokens, self.vocab_size, shape),
            )
        rows = []
        for example_id in example_ids.tolist():
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(example_id))
            rows.append(
                (
                    torch.rand(shape[1], generator=generator),
                    torch.rand(shape[1], generator=generator),
                    torch.randint(self.num_special_tokens, self.vocab_size, (shape[1],), generator=generator),
                )
            )
        return tuple(torch.stack(parts) for parts in zip(*rows, strict=True))

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.as_tensor(np.stack([np.asarray(e["input_ids"]) for e in examples]), dtype=torch.long)
        example_id = torch.as_tensor([int(e["example_id"]) for e in examples], dtype=torch.long)
        special = torch.isin(input_ids, torch.as_tensor(list(self.special_token_ids), dtype=torch.long))
        select, action, random_tokens = self._noise(tuple(input_ids.shape), example_id)
        masked, labels = apply_mlm_masking(
            input_ids, select, action, random_tokens, special, self.mask_token_id, self.mlm_probability
        )
        return {"input_ids": masked, "labels": labels, "example_id": example_id}
