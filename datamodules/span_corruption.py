"""Pre-training data for T5 span corruption: a Unigram tokenizer with T5's layout and the span-corruption collator.

``seq_len`` is the encoder input length; documents are packed into longer raw chunks (568 for 512)
so that inputs and targets come out at exact lengths without padding (docs/paper.md, "T5").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.batch import EXAMPLE_ID, INPUT_IDS, LABELS
from core.errors import UserError
from datamodules.base import PretrainingDataModule
from datamodules.collators import (
    SpanCorruptionCollator,
    cut_span_corruption,
    span_corruption_counts,
    span_corruption_lengths,
)
from datamodules.tokenizer_training import T5_SENTINELS, T5_SPECIAL_TOKENS, train_unigram_tokenizer

__all__ = ["SpanCorruptionDataModule"]

EOS_ID = T5_SPECIAL_TOKENS.index("</s>")


class SpanCorruptionDataModule(PretrainingDataModule):
    """Pre-training data for T5 span corruption (Unigram tokenizer, span-corruption collator).

    Args:
        noise_density: fraction of raw tokens corrupted (paper: 0.15).
        mean_noise_span_length: mean length of a corrupted span (paper: 3.0).
        **kwargs: see ``PretrainingDataModule`` (``mask_seed``: the training corruption's seed, the run's by
            default; validation corruption is a function of ``(split_seed, example_id)``).
    """

    objective = "span-corruption"

    def __init__(
        self,
        *args: Any,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < noise_density < 1.0:
            raise UserError(f"data.noise_density={noise_density} must be in (0, 1); T5 uses 0.15")
        if mean_noise_span_length < 1.0:
            raise UserError(f"data.mean_noise_span_length={mean_noise_span_length} must be >= 1; T5 uses 3.0")
        self.noise_density = noise_density
        self.mean_noise_span_length = mean_noise_span_length
        kwargs.setdefault("seq_len", 512)
        super().__init__(*args, **kwargs)
        if self.vocab_size <= T5_SENTINELS + 20:
            raise UserError(f"data.vocab_size={self.vocab_size} leaves no room next to {T5_SENTINELS} sentinel tokens")
        try:
            self._raw_length, self.targets_length = span_corruption_lengths(
                self.seq_len, noise_density, mean_noise_span_length
            )
        except ValueError as error:
            raise UserError(f"data.seq_len={self.seq_len}: {error}") from None

    @property
    def raw_sequence_length(self) -> int:
        """Raw corpus tokens per example (568 at paper scale)."""
        return self._raw_length

    # ----- PackingObjective -----------------------------------------------------------------------
    def tokenizer_settings(self) -> dict[str, Any]:
        return {"kind": "unigram", "sentinels": T5_SENTINELS, "special": list(T5_SPECIAL_TOKENS)}

    def train_tokenizer(self, documents):
        return train_unigram_tokenizer(documents, self.vocab_size)

    def separator_id(self, tokenizer) -> int:
        return tokenizer.eos_token_id  # T5 ends every document with </s>

    def check_tokenizer(self, tokenizer) -> None:
        super().check_tokenizer(tokenizer)
        if [tokenizer.pad_token_id, tokenizer.eos_token_id] != [0, 1] or len(self._sentinel_ids(tokenizer)) != T5_SENTINELS:
            raise UserError(f"the tokenizer at {self.tokenizer_path} is not a T5 tokenizer with 100 sentinels")

    def target_distribution(self, counts: np.ndarray, tokenizer) -> np.ndarray:
        """Targets of one example: ``n`` corrupted corpus tokens, one sentinel per span, then ``</s>``.

        With ``q`` the corpus' token distribution and ``T = n + spans + 1`` targets, a context-free
        model's best guess is the mixture ``p = (n / T) q + 1/T at each of the first ``spans`` sentinels
        + 1/T at </s>``.
        """
        noise, spans = span_corruption_counts(self._raw_length, self.noise_density, self.mean_noise_span_length)
        total = noise + spans + 1
        q = counts.astype(np.float64) / max(counts.sum(), 1)
        p = np.zeros(max(len(q), len(tokenizer)), dtype=np.float64)
        p[: len(q)] = q * noise / total
        for sentinel in self._sentinel_ids(tokenizer)[:spans]:
            p[sentinel] += 1.0 / total
        p[EOS_ID] += 1.0 / total
        return p

    @staticmethod
    def _sentinel_ids(tokenizer) -> list[int]:
        ids = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(T5_SENTINELS)])
        return [i for i in ids if i is not None and i != tokenizer.unk_token_id]

    def masking_settings(self) -> dict[str, Any]:
        return {
            "mask_seed": self.training_mask_seed,
            "noise_density": self.noise_density,
            "mean_noise_span_length": self.mean_noise_span_length,
        }

    # ----- batches --------------------------------------------------------------------------------
    def _collator(self, sentinel_ids: list[int], fixed: bool, seed: int) -> SpanCorruptionCollator:
        return SpanCorruptionCollator(
            inputs_length=self.seq_len,
            sentinel_ids=sentinel_ids,
            eos_id=EOS_ID,
            noise_density=self.noise_density,
            mean_noise_span_length=self.mean_noise_span_length,
            fixed_masks=fixed,
            seed=seed,
        )

    def make_collator(self, fixed: bool) -> SpanCorruptionCollator:
        return self._collator(self._sentinel_ids(self.tokenizer), fixed, self.collator_seed(fixed))

    def synthetic_batch(self, batch_size: int | None = None, seed: int = 0, length: int | None = None
                        ) -> dict[str, torch.Tensor]:
        """A batch of this run's shape with random tokens (for calibration), its inputs cut to ``length`` tokens
        if given; no corpus read."""
        batch_size = batch_size or self.batch_size
        rng = np.random.default_rng(seed)
        sentinels = list(range(self.vocab_size - 1, self.vocab_size - 1 - T5_SENTINELS, -1))
        ids = rng.integers(len(T5_SPECIAL_TOKENS), self.vocab_size - T5_SENTINELS, (batch_size, self._raw_length))
        examples = [{INPUT_IDS: row, EXAMPLE_ID: i} for i, row in enumerate(ids)]
        batch = self._collator(sentinels, fixed=True, seed=seed)(examples)
        return batch if length is None else self._cut(batch, length, sentinels)

    def cut_batch(self, batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        return self._cut(batch, length, self._sentinel_ids(self.tokenizer))

    def _cut(self, batch: dict[str, torch.Tensor], length: int, sentinels: list[int]) -> dict[str, torch.Tensor]:
        inputs, targets = cut_span_corruption(batch[INPUT_IDS], batch[LABELS], length, sentinels, EOS_ID)
        return {**batch, INPUT_IDS: inputs, LABELS: targets}
