"""Pre-training data for BERT masked language modelling: a WordPiece tokenizer and the MLM collator.

Masking as the paper's BERT (docs/paper.md, "BERT"): 15 % of the non-special tokens are selected,
80 % of them become ``[MASK]``, 10 % a random token, 10 % stay; special tokens are never selected.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.batch import EXAMPLE_ID, INPUT_IDS
from core.errors import UserError
from datamodules.base import PretrainingDataModule
from datamodules.collators import MLMCollator, cut_mlm_batch
from datamodules.tokenizer_training import BERT_SPECIAL_TOKENS, train_wordpiece_tokenizer

__all__ = ["MLMDataModule"]

MASK_TOKEN_ID = BERT_SPECIAL_TOKENS.index("[MASK]")


class MLMDataModule(PretrainingDataModule):
    """Pre-training data for BERT masked language modelling (WordPiece tokenizer, MLM collator).

    Args:
        mlm_probability: fraction of non-special tokens selected for prediction (paper: 0.15).
        lowercase: lower-case and strip accents in the tokenizer (Cramming and the paper's code do).
        **kwargs: see ``PretrainingDataModule`` (``mask_seed``: the training masks' seed, the run's by default;
            validation masks are a function of ``(split_seed, example_id)``).
    """

    objective = "mlm"

    def __init__(
        self,
        *args: Any,
        mlm_probability: float = 0.15,
        lowercase: bool = True,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise UserError(f"data.mlm_probability={mlm_probability} must be in (0, 1); the paper uses 0.15")
        self.mlm_probability = mlm_probability
        self.lowercase = lowercase
        super().__init__(*args, **kwargs)

    # ----- PackingObjective -----------------------------------------------------------------------
    def tokenizer_settings(self) -> dict[str, Any]:
        return {"kind": "wordpiece", "lowercase": self.lowercase, "special": list(BERT_SPECIAL_TOKENS)}

    def train_tokenizer(self, documents):
        return train_wordpiece_tokenizer(documents, self.vocab_size, lowercase=self.lowercase)

    def separator_id(self, tokenizer) -> int:
        return tokenizer.sep_token_id

    def check_tokenizer(self, tokenizer) -> None:
        super().check_tokenizer(tokenizer)
        expected = {token: i for i, token in enumerate(BERT_SPECIAL_TOKENS)}
        actual = {token: tokenizer.convert_tokens_to_ids(token) for token in BERT_SPECIAL_TOKENS}
        if actual != expected:
            raise UserError(
                f"the tokenizer at {self.tokenizer_path} numbers its special tokens {actual}; "
                f"this project's BERT needs {expected}: use a tokenizer saved by this project"
            )

    def target_distribution(self, counts: np.ndarray, tokenizer) -> np.ndarray:
        """Masked targets are a uniform sample of the non-special tokens: their unigram distribution."""
        counts = counts.astype(np.float64).copy()
        counts[: len(BERT_SPECIAL_TOKENS)] = 0.0
        return counts / max(counts.sum(), 1.0)

    def masking_settings(self) -> dict[str, Any]:
        return {"mask_seed": self.training_mask_seed, "mlm_probability": self.mlm_probability}

    # ----- batches --------------------------------------------------------------------------------
    def _collator(self, vocab_size: int, fixed: bool, seed: int) -> MLMCollator:
        return MLMCollator(
            mask_token_id=MASK_TOKEN_ID,
            vocab_size=vocab_size,
            special_token_ids=tuple(range(len(BERT_SPECIAL_TOKENS))),
            num_special_tokens=len(BERT_SPECIAL_TOKENS),
            mlm_probability=self.mlm_probability,
            fixed_masks=fixed,
            seed=seed,
        )

    def make_collator(self, fixed: bool) -> MLMCollator:
        return self._collator(len(self.tokenizer), fixed, self.collator_seed(fixed))

    def synthetic_batch(self, batch_size: int | None = None, seed: int = 0, length: int | None = None
                        ) -> dict[str, torch.Tensor]:
        """A batch of this run's shape with random tokens, masked as in training (for calibration), its sequences
        cut to ``length`` tokens if given; no corpus read."""
        batch_size = batch_size or self.batch_size
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(len(BERT_SPECIAL_TOKENS), self.vocab_size, (batch_size, self.seq_len), generator=generator)
        examples = [{INPUT_IDS: row.numpy(), EXAMPLE_ID: i} for i, row in enumerate(ids)]
        batch = self._collator(self.vocab_size, fixed=True, seed=seed)(examples)
        return batch if length is None else self.cut_batch(batch, length)

    def cut_batch(self, batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        return cut_mlm_batch(batch, length, self.seq_len)
