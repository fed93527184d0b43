"""The packed dataset cache: documents -> split -> tokenizer -> packed sequences, built once, then loaded.

The recipe (paper section 3; docs/paper.md, "Data"):

1. documents from the corpus (``Corpus.load``);
2. a document-level split with ``split_seed``: ``validation_fraction`` of the documents are held out,
   so the tokenizer (trained next) never sees validation text; with ``holdout_fraction`` > 0, that
   share of the remaining (training) documents becomes a third, ``holdout`` split (RHO-loss trains its
   irreducible-loss model on it; paper section 5.2: 20 %). The validation documents are the same at any
   ``holdout_fraction``;
3. a tokenizer trained on all non-validation documents (training and holdout alike), or the one at
   ``tokenizer_path``, saved as a ``transformers`` fast tokenizer; a trained one is cached in
   ``<cache_dir>/tokenizers/<key>/`` and reused by every packed cache of the same documents, so runs
   that differ only in ``holdout_fraction`` or ``seq_len`` share one vocabulary;
4. documents tokenized (``num_proc`` processes), followed by the separator and packed into
   sequences block by block (``datamodules/packing.py``: the same sequences at any ``num_proc``);
5. training sequences shuffled once with ``split_seed`` and numbered: ``example_id`` is the index
   into the packed training split (the training stream reads them in that order at order seed 0, like
   the paper's offline-shuffled sequential loader, and through a permutation of the run's order seed
   otherwise, ``datamodules.streams.training_order``; the holdout split likewise); the validation split
   is capped at ``max_validation_sequences``;
6. the unigram entropy of the training targets (what predicting token frequencies alone would score),
   a SHA-256 of each split's input ids in ``example_id`` order and of the tokenizer file (the
   irreducible-loss file of ``train.py score`` records them, and ``RhoLoss`` checks them).

The result lives in ``<cache_dir>/packed/<key>/`` (``data/``, ``tokenizer/``, ``meta.json``), where the
key hashes everything that changes it. It is written into a temporary directory and renamed into
place, so a failed build leaves nothing behind and a reader never sees half a cache. Runs that start
together on one cache build it once: the builder holds a lock file, the
others wait for it and then read what it wrote. (The lock files stay in ``<cache_dir>/locks``.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from filelock import FileLock, Timeout
from lightning.pytorch.utilities import rank_zero_info

from core.errors import UserError
from core.sealing import file_sha256
from datamodules.corpora import Corpus, remove_tree
from datamodules.packing import entropy_nats, pack_documents, token_counts, tokenize_batch

__all__ = [
    "CACHE_FORMAT",
    "PACK_BLOCK_DOCUMENTS",
    "PackedCache",
    "PackingObjective",
    "PackingSpec",
    "input_ids_digest",
    "split_documents",
]

CACHE_FORMAT = 3
PACK_BLOCK_DOCUMENTS = 1000


class PackingObjective(Protocol):
    """What a pre-training objective decides about its data (implemented by the data modules)."""

    objective: str

    def tokenizer_settings(self) -> dict[str, Any]: ...

    def train_tokenizer(self, documents) -> Any: ...

    def check_tokenizer(self, tokenizer) -> None: ...

    def separator_id(self, tokenizer) -> int | None: ...

    def target_distribution(self, counts: np.ndarray, tokenizer) -> np.ndarray: ...


@dataclass(frozen=True)
class PackingSpec:
    """The settings that decide the packed data (all of them are in the cache key)."""

    corpus: Corpus
    vocab_size: int
    sequence_length: int
    validation_fraction: float
    max_validation_sequences: int
    split_seed: int
    tokenizer_path: str | None = None
    holdout_fraction: float = 0.0


def split_documents(documents, validation_fraction: float, seed: int, holdout_fraction: float = 0.0) -> dict[str, Any]:
    """Split the documents with one permutation drawn from ``seed``.

    ``validation``: the first ``validation_fraction`` of the permuted documents (at least one);
    ``holdout`` (only if ``holdout_fraction`` > 0): the next ``holdout_fraction`` of the rest (at least one);
    ``train``: everything after. The three are disjoint, and the validation documents do not depend on
    ``holdout_fraction``.
    """
    n_docs = len(documents)
    needed = 3 if holdout_fraction > 0 else 2
    if n_docs < needed:
        raise UserError(
            f"the corpus has {n_docs} document(s); at least {needed} are needed (one per split): add text"
        )
    order = np.random.default_rng(seed).permutation(n_docs)
    n_val = min(max(1, math.ceil(validation_fraction * n_docs)), n_docs - needed + 1)
    splits = {"validation": documents.select(order[:n_val])}
    n_hold = 0
    if holdout_fraction > 0:
        n_hold = min(max(1, math.ceil(holdout_fraction * (n_docs - n_val))), n_docs - n_val - 1)
        splits["holdout"] = documents.select(order[n_val : n_val + n_hold])
    splits["train"] = documents.select(order[n_val + n_hold :])
    splits["tokenizer"] = documents.select(order[n_val:])  # every non-validation document
    return splits


def input_ids_digest(split) -> str:
    """SHA-256 of a packed split's input ids, row by row in ``example_id`` order (int64, little-endian)."""
    digest = hashlib.sha256()
    column = split.with_format("numpy")
    for start in range(0, len(split), 4096):
        rows = np.asarray(column[start : start + 4096]["input_ids"], dtype="<i8")
        digest.update(rows.tobytes())
    return digest.hexdigest()


class PackedCache:
    """One packed dataset on disk.

    Args:
        spec: the data settings.
        objective: tokenizer and target rules of the objective (MLM, span corruption).
        cache_dir: the cache root (``<cache_dir>/packed/<key>``).
    """

    def __init__(self, spec: PackingSpec, objective: PackingObjective, cache_dir: Path) -> None:
        self.spec = spec
        self.objective = objective
        self.cache_dir = Path(cache_dir)

    def key(self) -> str:
        spec = self.spec
        settings = {
            "format": CACHE_FORMAT,
            "objective": self.objective.objective,
            "source": spec.corpus.fingerprint(),
            **{k: v for k, v in asdict(spec).items() if k not in ("corpus", "tokenizer_path")},
            "pack_block_documents": PACK_BLOCK_DOCUMENTS,
            "tokenizer": self.objective.tokenizer_settings(),
            "tokenizer_file": file_sha256(Path(spec.tokenizer_path) / "tokenizer.json") if spec.tokenizer_path else None,
        }
        blob = json.dumps(settings, sort_keys=True, default=str).encode()
        return f"{self.objective.objective}-{spec.corpus.source}-{hashlib.sha256(blob).hexdigest()[:16]}"

    @property
    def path(self) -> Path:
        return self.cache_dir / "packed" / self.key()

    def exists(self) -> bool:
        return (self.path / "meta.json").exists()

    def meta(self) -> dict[str, Any]:
        if not self.exists():
            raise UserError(f"no packed dataset at {self.path}: call prepare_data() first (the Trainer does)")
        return json.loads((self.path / "meta.json").read_text())

    # ----- build --------------------------------------------------------------------------------
    def build(self, num_proc: int | None = None, check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Build the cache unless it exists; return its metadata.

        ``check(meta)`` may refuse the result (raise) before it is committed: nothing is left behind.
        """
        path = self.path
        if self.exists():
            rank_zero_info(f"Reusing packed dataset cache {path} (tokenization skipped).")
            meta = self.meta()
            if check is not None:
                check(meta)
            return meta
        path.parent.mkdir(parents=True, exist_ok=True)
        locks = self.cache_dir / "locks"  # lock files stay (removing one races with its waiters): kept apart
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"packed-{path.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            rank_zero_info(f"Waiting for another process that is building {path} ...")
            lock.acquire()
        try:
            if self.exists():  # built by the process we waited for
                return self.build(num_proc, check)
            staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
            try:
                meta = self._build_into(staging, num_proc)
                if check is not None:
                    check(meta)
                try:
                    os.rename(staging, path)
                except OSError:  # another process (without the lock: an older version) finished it first
                    if not self.exists():
                        raise
            finally:
                remove_tree(staging)
        finally:
            lock.release()
        rank_zero_info(f"Packed dataset cached at {path}.")
        return meta

    def tokenizer_key(self, source_fingerprint: str) -> str:
        """What decides a trained tokenizer: the corpus, the validation documents left out, the settings.

        Not the holdout fraction nor the sequence length: runs that differ only in those share one
        tokenizer. (Training one is not bit-reproducible: the trainer breaks ties between equally
        frequent merges in hash order; a cached tokenizer is.)
        """
        spec = self.spec
        settings = {
            "objective": self.objective.objective,
            "source": source_fingerprint,
            "vocab_size": spec.vocab_size,
            "validation_fraction": spec.validation_fraction,
            "split_seed": spec.split_seed,
            "tokenizer": self.objective.tokenizer_settings(),
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"{self.objective.objective}-{spec.corpus.source}-{digest}"

    def _obtain_tokenizer(self, documents, source_fingerprint: str):
        from transformers import AutoTokenizer

        if self.spec.tokenizer_path is not None:
            tokenizer = AutoTokenizer.from_pretrained(self.spec.tokenizer_path)
            self.objective.check_tokenizer(tokenizer)
            return tokenizer
        shared = self.cache_dir / "tokenizers" / self.tokenizer_key(source_fingerprint)
        if (shared / "tokenizer.json").exists():
            rank_zero_info(f"Reusing the tokenizer trained for these documents: {shared}")
            return AutoTokenizer.from_pretrained(str(shared))
        rank_zero_info(f"Training a tokenizer (vocabulary {self.spec.vocab_size}) on {len(documents)} documents ...")
        tokenizer = self.objective.train_tokenizer(documents)
        shared.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{shared.name}.", dir=shared.parent))
        try:
            tokenizer.save_pretrained(str(staging))
            try:
                os.rename(staging, shared)
            except OSError:  # another process saved one first: use that one
                return AutoTokenizer.from_pretrained(str(shared))
        finally:
            remove_tree(staging)
        return tokenizer

    def _build_into(self, staging: Path, num_proc: int | None) -> dict[str, Any]:
        import datasets
        import pyarrow.compute as pc

        spec = self.spec
        documents, fingerprint = spec.corpus.load(self.cache_dir)
        splits = split_documents(documents, spec.validation_fraction, spec.split_seed, spec.holdout_fraction)
        tokenizer = self._obtain_tokenizer(splits.pop("tokenizer"), fingerprint)
        separator = self.objective.separator_id(tokenizer)
        packed: dict[str, Any] = {}
        meta: dict[str, Any] = {"documents": {name: len(split) for name, split in splits.items()}}
        for name, split in splits.items():
            tokens = split.map(
                tokenize_batch,
                batched=True,
                fn_kwargs={"tokenizer": tokenizer},
                remove_columns=split.column_names,
                num_proc=num_proc,
                desc=f"Tokenizing {name}",
            )
            lengths = pc.list_value_length(tokens.data.column("input_ids"))
            stream = int(pc.sum(lengths).as_py() or 0) + (len(tokens) if separator is not None else 0)
            chunks = pack_documents(
                tokens, spec.sequence_length, separator, PACK_BLOCK_DOCUMENTS, num_proc,
                desc=f"Packing {name} into {spec.sequence_length}-token sequences",
            )
            if name != "validation":
                chunks = chunks.shuffle(seed=spec.split_seed).flatten_indices()
            else:
                chunks = chunks.select(range(min(len(chunks), spec.max_validation_sequences)))
            chunks = chunks.add_column("example_id", np.arange(len(chunks), dtype=np.int64).tolist())
            packed[name] = chunks
            meta[name] = {
                "sequences": len(chunks),
                "stream_tokens": stream,
                "packed_tokens": len(chunks) * spec.sequence_length,
                "input_ids_sha256": input_ids_digest(chunks),
            }
        meta["train"]["dropped_remainder_tokens"] = meta["train"]["stream_tokens"] - meta["train"]["packed_tokens"]
        counts = token_counts(packed["train"], len(tokenizer))
        meta.update(
            sequence_length=spec.sequence_length,
            tokenizer_vocab_size=len(tokenizer),
            source=fingerprint,
            target_unigram_entropy=entropy_nats(self.objective.target_distribution(counts, tokenizer)),
            entropy_sample_tokens=int(counts.sum()),
        )
        datasets.DatasetDict(packed).save_to_disk(str(staging / "data"))
        tokenizer.save_pretrained(str(staging / "tokenizer"))
        meta["tokenizer_sha256"] = file_sha256(staging / "tokenizer" / "tokenizer.json")
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        rank_zero_info(
            f"Packed {meta['train']['sequences']} training and {meta['validation']['sequences']} validation "
            f"sequences of {spec.sequence_length} tokens ({meta['train']['dropped_remainder_tokens']} "
            "training tokens dropped as block remainders)."
        )
        return meta

    # ----- load ---------------------------------------------------------------------------------
    def load(self):
        """``(splits, tokenizer, meta)``: the numpy-formatted splits by name and the saved tokenizer."""
        import datasets
        from transformers import AutoTokenizer

        meta = self.meta()
        data = datasets.load_from_disk(str(self.path / "data"))
        tokenizer = AutoTokenizer.from_pretrained(str(self.path / "tokenizer"))
        return {name: split.with_format("numpy") for name, split in data.items()}, tokenizer, meta
