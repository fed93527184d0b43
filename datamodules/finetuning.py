"""``DownstreamDataModule``: one downstream task (``datamodules/downstream.py``) tokenized for fine-tuning.

Batches are padded to their longest example (``transformers``' padding collators), so short texts
(tweets, review snippets) cost what they are long, not ``max_length``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from typing_extensions import override

from core.errors import UserError
from datamodules.downstream import TASKS, load_task

__all__ = ["DownstreamDataModule"]


class DownstreamDataModule(L.LightningDataModule):
    """A downstream task's train split and evaluation splits, tokenized with the pre-trained model's tokenizer.

    Args:
        task: a name of ``datamodules.downstream.TASKS``.
        tokenizer: a directory ``AutoTokenizer`` loads (an export of ``train.py export``).
        max_length: longest input in tokens; longer ones are truncated (paper: 128 for GLUE).
        max_target_length: longest target in tokens (text to text).
        batch_size: examples per optimizer step (paper: 16 for GLUE, 8 for T5).
        eval_batch_size: examples per evaluation forward.
        max_train_examples: train on the first N examples of the (already shuffled) train split; all if None.
        max_eval_examples: score the first N of each evaluation split; all if None.
        data_dir: local files in the hub's schema instead of the hub (GLUE, SuperGLUE, SNI).
        cache_dir: where the offline tasks are cached (default ``$NTNG_CACHE_DIR`` or ``~/.cache/ntng``).
        num_workers: dataloader workers.
        tuning_holdout: for choosing a recipe, never for reporting: hold out the last fifth of the (already
            shuffled) train split, at most ``max_eval_examples`` (1,000 if None) examples, and score on it in place
            of every evaluation split; the training examples are taken from the rest.
    """

    def __init__(self, task: str, tokenizer: str, max_length: int = 128, max_target_length: int = 64,
                 batch_size: int = 16, eval_batch_size: int = 64, max_train_examples: int | None = None,
                 max_eval_examples: int | None = None, data_dir: str | None = None, cache_dir: str | None = None,
                 num_workers: int = 0, tuning_holdout: bool = False) -> None:
        super().__init__()
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        for name, value in (("max_length", max_length), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value <= 0:
                raise UserError(f"{name}={value} must be positive")
        self.task = TASKS[task]
        self.tokenizer_dir = tokenizer
        self.max_length, self.max_target_length = max_length, max_target_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        self.data_dir, self.cache_dir, self.num_workers = data_dir, Path(cache_dir) if cache_dir else None, num_workers
        self.tuning_holdout = tuning_holdout
        self.tokenizer = None
        self.raw: dict[str, Any] = {}
        self.tokenized: dict[str, Any] = {}

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return self.task.eval_splits

    def load(self) -> None:
        """Read and check the splits (no tokenization): bad columns or labels fail here, before any training."""
        if not self.raw:
            self.raw = load_task(self.task.name, self.cache_dir, self.data_dir)
            if self.tuning_holdout:
                train = self.raw["train"]
                held = min(len(train) // 5, self.max_eval_examples or 1000)
                if held < 1:
                    raise UserError(f"task {self.task.name}: {len(train)} training examples are too few to hold some out")
                holdout = train.select(range(len(train) - held, len(train)))
                self.raw = {"train": train.select(range(len(train) - held)),
                            **{split: holdout for split in self.eval_splits}}
            if self.max_train_examples:
                self.raw["train"] = self.raw["train"].select(range(min(self.max_train_examples, len(self.raw["train"]))))
            if self.max_eval_examples:
                for split in self.eval_splits:
                    self.raw[split] = self.raw[split].select(range(min(self.max_eval_examples, len(self.raw[split]))))

    @override
    def setup(self, stage: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.load()
        if self.tokenized:
            return
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        for split, dataset in self.raw.items():
            self.tokenized[split] = dataset.map(self._encode, batched=True, remove_columns=dataset.column_names,
                                                desc=f"tokenizing {self.task.name}/{split}")

    def _encode(self, rows: dict[str, list]) -> dict[str, list]:
        if self.task.kind == "generation":
            encoded = self.tokenizer(rows["source"], max_length=self.max_length, truncation=True)
            encoded["labels"] = self.tokenizer(text_target=rows["target"], max_length=self.max_target_length,
                                               truncation=True)["input_ids"]
            return encoded
        pair = (rows["text_a"], rows["text_b"]) if "text_b" in rows else (rows["text_a"],)
        encoded = self.tokenizer(*pair, max_length=self.max_length, truncation=True)
        encoded.pop("token_type_ids", None)  # one token type, as in pre-training
        encoded["labels"] = rows["label"]
        return encoded

    def _collator(self):
        from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

        if self.task.kind == "generation":
            return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100)
        return DataCollatorWithPadding(self.tokenizer)

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.tokenized["train"], batch_size=self.batch_size, shuffle=True, drop_last=False,
                          collate_fn=self._collator(), num_workers=self.num_workers)

    @override
    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.tokenized[split], batch_size=self.eval_batch_size, shuffle=False,
                           collate_fn=self._collator(), num_workers=self.num_workers) for split in self.eval_splits]

    def references(self, split: str) -> list[str]:
        """The target texts of an evaluation split (Rouge-L compares the generations with these)."""
        return list(self.raw[split]["target"])
