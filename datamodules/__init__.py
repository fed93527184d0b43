"""Pre-training and downstream data: corpora, tokenizers, packing, caching, collators."""

from datamodules.collators import MLMCollator
from datamodules.pretraining import MLMDataModule, PretrainingDataModule

__all__ = ["MLMCollator", "MLMDataModule", "PretrainingDataModule"]
