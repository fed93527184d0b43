"""Pre-training and downstream data: corpora, tokenizers, packing, caching, collators."""

from datamodules.collators import MLMCollator, SpanCorruptionCollator
from datamodules.pretraining import MLMDataModule, PretrainingDataModule, SpanCorruptionDataModule

__all__ = ["MLMCollator", "MLMDataModule", "PretrainingDataModule", "SpanCorruptionCollator", "SpanCorruptionDataModule"]
