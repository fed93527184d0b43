"""Sequence packing: documents -> token stream -> fixed-length sequences, and the corpus' unigram entropy.

Packing follows the paper's data pipeline (paper section 3; docs/paper.md, "Data"): each document is
tokenized without special tokens and followed by a separator, the documents of one *block* of
``block_size`` consecutive documents are concatenated, and the stream is cut into ``seq_len`` chunks;
the tail of each block shorter than ``seq_len`` is dropped and counted (the *declared remainder*).
No padding, no attention mask.

Blocks are fixed by document index (block ``b`` holds documents ``b * block_size ...``), and each is
packed on its own, so the packed sequences are the same whatever the number of processes
(``num_proc``) that packs them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "entropy_nats",
    "pack_blocks",
    "pack_documents",
    "pack_token_stream",
    "token_counts",
    "tokenize_batch",
]


def pack_token_stream(documents: Iterable[Sequence[int]], seq_len: int, separator_id: int | None):
    """Concatenate ``documents`` (each followed by ``separator_id`` if given) and cut into ``seq_len`` chunks.

    Returns ``(chunks, remainder)``: the list of full chunks and the number of trailing tokens dropped.
    Every token of the stream is in exactly one chunk except the last ``remainder`` tokens.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stream: list[int] = []
    for tokens in documents:
        stream.extend(tokens)
        if separator_id is not None:
            stream.append(separator_id)
    full = len(stream) // seq_len * seq_len
    chunks = [stream[i : i + seq_len] for i in range(0, full, seq_len)]
    return chunks, len(stream) - full


def tokenize_batch(batch: dict, tokenizer) -> dict:
    """``Dataset.map`` function (batched): the token ids of each document, without special tokens."""
    ids = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return {"input_ids": ids}


def pack_blocks(batch: dict, documents, block_size: int, seq_len: int, separator_id: int | None) -> dict:
    """``Dataset.map`` function over a dataset of block numbers: the packed sequences of each block."""
    chunks: list[list[int]] = []
    for block in batch["block"]:
        start = int(block) * block_size
        rows = documents[start : start + block_size]["input_ids"]
        chunks.extend(pack_token_stream(rows, seq_len, separator_id)[0])
    return {"input_ids": chunks}


def pack_documents(documents, seq_len: int, separator_id: int | None, block_size: int, num_proc: int | None, desc: str):
    """Pack a tokenized ``datasets.Dataset`` (column ``input_ids``) block by block; the same at any ``num_proc``."""
    import datasets

    n_blocks = math.ceil(len(documents) / block_size)
    blocks = datasets.Dataset.from_dict({"block": list(range(n_blocks))})
    return blocks.map(
        pack_blocks,
        batched=True,
        batch_size=1,
        fn_kwargs={"documents": documents, "block_size": block_size, "seq_len": seq_len, "separator_id": separator_id},
        remove_columns=["block"],
        num_proc=num_proc if num_proc and num_proc > 1 and n_blocks > 1 else None,
        desc=desc,
    )


def token_counts(sequences, vocab_size: int, max_sequences: int = 100_000) -> np.ndarray:
    """How often each token id occurs in the first ``max_sequences`` of ``sequences`` (column ``input_ids``).

    The training split is shuffled, so its first sequences are a uniform sample of it.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    n = min(len(sequences), max_sequences)
    for start in range(0, n, 10_000):
        rows = np.asarray(sequences[start : min(start + 10_000, n)]["input_ids"], dtype=np.int64)
        counts += np.bincount(rows.ravel(), minlength=vocab_size)[:vocab_size]
    return counts


def entropy_nats(probabilities: np.ndarray) -> float:
    """H(p) = -sum p log p in nats (zero probabilities contribute nothing)."""
    p = np.asarray(probabilities, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())
