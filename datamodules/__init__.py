"""Pre-training data: corpora, tokenizers, packing, caching, the training stream, collators."""

from datamodules.collators import MLMCollator, SpanCorruptionCollator
from datamodules.corpora import Corpus
from datamodules.mlm import MLMDataModule
from datamodules.span_corruption import SpanCorruptionDataModule

__all__ = ["Corpus", "MLMCollator", "MLMDataModule", "SpanCorruptionCollator", "SpanCorruptionDataModule"]
