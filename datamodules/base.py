"""What the pre-training data modules share: settings, the packed cache, the loaders, the size checks.

``prepare_data`` (one process for the whole job) builds the packed cache (``datamodules/packed_cache.py``);
``setup`` (every process) loads it, resolves the run's seeds (``core/seeds.py``) and checks that the
training split holds at least one optimizer step of every process. Training reads the packed sequences
in the order of ``order_seed`` through the resumable, rank-sharded stream of ``datamodules/streams.py``,
masked by ``mask_seed``; validation reads a fixed split with fixed masks (``split_seed`` only).
With a batch-selection callback (``core.contracts.BatchSelector``) that stream supplies *candidates*:
the selector scores them and hands out training micro-batches of exactly ``batch_size`` selected
examples, each assembled just before its training step (``on_before_batch_transfer``).
Subclasses (``MLMDataModule``, ``SpanCorruptionDataModule``) choose the tokenizer and the collator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader
from typing_extensions import override

from core.contracts import BatchSelector
from core.errors import UserError
from core.seeds import check_resumed_seed, resolve_seed
from core.selection import PassIndexedCollator, PendingBatch
from datamodules.corpora import Corpus, default_cache_dir
from datamodules.packed_cache import PackedCache, PackingSpec
from datamodules.streams import ResumableLoader, SequentialTrainingStream, training_order
from datamodules.tokenizer_training import tokenizer_files

__all__ = ["PretrainingDataModule"]


class PretrainingDataModule(L.LightningDataModule, ABC):
    """Shared pipeline of the pre-training data modules.

    Args:
        corpus: where the documents come from (``source``, ``data_files``, ``hub_name``, ...; see ``Corpus``).
        vocab_size: vocabulary size of the trained tokenizer (the model's embedding size).
        seq_len: tokens per model input sequence.
        batch_size: sequences per training micro-batch (per device).
        eval_batch_size: sequences per validation batch; defaults to ``batch_size``.
        validation_fraction: fraction of documents held out for validation.
        holdout_fraction: fraction of the remaining (training) documents set aside as a ``holdout``
            split, disjoint from training and validation (RHO-loss's irreducible-loss model trains on it;
            paper: 0.2); 0 keeps every non-validation document for training.
        train_split: which split training reads: ``train`` or ``holdout`` (the irreducible-loss model).
        max_validation_sequences: cap on the packed validation split (paper: 10,000).
        tokenizer_path: use this tokenizer (a directory saved by this project, e.g. ``<cache>/packed/<key>/tokenizer``)
            instead of training one, to share one vocabulary between corpora or runs.
        split_seed: seed of what stays fixed for every run (the same yardstick): the document split, the
            tokenizer, the one-time shuffle of the packed sequences in the cache, the validation masks.
        order_seed: seed of the training order; ``None`` (default): the run's seed (``seed_everything``,
            ``core/seeds.py``). 0 reads the sequences in the cache's order (shuffled once with ``split_seed``,
            the paper's offline-shuffled sequential loader); any other value reads them through a
            permutation drawn from it (``datamodules.streams.training_order``), the same in every pass.
        mask_seed: seed of the training masks (a function of ``(mask_seed, pass, example_id)``); ``None``
            (default): the run's seed. Validation masks never depend on it.
        num_workers: DataLoader worker processes.
        num_proc: processes for tokenization and packing; ``None`` = in-process. The packed data are the
            same at any value.
        cache_dir: where corpora, tokenizers and packed data are cached; default ``$NTNG_CACHE_DIR``
            or ``~/.cache/ntng``.
    """

    objective = "base"

    def __init__(
        self,
        corpus: Corpus = Corpus(),  # noqa: B008 (frozen dataclass: LightningCLI shows its fields)
        vocab_size: int = 32768,
        seq_len: int = 128,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        validation_fraction: float = 0.005,
        holdout_fraction: float = 0.0,
        train_split: Literal["train", "holdout"] = "train",
        max_validation_sequences: int = 10000,
        tokenizer_path: str | None = None,
        split_seed: int = 0,
        order_seed: int | None = None,
        mask_seed: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(corpus, dict):
            corpus = Corpus(**corpus)
        if seq_len <= 0:
            raise UserError(f"data.seq_len={seq_len} must be a positive number of tokens, e.g. 128")
        if vocab_size < 100:
            raise UserError(f"data.vocab_size={vocab_size} is too small for a tokenizer: use at least 100")
        if batch_size <= 0:
            raise UserError(f"data.batch_size={batch_size} must be positive")
        if not 0.0 < validation_fraction < 1.0:
            raise UserError(f"data.validation_fraction={validation_fraction} must be in (0, 1), e.g. 0.005")
        if not 0.0 <= holdout_fraction < 1.0:
            raise UserError(f"data.holdout_fraction={holdout_fraction} must be in [0, 1), e.g. 0.2 for RHO-loss")
        if train_split not in ("train", "holdout"):
            raise UserError(f"data.train_split={train_split!r}: use 'train' or 'holdout'")
        if train_split == "holdout" and holdout_fraction <= 0:
            raise UserError("data.train_split=holdout needs a holdout split: set data.holdout_fraction, e.g. 0.2")
        if max_validation_sequences <= 0:
            raise UserError(f"data.max_validation_sequences={max_validation_sequences} must be positive")
        if tokenizer_path is not None and not (Path(tokenizer_path) / "tokenizer.json").exists():
            raise UserError(f"data.tokenizer_path={tokenizer_path!r} holds no tokenizer.json: point it at a saved tokenizer")
        self.save_hyperparameters(ignore=["corpus"])
        self.hparams["corpus"] = asdict(corpus)  # plain values: checkpoints load with weights_only=True
        # One process builds the cache for all nodes: two nodes must never train two different tokenizers.
        # Without a shared file system, point data.cache_dir at one or build the cache before the job.
        self.prepare_data_per_node = False
        self.corpus = corpus
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.validation_fraction = validation_fraction
        self.holdout_fraction = holdout_fraction
        self.train_split = train_split
        self.max_validation_sequences = max_validation_sequences
        self.tokenizer_path = tokenizer_path
        self.split_seed = split_seed
        self.order_seed = order_seed
        self.mask_seed = mask_seed
        self._seeds: dict[str, int] | None = None  # resolved at setup (core/seeds.py)
        self._train_order = None  # the training order's permutation (None: the cache's order)
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.tokenizer = None
        self._tokenizer_files: dict[str, str] | None = None
        self.splits: dict[str, Any] = {}
        self.train_dataset = None
        self.val_dataset = None
        self.stats: dict[str, Any] = {}

    # ----- what subclasses define (the PackingObjective of datamodules/packed_cache.py) ----------
    @property
    def raw_sequence_length(self) -> int:
        """Tokens per packed sequence before the collator (T5 packs longer chunks than it feeds)."""
        return self.seq_len

    @property
    def tokens_per_sequence(self) -> int:
        """Corpus tokens consumed per training example."""
        return self.raw_sequence_length

    def cut_batch(self, batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """``batch`` with its sequences cut to ``length`` tokens (sequence-length warm-up)."""
        raise UserError(f"{type(self).__name__} cannot cut its sequences shorter: sequence-length warm-up needs a "
                        "data module that does (MLMDataModule, SpanCorruptionDataModule)")

    @abstractmethod
    def make_collator(self, fixed: bool):
        """The collator of training (``fixed=False``: masks drawn per pass) or validation (``fixed=True``: masks
        seeded by example id) batches, seeded by ``collator_seed(fixed)``."""

    # ----- the run's seeds (core/seeds.py) -----------------------------------------------------------
    def run_seeds(self) -> dict[str, int]:
        """``order_seed`` and ``mask_seed`` as this run uses them: as configured, or the run's seed. Resolved
        at ``setup``; before it, resolved now."""
        if self._seeds is not None:
            return dict(self._seeds)
        return self._resolve_seeds()

    def _resolve_seeds(self) -> dict[str, int]:
        return {"order_seed": resolve_seed(self.order_seed), "mask_seed": resolve_seed(self.mask_seed)}

    @property
    def training_mask_seed(self) -> int:
        """The seed of this run's training masks."""
        return self.run_seeds()["mask_seed"]

    def collator_seed(self, fixed: bool) -> int:
        """Validation masks (``fixed``) are seeded by ``split_seed``, the same for every run; training masks by
        the run's mask seed."""
        return self.split_seed if fixed else self.training_mask_seed

    # ----- the cache ----------------------------------------------------------------------------
    @property
    def cache(self) -> PackedCache:
        spec = PackingSpec(
            corpus=self.corpus,
            vocab_size=self.vocab_size,
            sequence_length=self.raw_sequence_length,
            validation_fraction=self.validation_fraction,
            max_validation_sequences=self.max_validation_sequences,
            split_seed=self.split_seed,
            tokenizer_path=self.tokenizer_path,
            holdout_fraction=self.holdout_fraction,
        )
        return PackedCache(spec, self, self.cache_dir)

    @property
    def cache_path(self) -> Path:
        return self.cache.path

    def check_tokenizer(self, tokenizer) -> None:
        if len(tokenizer) > self.vocab_size:
            raise UserError(
                f"the tokenizer at {self.tokenizer_path} has {len(tokenizer)} tokens, more than "
                f"data.vocab_size={self.vocab_size}: raise data.vocab_size"
            )

    @property
    def target_unigram_entropy(self) -> float | None:
        """The loss of a model that predicts every target from the training split's token frequencies
        alone (nats): how much better than that a trained model does is what it learned from context."""
        value = self.stats.get("target_unigram_entropy")
        return float(value) if value is not None else None

    # ----- Lightning hooks ----------------------------------------------------------------------
    @override
    def prepare_data(self) -> None:
        self.cache.build(self.num_proc, check=self._check_sizes)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.splits, self.tokenizer, self.stats = self.cache.load()
            self.train_dataset, self.val_dataset = self.splits[self.train_split], self.splits["validation"]
        self._seeds = self._resolve_seeds()  # at every setup: one data module may serve fits of several seeds
        self._train_order = training_order(len(self.train_dataset), self._seeds["order_seed"])
        self._check_sizes(self.stats)

    # ----- checkpoint: what `train.py export` needs beside the weights --------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """Saved into every checkpoint: the tokenizer's files (a checkpoint exports on any machine, without
        this data cache), the corpus tokens one training example consumes (the model card's tokens) and the
        seeds of the training order and masks (a resume checks them)."""
        if self.tokenizer is None:
            return {}
        if self._tokenizer_files is None:  # serialised once, not at every checkpoint
            self._tokenizer_files = tokenizer_files(self.tokenizer)
        return {"tokenizer_files": self._tokenizer_files, "tokens_per_sequence": int(self.tokens_per_sequence),
                "seeds": self.run_seeds()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore (the tokenizer comes from the data cache, which the checkpoint's digests pin), but a
        fit that resumes must read and mask as the checkpoint's run did: another order or mask seed is refused."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn != "fit":
            return  # validation reads fixed data whatever the seeds
        saved, ours = state_dict.get("seeds") or {}, self.run_seeds()
        for name in ("order_seed", "mask_seed"):
            check_resumed_seed(f"data.{name}", ours[name], saved.get(name))

    # ----- what batch selection checks (the irreducible-loss file of `train.py score`) -------------
    @abstractmethod
    def masking_settings(self) -> dict[str, Any]:
        """The settings that decide the training masks (or corruption) of an example, the run's mask seed included."""

    def examples_fingerprint(self, split: str = "train") -> dict[str, Any]:
        """What identifies the examples of ``split`` and their training masks: an irreducible-loss file
        made for other examples (another corpus, split, tokenizer, mask seed or size) is refused."""
        meta = self.stats
        return {
            "objective": self.objective,
            "source": meta.get("source"),
            "split": split,
            "split_seed": self.split_seed,
            "validation_fraction": self.validation_fraction,
            "holdout_fraction": self.holdout_fraction,
            "sequence_length": self.raw_sequence_length,
            "tokenizer_sha256": meta.get("tokenizer_sha256"),
            "masking": self.masking_settings(),
            "num_examples": int(meta[split]["sequences"]),
            "input_ids_sha256": meta[split].get("input_ids_sha256"),
        }

    def _sequences_per_step(self) -> tuple[int, str]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return self.batch_size, f"data.batch_size={self.batch_size}"
        accumulation, world = trainer.accumulate_grad_batches, trainer.world_size
        return (
            self.batch_size * accumulation * world,
            f"data.batch_size={self.batch_size} x trainer.accumulate_grad_batches={accumulation} x {world} process(es)",
        )

    def _check_sizes(self, meta: dict[str, Any]) -> None:
        n_train = meta[self.train_split]["sequences"]
        needed, how = self._sequences_per_step()
        if n_train < needed:
            raise UserError(
                f"the corpus yields {n_train} {'training' if self.train_split == 'train' else 'holdout'} sequences of {self.raw_sequence_length} tokens, fewer than "
                f"one optimizer step needs ({how} = {needed}): add text, or lower data.batch_size, "
                "trainer.accumulate_grad_batches or data.seq_len"
            )
        if meta["validation"]["sequences"] < 1:
            raise UserError(
                f"the validation documents yield no full {self.raw_sequence_length}-token sequence: "
                "raise data.validation_fraction or add text"
            )

    def batch_selector(self) -> BatchSelector | None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        selectors = [c for c in trainer.callbacks if isinstance(c, BatchSelector)]
        if len(selectors) > 1:
            raise UserError(f"trainer.callbacks holds {len(selectors)} batch selectors: keep one")
        return selectors[0] if selectors else None

    @override
    def train_dataloader(self):
        # shuffled once, offline, with split_seed; read in the order of order_seed, resumable (datamodules/streams.py)
        trainer = getattr(self, "trainer", None)
        selector = self.batch_selector()
        if selector is not None:
            return selector.training_batches(self._open_candidates, self.batch_size)
        stream = SequentialTrainingStream(
            self.train_dataset,
            self.batch_size,
            batches_multiple_of=trainer.accumulate_grad_batches if trainer is not None else 1,
            order=self._train_order,
        )
        return ResumableLoader(
            stream,
            position=self._batches_consumed if trainer is not None else None,
            batch_size=self.batch_size,
            collate_fn=self.make_collator(fixed=False),
            num_workers=self.num_workers,
        )

    def _open_candidates(self, position: int, mask_pass_period: int | None = None):
        """An iterator over this rank's candidate micro-batches from rank-batch ``position`` to the end of
        its pass; each batch carries ``PASS_INDEX``. With ``mask_pass_period`` P, pass ``p`` is masked
        like pass ``p mod P`` (the passes an irreducible-loss file was scored for)."""
        stream = SequentialTrainingStream(self.train_dataset, self.batch_size, order=self._train_order)
        loader = ResumableLoader(
            stream,
            position=lambda: position,
            batch_size=self.batch_size,
            collate_fn=PassIndexedCollator(self.make_collator(fixed=False), mask_pass_period),
            num_workers=self.num_workers,
        )
        return iter(loader)

    def candidate_batches_per_pass(self) -> int:
        return SequentialTrainingStream(self.train_dataset, self.batch_size).batches_per_pass()

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, PendingBatch):  # a selected training micro-batch, assembled now, after the last step
            return batch.assemble()
        return batch

    def _batches_consumed(self) -> int:
        """Training batches this rank has consumed since the run began (restored when Lightning resumes)."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    @override
    def val_dataloader(self) -> DataLoader:
        # several processes: each its own examples, none repeated (DistributedSampler would pad with
        # repeats, and the validation loss would then depend on the number of processes)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = UnrepeatedDistributedSampler(self.val_dataset, shuffle=False) if distributed else None
        return DataLoader(
            self.val_dataset,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=self.make_collator(fixed=True),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

