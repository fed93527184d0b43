"""Batch collators for pre-training objectives.

Masked language modelling as in BERT (Devlin et al. 2019) and the paper's BERT setup (section 3):
each non-special token is selected with probability ``mlm_probability`` (0.15); of the selected
tokens 80 % become ``[MASK]``, 10 % a random non-special token and 10 % stay unchanged. Labels hold
the original token at selected positions and -100 everywhere else.

Span corruption as in T5 (Raffel et al. 2020, section 3.1.4) and nanoT5 (the paper's T5, section 3): about
``noise_density`` of the tokens, in spans of mean length ``mean_noise_span_length``, are removed from
the input; each span is replaced by one sentinel (``<extra_id_0>``, ``<extra_id_1>``, ... in order)
and the target lists each sentinel followed by the tokens it replaced; both end with EOS. Raw chunks
are sized so inputs and targets come out at exact lengths with no padding (512 -> 568 raw, 114).

Validation masks are a function of ``(seed, example_id)`` only, and the data modules give their
validation collator ``data.split_seed``, never the run's seed, so every evaluation of every method and
every seed scores identical inputs (the paper re-drew them at random on every call, docs/paper.md).
Training masks are a function of ``(seed, pass, example_id)`` with the run's mask seed (``data.mask_seed``,
by default ``seed_everything``'s): reproducible, independent of workers and threads, the same after a
resume, and different from seed to seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.batch import EXAMPLE_ID, IGNORE_INDEX, INPUT_IDS, LABELS, PASS_INDEX

__all__ = [
    "MLMCollator",
    "SpanCorruptionCollator",
    "apply_mlm_masking",
    "cut_mlm_batch",
    "cut_span_corruption",
    "random_spans_noise_mask",
    "span_corruption",
    "span_corruption_counts",
    "span_corruption_lengths",
]



def example_rng(seed: int, example: dict, fixed: bool) -> np.random.Generator:
    """The random generator of one example's masking.

    Validation (``fixed``): a function of ``(seed, example_id)``. Training: of ``(seed, pass, example_id)``
    when the training stream numbers its passes (so masks are reproducible and survive a resume),
    else drawn from torch's global generator.
    """
    example_id = int(example[EXAMPLE_ID])
    if fixed:
        return np.random.default_rng([seed, example_id])
    if PASS_INDEX in example:
        return np.random.default_rng([seed, 1 + int(example[PASS_INDEX]), example_id])
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


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
        seed: seed of the masks (the data modules: ``split_seed`` for validation, the run's mask seed for training).
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

    def _noise(self, shape: tuple[int, int], examples: list[dict]):
        length = shape[1]
        rows = []
        for example in examples:
            rng = example_rng(self.seed, example, self.fixed_masks)
            rows.append(
                (
                    rng.random(length, dtype=np.float32),
                    rng.random(length, dtype=np.float32),
                    rng.integers(self.num_special_tokens, self.vocab_size, length),
                )
            )
        return tuple(torch.as_tensor(np.stack(parts)) for parts in zip(*rows, strict=True))

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.as_tensor(np.stack([np.asarray(e[INPUT_IDS]) for e in examples]), dtype=torch.long)
        example_id = torch.as_tensor([int(e[EXAMPLE_ID]) for e in examples], dtype=torch.long)
        special = torch.isin(input_ids, torch.as_tensor(list(self.special_token_ids), dtype=torch.long))
        select, action, random_tokens = self._noise(tuple(input_ids.shape), examples)
        masked, labels = apply_mlm_masking(
            input_ids, select, action, random_tokens, special, self.mask_token_id, self.mlm_probability
        )
        return {INPUT_IDS: masked, LABELS: labels, EXAMPLE_ID: example_id}


# ----- span corruption (T5) ---------------------------------------------------------------------
def span_corruption_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """``(noise tokens, noise spans)`` of a raw chunk of ``length`` tokens (T5's rounding)."""
    num_noise_tokens = min(max(int(round(length * noise_density)), 1), length - 1)
    num_noise_spans = max(int(round(num_noise_tokens / mean_noise_span_length)), 1)
    return num_noise_tokens, num_noise_spans


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0):
    """``(raw_length, targets_length)``: raw tokens per chunk so that inputs come out at ``inputs_length``.

    T5's ``compute_input_and_target_lengths``: the largest raw length whose corrupted input (kept
    tokens + one sentinel per span + EOS) fits ``inputs_length``. Paper scale: 512 -> (568, 114).
    """

    def lengths(raw: int) -> tuple[int, int]:
        noise, spans = span_corruption_counts(raw, noise_density, mean_noise_span_length)
        return raw - noise + spans + 1, noise + spans + 1

    raw = inputs_length
    while lengths(raw + 1)[0] <= inputs_length:
        raw += 1
    inputs, targets = lengths(raw)
    if inputs != inputs_length:
        fits = [n for n in range(max(8, inputs_length - 8), inputs_length + 9) if _exact(n, noise_density, mean_noise_span_length)]
        raise ValueError(
            f"no raw chunk length corrupts into exactly {inputs_length} input tokens with noise_density "
            f"{noise_density} and mean span {mean_noise_span_length}; input lengths that work nearby: {fits}"
        )
    return raw, targets


def _exact(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> bool:
    try:
        span_corruption_lengths(inputs_length, noise_density, mean_noise_span_length)
    except ValueError:
        return False
    return True


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of ``length``, True at noise tokens: alternating non-noise/noise spans, noise last.

    T5's ``random_spans_noise_mask``: the noise and non-noise tokens are each split into the same
    number of spans at random, and the spans interleave starting with non-noise.
    """
    num_noise_tokens, num_noise_spans = span_corruption_counts(length, noise_density, mean_noise_span_length)
    num_nonnoise_tokens = length - num_noise_tokens

    def random_segmentation(num_items: int, num_segments: int) -> np.ndarray:
        first_in_segment = np.arange(num_items - 1) < num_segments - 1
        rng.shuffle(first_in_segment)
        segment_id = np.cumsum(np.pad(first_in_segment, [[1, 0]]))
        return np.bincount(segment_id, minlength=num_segments)

    noise_span_lengths = random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = random_segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved = np.reshape(np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [num_noise_spans * 2])
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros((length,), dtype=np.int8)
    span_start_indicator[span_starts] = True
    span_num = np.cumsum(span_start_indicator)
    return span_num % 2 == 1


def span_corruption(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: np.ndarray, eos_id: int):
    """``(inputs, targets)``: each noise span replaced by the next sentinel; targets list the spans.

    ``sentinel_ids[i]`` is the id of ``<extra_id_i>``.
    """

    def filter_with_sentinels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        starts = mask & ~np.pad(mask, [[1, 0]])[:-1]  # first token of each masked span
        span_index = np.cumsum(starts) - 1
        with_sentinels = np.where(starts, sentinel_ids[np.maximum(span_index, 0)], ids)
        return with_sentinels[~mask | starts]

    inputs = np.append(filter_with_sentinels(tokens, noise_mask), eos_id)
    targets = np.append(filter_with_sentinels(tokens, ~noise_mask), eos_id)
    return inputs, targets


@dataclass
class SpanCorruptionCollator:
    """Corrupt packed raw chunks into fixed-length T5 inputs and targets.

    Args:
        inputs_length: tokens per encoder input (paper: 512).
        sentinel_ids: ids of ``<extra_id_0>``, ``<extra_id_1>``, ...
        eos_id: id of ``</s>``.
        noise_density: fraction of raw tokens corrupted (paper: 0.15).
        mean_noise_span_length: mean corrupted span length (paper: 3.0).
        fixed_masks: if ``True`` (validation) masks depend only on ``(seed, example_id)``.
        seed: seed of the masks (the data modules: ``split_seed`` for validation, the run's mask seed for training).
    """

    inputs_length: int
    sentinel_ids: Sequence[int]
    eos_id: int
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    fixed_masks: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density={self.noise_density} is outside (0, 1); T5 uses 0.15")
        if self.mean_noise_span_length < 1.0:
            raise ValueError(f"mean_noise_span_length={self.mean_noise_span_length} must be >= 1; T5 uses 3.0")
        self.raw_length, self.targets_length = span_corruption_lengths(
            self.inputs_length, self.noise_density, self.mean_noise_span_length
        )
        self._sentinels = np.asarray(self.sentinel_ids, dtype=np.int64)


    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        inputs, targets = [], []
        for example in examples:
            tokens = np.asarray(example[INPUT_IDS], dtype=np.int64)
            if tokens.shape[0] != self.raw_length:
                raise ValueError(f"expected raw chunks of {self.raw_length} tokens, got {tokens.shape[0]}")
            mask = random_spans_noise_mask(
                self.raw_length, self.noise_density, self.mean_noise_span_length,
                example_rng(self.seed, example, self.fixed_masks),
            )
            source, target = span_corruption(tokens, mask, self._sentinels, self.eos_id)
            inputs.append(source)
            targets.append(target)
        return {
            INPUT_IDS: torch.as_tensor(np.stack(inputs)),
            LABELS: torch.as_tensor(np.stack(targets)),
            EXAMPLE_ID: torch.as_tensor([int(e[EXAMPLE_ID]) for e in examples], dtype=torch.long),
        }


# ----- sequences cut shorter (sequence-length warm-up, callbacks/sequence_warmup.py) ----------------------
def cut_mlm_batch(batch: dict[str, torch.Tensor], length: int, full_length: int) -> dict[str, torch.Tensor]:
    """A masked-LM batch with every per-token tensor (``(B, full_length)``) cut to its first ``length`` tokens, as
    Li, Zhang and He (2022) truncate each sequence; the masks drawn on the full sequence are kept where they fall."""
    return {key: value[:, :length] if value.dim() == 2 and value.shape[1] == full_length else value
            for key, value in batch.items()}


def cut_span_corruption(inputs: torch.Tensor, targets: torch.Tensor, length: int, sentinel_ids: Sequence[int],
                        eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Span-corruption inputs cut to ``length`` tokens and the targets that still match them.

    Each input keeps its first ``length - 1`` tokens and ends with ``</s>``; it then holds the first ``s`` of its
    sentinels, so its targets keep everything before the ``(s+1)``-th sentinel (the spans of the kept ones) and end
    with ``</s>``. Targets of different lengths are padded with ``IGNORE_INDEX``.
    """
    if not 2 <= length <= inputs.shape[1]:
        raise ValueError(f"cannot cut inputs of {inputs.shape[1]} tokens to {length}")
    cut = torch.cat([inputs[:, : length - 1], torch.full_like(inputs[:, :1], eos_id)], dim=1)
    sentinels = torch.as_tensor(list(sentinel_ids), dtype=inputs.dtype, device=inputs.device)
    kept = torch.isin(cut, sentinels).sum(1).tolist()
    rows = []
    for row, keep in zip(targets, kept):
        positions = torch.isin(row, sentinels).nonzero().flatten().tolist()
        end = positions[keep] if keep < len(positions) else int((row != IGNORE_INDEX).sum()) - 1  # before its </s>
        rows.append(torch.cat([row[:end], row.new_tensor([eos_id])]))
    width = max(len(r) for r in rows)
    padded = targets.new_full((len(rows), width), IGNORE_INDEX)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    return cut, padded
