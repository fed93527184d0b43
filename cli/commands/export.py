"""``train.py export --ckpt_path CKPT --output DIR [--tokenizer DIR]``: write a pre-training checkpoint as a Hugging
Face directory (config, safetensors weights, tokenizer, model card) that ``AutoModelForMaskedLM`` /
``AutoModelForSeq2SeqLM`` and ``AutoTokenizer`` load."""

from __future__ import annotations

import argparse

from lightning_modules.export import export_checkpoint

TAKES_CONFIG = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of BertMLM or T5SpanCorruption (e.g. .../last.ckpt)")
    parser.add_argument("--output", required=True, help="the directory to write")
    parser.add_argument("--tokenizer", help="the tokenizer directory, for checkpoints that hold none (older versions)")


def run(args: argparse.Namespace) -> None:
    loaded = export_checkpoint(args.ckpt_path, args.output, args.tokenizer)
    auto = "AutoModelForMaskedLM" if loaded.family == "bert" else "AutoModelForSeq2SeqLM"
    print(f"wrote {args.output}: {type(loaded.module.model).__name__} ({loaded.module.num_layers} layers, "
          f"{sum(p.numel() for p in loaded.module.model.parameters()):,} parameters) and its tokenizer; load it with "
          f"{auto}.from_pretrained({args.output!r}) and AutoTokenizer.from_pretrained({args.output!r})")
