"""Pre-training data: a corpus -> a trained tokenizer -> packed, cached train/validation splits.

The pipeline (PAPER.md 5.1, DESIGN.md "Data"):

1. documents from the embedded default, local files or the hub (``corpora.load_documents``);
2. a document-level split with a fixed seed: ``validation_fraction`` of the documents are held out,
   so the tokenizer (trained next) never sees validation text;
3. a tokenizer trained on the training documents and saved as a ``transformers`` fast tokenizer;
4. documents tokenized, joined with the separator and packed into ``seq_len`` sequences;
5. training sequences shuffled once with ``split_seed`` and numbered: ``example_id`` is the index
   into the packed training split (the training loader then reads them in that order, like the paper's
   offline-shuffled, sequential loader); the validation split is capped at ``max_validation_sequences``.

The result lives in ``<cache_dir>/packed/<key>/`` where the key hashes everything that changes it.
A second run with the same settings loads it and skips tokenization. All of this happens in
``prepare_data`` (once per node); ``setup`` only loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from datamodules.collators import MLMCollator, SpanCorruptionCollator, span_corruption_lengths
from datamodules.corpora import SOURCES, default_cache_dir, load_documents, remove_tree, source_fingerprint
from datamodules.packing import (
    BERT_SPECIAL_TOKENS,
    T5_SENTINELS,
    T5_SPECIAL_TOKENS,
    pack_batch,
    tokenize_batch,
    train_unigram_tokenizer,
    train_wordpiece_tokenizer,
)
from datamodules.streams import ResumableLoader, SequentialTrainingStream
from lightning_modules.errors import UserError

__all__ = ["MLMDataModule", "PretrainingDataModule", "SpanCorruptionDataModule"]

CACHE_FORMAT = 1
PACK_BATCH_DOCUMENTS = 1000


class PretrainingDataModule(L.LightningDataModule):
    """Shared pipeline of the pre-training datamodules; subclasses choose tokenizer and collator.

    Args:
        source: ``news`` (embedded default), ``news-tiny`` (100 articles, for tests), ``files`` or ``hub``.
        data_files: with ``source=files``: a path, glob or list of them (txt, jsonl, csv, parquet; .gz ok).
        text_column: the column that holds the text (json/csv/parquet files and hub datasets).
        text_sample_by: with text files: one document per ``line``, ``paragraph`` or whole ``document``.
        hub_name: with ``source=hub``: a dataset name such as ``allenai/c4``.
        hub_config: the hub dataset's configuration, e.g. ``en``.
        hub_split: the hub split to read.
        hub_data_files: optional file pattern(s) inside the hub dataset (to read a subset of shards).
        max_documents: keep only the first N documents of the source.
        vocab_size: vocabulary size of the trained tokenizer (the model's embedding size).
        seq_len: tokens per packed sequence.
        batch_size: sequences per training micro-batch (per device).
        eval_batch_size: sequences per validation batch; defaults to ``batch_size``.
        validation_fraction: fraction of documents held out for validation.
        max_validation_sequences: cap on the packed validation split (paper: 10,000).
        tokenizer_path: use this tokenizer (a directory saved by this project, e.g. ``<cache>/packed/<key>/tokenizer``)
            instead of training one, to share one vocabulary between corpora or runs.
        split_seed: seed of the document split and of the one-time shuffle of training sequences.
        num_workers: DataLoader worker processes.
        num_proc: processes for tokenization (``Dataset.map``); ``None`` = in-process.
        cache_dir: where corpora, tokenizers and packed data are cached; default ``$NTNG_CACHE_DIR``
            or ``~/.cache/ntng``.
    """

    objective = "base"

    def __init__(
        self,
        source: str = "news",
        data_files: str | list[str] | None = None,
        text_column: str = "text",
        text_sample_by: Literal["line", "paragraph", "document"] = "paragraph",
        hub_name: str | None = None,
        hub_config: str | None = None,
        hub_split: str = "train",
        hub_data_files: str | list[str] | None = None,
        max_documents: int | None = None,
        vocab_size: int = 32768,
        seq_len: int = 128,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        validation_fraction: float = 0.005,
        max_validation_sequences: int = 10000,
        tokenizer_path: str | None = None,
        split_seed: int = 0,
        num_workers: int = 0,
        num_proc: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise UserError(f"unknown data.source {source!r}: use one of {', '.join(SOURCES)}")
        if seq_len <= 0:
            raise UserError(f"data.seq_len={seq_len} must be a positive number of tokens, e.g. 128")
        if vocab_size < 100:
            raise UserError(f"data.vocab_size={vocab_size} is too small for a tokenizer: use at least 100")
        if batch_size <= 0:
            raise UserError(f"data.batch_size={batch_size} must be positive")
        if not 0.0 < validation_fraction < 1.0:
            raise UserError(f"data.validation_fraction={validation_fraction} must be in (0, 1), e.g. 0.005")
        if max_validation_sequences <= 0:
            raise UserError(f"data.max_validation_sequences={max_validation_sequences} must be positive")
        if tokenizer_path is not None and not (Path(tokenizer_path) / "tokenizer.json").exists():
            raise UserError(f"data.tokenizer_path={tokenizer_path!r} holds no tokenizer.json: point it at a saved tokenizer")
        self.save_hyperparameters()
        # One process builds the cache for all nodes: two nodes must never train two different tokenizers.
        # Without a shared file system, point data.cache_dir at one or build the cache before the job.
        self.prepare_data_per_node = False
        self.tokenizer_path = tokenizer_path
        self.source = source
        self.data_files = data_files
        self.text_column = text_column
        self.text_sample_by = text_sample_by
        self.hub_name, self.hub_config, self.hub_split = hub_name, hub_config, hub_split
        self.hub_data_files = hub_data_files
        self.max_documents = max_documents
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.validation_fraction = validation_fraction
        self.max_validation_sequences = max_validation_sequences
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.tokenizer = None
        self.train_dataset = None
        self.val_dataset = None
        self.stats: dict[str, Any] = {}

    # ----- what subclasses define -------------------------------------------------------------
    @property
    def raw_sequence_length(self) -> int:
        """Tokens per packed sequence before the collator (T5 packs longer chunks than it feeds)."""
        return self.seq_len

    def train_tokenizer(self, documents):
        raise NotImplementedError

    def separator_id(self, tokenizer) -> int | None:
        raise NotImplementedError

    def tokenizer_settings(self) -> dict[str, Any]:
        return {}

    def make_collator(self, fixed: bool):
        raise NotImplementedError

    # ----- cache --------------------------------------------------------------------------------
    def source_fingerprint(self) -> dict[str, Any]:
        """Everything about the source that changes its documents, without reading them."""
        return source_fingerprint(
            self.source,
            data_files=self.data_files,
            text_column=self.text_column,
            text_sample_by=self.text_sample_by,
            hub_name=self.hub_name,
            hub_config=self.hub_config,
            hub_split=self.hub_split,
            hub_data_files=self.hub_data_files,
        )

    def cache_key(self) -> str:
        settings = {
            "format": CACHE_FORMAT,
            "objective": self.objective,
            "source": self.source_fingerprint(),
            "max_documents": self.max_documents,
            "vocab_size": self.vocab_size,
            "raw_sequence_length": self.raw_sequence_length,
            "validation_fraction": self.validation_fraction,
            "max_validation_sequences": self.max_validation_sequences,
            "split_seed": self.split_seed,
            "pack_batch_documents": PACK_BATCH_DOCUMENTS,
            "tokenizer": self.tokenizer_settings(),
            "tokenizer_file": self._tokenizer_file_digest(),
        }
        blob = json.dumps(settings, sort_keys=True, default=str).encode()
        return f"{self.objective}-{self.source}-{hashlib.sha256(blob).hexdigest()[:16]}"

    def _tokenizer_file_digest(self) -> str | None:
        if self.tokenizer_path is None:
            return None
        return hashlib.sha256((Path(self.tokenizer_path) / "tokenizer.json").read_bytes()).hexdigest()

    def _obtain_tokenizer(self, documents):
        if self.tokenizer_path is None:
            rank_zero_info(f"Training a tokenizer (vocabulary {self.vocab_size}) on {len(documents)} documents ...")
            return self.train_tokenizer(documents)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        self.check_tokenizer(tokenizer)
        return tokenizer

    def check_tokenizer(self, tokenizer) -> None:
        if len(tokenizer) > self.vocab_size:
            raise UserError(
                f"the tokenizer at {self.tokenizer_path} has {len(tokenizer)} tokens, more than "
                f"data.vocab_size={self.vocab_size}: raise data.vocab_size"
            )

    @property
    def cache_path(self) -> Path:
        return self.cache_dir / "packed" / self.cache_key()

    # ----- Lightning hooks ----------------------------------------------------------------------
    def prepare_data(self) -> None:
        path = self.cache_path
        if (path / "meta.json").exists():
            rank_zero_info(f"Reusing packed dataset cache {path} (tokenization skipped).")
            self._check_sizes(json.loads((path / "meta.json").read_text()))
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            meta = self._build(staging)
            self._check_sizes(meta)
            try:
                os.rename(staging, path)
            except OSError:  # another process finished the same cache first
                if not (path / "meta.json").exists():
                    raise
        finally:
            remove_tree(staging)
        rank_zero_info(f"Packed dataset cached at {path}.")

    def _build(self, staging: Path) -> dict[str, Any]:
        import datasets

        documents, fingerprint = load_documents(
            self.source,
            cache_dir=self.cache_dir,
            data_files=self.data_files,
            text_column=self.text_column,
            text_sample_by=self.text_sample_by,
            hub_name=self.hub_name,
            hub_config=self.hub_config,
            hub_split=self.hub_split,
            hub_data_files=self.hub_data_files,
            max_documents=self.max_documents,
        )
        splits = self.split_documents(documents)
        n_docs, n_val = len(documents), len(splits["validation"])

        tokenizer = self._obtain_tokenizer(splits["train"])
        separator = self.separator_id(tokenizer)
        packed: dict[str, Any] = {}
        meta: dict[str, Any] = {"documents": {"train": n_docs - n_val, "validation": n_val}}
        for name, split in splits.items():
            tokens = split.map(
                tokenize_batch,
                batched=True,
                fn_kwargs={"tokenizer": tokenizer, "add_special_tokens": self._add_special_tokens},
                remove_columns=split.column_names,
                num_proc=self.num_proc,
                desc=f"Tokenizing {name}",
            )
            stream = int(np.sum(tokens["num_tokens"])) + (len(tokens) if separator is not None else 0)
            chunks = tokens.map(
                pack_batch,
                batched=True,
                batch_size=PACK_BATCH_DOCUMENTS,
                fn_kwargs={"seq_len": self.raw_sequence_length, "separator_id": separator},
                remove_columns=tokens.column_names,
                num_proc=self.num_proc,
                desc=f"Packing {name} into {self.raw_sequence_length}-token sequences",
            )
            if name == "train":
                chunks = chunks.shuffle(seed=self.split_seed).flatten_indices()
            else:
                chunks = chunks.select(range(min(len(chunks), self.max_validation_sequences)))
            ids = np.arange(len(chunks), dtype=np.int64)
            chunks = chunks.add_column("example_id", ids.tolist())
            packed[name] = chunks
            meta[name] = {
                "sequences": len(chunks),
                "stream_tokens": stream,
                "packed_tokens": len(chunks) * self.raw_sequence_length,
            }
        meta["train"]["dropped_remainder_tokens"] = meta["train"]["stream_tokens"] - meta["train"]["packed_tokens"]
        meta.update(
            sequence_length=self.raw_sequence_length,
            tokenizer_vocab_size=len(tokenizer),
            source=fingerprint,
        )
        datasets.DatasetDict(packed).save_to_disk(str(staging / "data"))
        tokenizer.save_pretrained(str(staging / "tokenizer"))
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        rank_zero_info(
            f"Packed {meta['train']['sequences']} training and {meta['validation']['sequences']} validation "
            f"sequences of {self.raw_sequence_length} tokens ({meta['train']['dropped_remainder_tokens']} "
            "training tokens dropped as batch remainders)."
        )
        return meta

    _add_special_tokens = False

    def split_documents(self, documents) -> dict[str, Any]:
        """Hold out ``validation_fraction`` of the documents (at least one), chosen with ``split_seed``."""
        n_docs = len(documents)
        if n_docs < 2:
            raise UserError(
                f"the corpus has {n_docs} document; at least 2 are needed (one to train on, one to validate): add text"
            )
        order = np.random.default_rng(self.split_seed).permutation(n_docs)
        n_val = min(max(1, math.ceil(self.validation_fraction * n_docs)), n_docs - 1)
        return {"train": documents.select(order[n_val:]), "validation": documents.select(order[:n_val])}

    def _check_sizes(self, meta: dict[str, Any]) -> None:
        n_train = meta["train"]["sequences"]
        if n_train < self.batch_size:
            raise UserError(
                f"the corpus yields {n_train} training sequences of {self.raw_sequence_length} tokens, fewer than "
                f"one batch of data.batch_size={self.batch_size}: add text, or lower data.batch_size or data.seq_len"
            )
        if meta["validation"]["sequences"] < 1:
            raise UserError(
                f"the validation documents yield no full {self.raw_sequence_length}-token sequence: "
                "raise data.validation_fraction or add text"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        import datasets
        from transformers import AutoTokenizer

        path = self.cache_path
        if not (path / "meta.json").exists():
            raise UserError(f"no packed dataset at {path}: call prepare_data() first (the Trainer does)")
        self.stats = json.loads((path / "meta.json").read_text())
        self._check_sizes(self.stats)
        data = datasets.load_from_disk(str(path / "data"))
        self.train_dataset = data["train"].with_format("numpy")
        self.val_dataset = data["validation"].with_format("numpy")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))

    def train_dataloader(self) -> DataLoader:
        # already shuffled once, offline, with split_seed; read in order, resumable (datamodules/streams.py)
        trainer = getattr(self, "trainer", None)
        stream = SequentialTrainingStream(
            self.train_dataset,
            self.batch_size,
            batches_multiple_of=trainer.accumulate_grad_batches if trainer is not None else 1,
        )
        return ResumableLoader(
            stream,
            position=self._batches_consumed if trainer is not None else None,
            batch_size=self.batch_size,
            collate_fn=self.make_collator(fixed=False),
            num_workers=self.num_workers,
        )

    def _batches_consumed(self) -> int:
        """Training batches this rank has consumed since the run began (restored when Lightning resumes)."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.make_collator(fixed=True),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @property
    def tokens_per_sequence(self) -> int:
        return self.seq_len


class MLMDataModule(PretrainingDataModule):
    """Pre-training data for BERT masked language modelling (WordPiece tokenizer, MLM collator).

    Args:
        mlm_probability: fraction of non-special tokens selected for prediction (paper: 0.15).
        mask_seed: seed of the fixed validation masks.
        lowercase: lower-case and strip accents in the tokenizer (Cramming/NTNG do).
        **kwargs: see ``PretrainingDataModule``.
    """

    objective = "mlm"

    def __init__(
        self,
        *args: Any,
        mlm_probability: float = 0.15,
        mask_seed: int = 0,
        lowercase: bool = True,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise UserError(f"data.mlm_probability={mlm_probability} must be in (0, 1); the paper uses 0.15")
        self.mlm_probability = mlm_probability
        self.mask_seed = mask_seed
        self.lowercase = lowercase
        super().__init__(*args, **kwargs)

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

    @property
    def pad_token_id(self) -> int:
        return BERT_SPECIAL_TOKENS.index("[PAD]")

    def make_collator(self, fixed: bool) -> MLMCollator:
        return MLMCollator(
            mask_token_id=self.tokenizer.mask_token_id,
            vocab_size=len(self.tokenizer),
            special_token_ids=tuple(self.tokenizer.all_special_ids),
            num_special_tokens=len(BERT_SPECIAL_TOKENS),
            mlm_probability=self.mlm_probability,
            fixed_masks=fixed,
            seed=self.mask_seed,
        )

    def synthetic_batch(self, batch_size: int | None = None, seed: int = 0) -> dict:
        """A batch of this run's shape with random tokens, masked as in training (for calibration); no corpus read."""
        batch_size = batch_size or self.batch_size
        generator = torch.Generator().manual_seed(seed)
        n_special = len(BERT_SPECIAL_TOKENS)
        ids = torch.randint(n_special, self.vocab_size, (batch_size, self.seq_len), generator=generator)
        examples = [{"input_ids": row.numpy(), "example_id": i} for i, row in enumerate(ids)]
        collator = MLMCollator(
            mask_token_id=BERT_SPECIAL_TOKENS.index("[MASK]"),
            vocab_size=self.vocab_size,
            special_token_ids=tuple(range(n_special)),
            num_special_tokens=len(BERT_SPECIAL_TOKENS),
            mlm_probability=self.mlm_probability,
            fixed_masks=True,
            seed=seed,
        )
        return collator(examples)


class SpanCorruptionDataModule(PretrainingDataModule):
    """Pre-training data for T5 span corruption (Unigram tokenizer, span-corruption collator).

    ``seq_len`` is the encoder input length; documents are packed into longer raw chunks (568 for
    512) so that inputs and targets come out at exact lengths without padding (PAPER.md 2.2, 5.2).

    Args:
        noise_density: fraction of raw tokens corrupted (paper: 0.15).
        mean_noise_span_length: mean length of a corrupted span (paper: 3.0).
        mask_seed: seed of the fixed validation corruption.
        **kwargs: see ``PretrainingDataModule``.
    """

    objective = "span-corruption"

    def __init__(
        self,
        *args: Any,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        mask_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < noise_density < 1.0:
            raise UserError(f"data.noise_density={noise_density} must be in (0, 1); T5 uses 0.15")
        if mean_noise_span_length < 1.0:
            raise UserError(f"data.mean_noise_span_length={mean_noise_span_length} must be >= 1; T5 uses 3.0")
        self.noise_density = noise_density
        self.mean_noise_span_length = mean_noise_span_length
        self.mask_seed = mask_seed
        kwargs.setdefault("seq_len", 512)
        super().__init__(*args, **kwargs)
        if self.vocab_size <= T5_SENTINELS + 20:
            raise UserError(f"data.vocab_size={self.vocab_size} leaves no room next to {T5_SENTINELS} sentinel tokens")
        self._raw_length, self.targets_length = span_corruption_lengths(
            self.seq_len, noise_density, mean_noise_span_length
        )

    @property
    def raw_sequence_length(self) -> int:
        return self._raw_length

    @property
    def tokens_per_sequence(self) -> int:
        """Raw corpus tokens consumed per example (568 at paper scale)."""
        return self._raw_length

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

    @staticmethod
    def _sentinel_ids(tokenizer) -> list[int]:
        ids = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(T5_SENTINELS)])
        return [i for i in ids if i is not None and i != tokenizer.unk_token_id]

    @property
    def pad_token_id(self) -> int:
        return 0

    def make_collator(self, fixed: bool) -> SpanCorruptionCollator:
        return SpanCorruptionCollator(
            inputs_length=self.seq_len,
            sentinel_ids=self._sentinel_ids(self.tokenizer),
            eos_id=self.tokenizer.eos_token_id,
            noise_density=self.noise_density,
            mean_noise_span_length=self.mean_noise_span_length,
            fixed_masks=fixed,
            seed=self.mask_seed,
        )

    def synthetic_batch(self, batch_size: int | None = None, seed: int = 0) -> dict:
        """A batch of this run's shape with random tokens (for calibration); no corpus read."""
        batch_size = batch_size or self.batch_size
        rng = np.random.default_rng(seed)
        sentinels = list(range(self.vocab_size - 1, self.vocab_size - 1 - T5_SENTINELS, -1))
        ids = rng.integers(len(T5_SPECIAL_TOKENS), self.vocab_size - T5_SENTINELS, (batch_size, self._raw_length))
        collator = SpanCorruptionCollator(
            inputs_length=self.seq_len,
            sentinel_ids=sentinels,
            eos_id=1,
            noise_density=self.noise_density,
            mean_noise_span_length=self.mean_noise_span_length,
            fixed_masks=True,
            seed=seed,
        )
        return collator([{"input_ids": row, "example_id": i} for i, row in enumerate(ids)])
