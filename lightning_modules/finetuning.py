"""Fine-tuning a pre-trained model on a downstream task and scoring it (the paper's section 3).

- ``SequenceClassifier`` (BERT): ``AutoModelForSequenceClassification`` on an exported directory;
  classification (cross-entropy) or regression (MSE, ``num_labels=1``), single texts or pairs. The
  paper's GLUE recipe (spec: Geiping & Goldstein's): AdamW lr 4e-5, betas (0.9, 0.98), eps 1e-6, no
  weight decay, cosine schedule with 10 % warm-up, batch 16, 5 epochs, length 128, dropout 0.1 on.
- ``TextToText`` (T5): ``AutoModelForSeq2SeqLM``; greedy decoding, Rouge-L (``torchmetrics``, no
  stemming: nothing downloaded). nanoT5's recipe: AdamW lr 5e-5, constant, no weight decay, batch 8,
  2 epochs.

Both evaluate every evaluation split at the end of every epoch and keep each epoch's scores in
``epoch_scores``; ``reported_scores`` is the **last** epoch's (the paper's code took the best epoch per
metric on the dev set, which is optimistic; ``select="best"`` gives that, labelled as such).
Scores are in per cent, as GLUE reports them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Literal

import lightning as L
import torch
import torchmetrics
from torchmetrics.classification import BinaryF1Score, MatthewsCorrCoef, MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from core.errors import UserError
from lightning_modules.schedules import SCHEDULES

__all__ = ["SequenceClassifier", "TextToText", "build_metrics", "layer_depth", "layerwise_parameter_groups", "select_scores"]

Selection = Literal["last", "best"]


def build_metrics(names: tuple[str, ...] | list[str], num_labels: int) -> torchmetrics.MetricCollection:
    """The GLUE metrics by name: accuracy, f1 (of the positive class, binary), f1_macro, mcc (Matthews),
    pearson, spearman; rougeL is computed by ``TextToText`` itself."""
    makers = {
        "accuracy": lambda: MulticlassAccuracy(num_classes=max(num_labels, 2), average="micro"),
        "f1": lambda: BinaryF1Score(),
        "f1_macro": lambda: MulticlassF1Score(num_classes=num_labels, average="macro"),
        "mcc": lambda: MatthewsCorrCoef(task="multiclass", num_classes=max(num_labels, 2)),
        "pearson": lambda: torchmetrics.PearsonCorrCoef(),
        "spearman": lambda: torchmetrics.SpearmanCorrCoef(),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise UserError(f"unknown metric {unknown[0]!r}; choose from {', '.join(makers)}")
    return torchmetrics.MetricCollection({name: makers[name]() for name in names})


def select_scores(epoch_scores: list[dict[str, float]], select: Selection) -> dict[str, float]:
    """The scores to report: the last epoch's, or (``best``, the paper's optimistic choice) each key's maximum."""
    if not epoch_scores:
        return {}
    if select == "last":
        return dict(epoch_scores[-1])
    if select == "best":
        return {key: max(scores[key] for scores in epoch_scores) for key in epoch_scores[-1]}
    raise UserError(f"select={select!r}: use last or best")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """``transformers`` reports every weight a new task head lacks; that is expected when fine-tuning."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars, one per fine-tune
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)


_LAYER = re.compile(r"\.layer\.(\d+)\.")


def layer_depth(name: str, num_layers: int) -> int:
    """Depth of a BERT parameter for layer-wise learning rates: 0 the embeddings, ``i + 1`` encoder layer ``i``,
    ``num_layers + 1`` everything above the encoder (the final LayerNorm, the task head)."""
    found = _LAYER.search(name)
    if found:
        return int(found.group(1)) + 1
    if ".embeddings." in name or name.startswith("embeddings."):
        return 0
    return num_layers + 1


def layerwise_parameter_groups(named_parameters, num_layers: int, learning_rate: float, decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay (ELECTRA, Clark et al. 2020, appendix A): the
    head trains at ``learning_rate``, each layer below at ``decay`` times the rate of the one above, the
    embeddings at ``learning_rate * decay ** (num_layers + 1)``. ``decay = 1`` is one rate for every parameter.
    Each group's ``lr`` is its peak; the schedule scales all groups alike."""
    if not 0 < decay <= 1:
        raise UserError(f"layer_decay={decay}: give a factor in (0, 1] (1: one learning rate for every layer)")
    groups: dict[int, list] = {}
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            groups.setdefault(layer_depth(name, num_layers), []).append(parameter)
    return [{"params": params, "lr": learning_rate * decay ** (num_layers + 1 - depth)}
            for depth, params in sorted(groups.items())]


class _Finetuning(L.LightningModule):
    """Optimizer, schedule and per-epoch score keeping shared by both fine-tuning modules."""

    def __init__(self, learning_rate: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 lr_schedule: str, warmup_fraction: float, eval_splits: tuple[str, ...]) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise UserError(f"learning_rate={learning_rate} must be positive")
        if lr_schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"lr_schedule={lr_schedule!r}: use cosine, linear or constant")
        self.learning_rate, self.betas, self.eps, self.weight_decay = learning_rate, tuple(betas), eps, weight_decay
        self.lr_schedule, self.warmup_fraction = lr_schedule, warmup_fraction
        self.eval_splits = tuple(eval_splits)
        self.epoch_scores: list[dict[str, float]] = []

    def parameter_groups(self) -> list[dict]:
        """What AdamW trains, and at which peak rate (one group by default)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": self.learning_rate}]

    @override
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.learning_rate, betas=self.betas, eps=self.eps,
                                      weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        shape = SCHEDULES[self.lr_schedule]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: shape(min(step / total, 1.0), warmup_fraction=self.warmup_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _record(self, scores: dict[str, float]) -> None:
        self.epoch_scores.append(scores)
        for key, value in scores.items():
            self.log(f"eval/{key}", value, sync_dist=False)

    def reported_scores(self, select: Selection = "last") -> dict[str, float]:
        return select_scores(self.epoch_scores, select)


class SequenceClassifier(_Finetuning):
    """BERT fine-tuned for sequence classification or regression (GLUE, SuperGLUE, the offline tasks).

    Args:
        pretrained: a directory ``train.py export`` wrote (``AutoModelForSequenceClassification`` loads it:
            the encoder's weights, a new classification head).
        num_labels: classes (1: regression with MSE, as STS-B).
        metrics: metric names (``build_metrics``); the first is the task's score.
        eval_splits: names of the evaluation dataloaders, in order.
        learning_rate, betas, eps, weight_decay: AdamW (paper: 4e-5, (0.9, 0.98), 1e-6, 0).
        lr_schedule, warmup_fraction: the schedule over all fine-tuning steps (paper: cosine, 0.1).
        dropout: hidden and attention dropout during fine-tuning (paper: 0.1; pre-training ran without).
        pooling: what the classification head reads: ``first``, the first token's final hidden state
            (``transformers``' head, as the paper's GLUE code), or ``mean``, the mean over the real (not padding)
            tokens, fed to the same head. A model pre-trained by masked language modelling alone never trains the
            first token to summarise the text; the mean of every token's state carries what it learned
            (docs/evaluation.md, "The fine-tuning recipe").
        layer_decay: layer-wise learning-rate decay (``layerwise_parameter_groups``; 1: one rate throughout).
    """

    def __init__(self, pretrained: str, num_labels: int = 2, metrics: tuple[str, ...] = ("accuracy",),
                 eval_splits: tuple[str, ...] = ("validation",), learning_rate: float = 4e-5,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6, weight_decay: float = 0.0,
                 lr_schedule: str = "cosine", warmup_fraction: float = 0.1, dropout: float = 0.1,
                 pooling: Literal["first", "mean"] = "first", layer_decay: float = 1.0) -> None:
        super().__init__(learning_rate, betas, eps, weight_decay, lr_schedule, warmup_fraction, eval_splits)
        from transformers import AutoModelForSequenceClassification

        if pooling not in ("first", "mean"):
            raise UserError(f"pooling={pooling!r}: use first or mean")
        self.pooling = pooling
        layerwise_parameter_groups([], 1, learning_rate, layer_decay)  # checks the factor before loading
        self.layer_decay = layer_decay

        self.save_hyperparameters()
        self.regression = num_labels == 1
        with _quiet_loading():  # the new head's "missing" weights are expected
            self.model = AutoModelForSequenceClassification.from_pretrained(
                pretrained, num_labels=num_labels, problem_type="regression" if self.regression else "single_label_classification",
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        self.model.train()  # from_pretrained returns eval mode and Lightning keeps a module's mode: dropout would stay off
        self.metrics = torch.nn.ModuleList([build_metrics(metrics, num_labels) for _ in self.eval_splits])

    @override
    def parameter_groups(self) -> list[dict]:
        return layerwise_parameter_groups(self.model.named_parameters(), self.model.config.num_hidden_layers,
                                          self.learning_rate, self.layer_decay)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's output: on the first token's state (``transformers``' own forward) or on the masked mean."""
        if self.pooling == "first":
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        states = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.model.classifier(pooled.unsqueeze(1))  # the head reads position 0 of what it is given

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.regression:
            return torch.nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    @override
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.logits(batch)

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.logits(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self.logits(batch)
        predictions = logits.squeeze(-1) if self.regression else logits.argmax(-1)
        labels = batch["labels"].float() if self.regression else batch["labels"]
        self.metrics[dataloader_idx].update(predictions, labels)

    @override
    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for collection in self.metrics:
                collection.reset()
            return
        scores = {}
        for split, collection in zip(self.eval_splits, self.metrics, strict=True):
            for name, value in collection.compute().items():
                scores[f"{split}/{name}"] = 100.0 * float(value)
            collection.reset()
        self._record(scores)


class TextToText(_Finetuning):
    """T5 fine-tuned text to text, scored by Rouge-L of greedy generations (the paper's SNI protocol).

    Args:
        pretrained: a directory ``train.py export`` wrote (``AutoModelForSeq2SeqLM`` and ``AutoTokenizer``).
        eval_splits: names of the evaluation dataloaders, in order.
        references: the target texts of each evaluation split, in dataloader order.
        max_new_tokens: longest generation (paper: 128).
        learning_rate, betas, eps, weight_decay: AdamW (nanoT5: 5e-5, (0.9, 0.999), 1e-8, 0).
        lr_schedule, warmup_fraction: nanoT5: constant, no warm-up.
        dropout: T5's dropout rate during fine-tuning (0.1, as T5 v1.1 fine-tunes).
    """

    def __init__(self, pretrained: str, eval_splits: tuple[str, ...] = ("validation",),
                 references: dict[str, list[str]] | None = None, max_new_tokens: int = 128,
                 learning_rate: float = 5e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, lr_schedule: str = "constant", warmup_fraction: float = 0.0,
                 dropout: float = 0.1) -> None:
        super().__init__(learning_rate, betas, eps, weight_decay, lr_schedule, warmup_fraction, eval_splits)
        from torchmetrics.text.rouge import ROUGEScore
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.save_hyperparameters(ignore=["references"])
        with _quiet_loading():
            self.model = AutoModelForSeq2SeqLM.from_pretrained(pretrained, dropout_rate=dropout)
        self.model.train()  # as SequenceClassifier
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self.max_new_tokens = max_new_tokens
        self.references = references or {}
        self.rouge = torch.nn.ModuleList([ROUGEScore(rouge_keys="rougeL", use_stemmer=False) for _ in self.eval_splits])
        self.generations: dict[str, list[str]] = {}

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """Greedy decoding (no sampling, one beam), special tokens dropped."""
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
                                     max_new_tokens=self.max_new_tokens)
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        split = self.eval_splits[dataloader_idx]
        texts = self.generate(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"].masked_fill(batch["labels"] < 0, self.tokenizer.pad_token_id)
        targets = self.tokenizer.batch_decode(labels, skip_special_tokens=True)
        if self.references.get(split):  # the untruncated reference texts
            start = len(self.generations.get(split, []))
            targets = self.references[split][start:start + len(texts)]
        self.generations.setdefault(split, []).extend(texts)
        self.rouge[dataloader_idx].update(texts, targets)

    @override
    def on_validation_epoch_end(self) -> None:
        scores = {}
        for split, rouge in zip(self.eval_splits, self.rouge, strict=True):
            if not self.trainer.sanity_checking:
                scores[f"{split}/rougeL"] = 100.0 * float(rouge.compute()["rougeL_fmeasure"])
            rouge.reset()
        self.generations = {}
        if scores:
            self._record(scores)
