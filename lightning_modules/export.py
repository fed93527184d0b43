"""Pre-training checkpoints as Hugging Face models: ``train.py export`` and the start of every fine-tune.

A Lightning checkpoint of ``BertMLM`` or ``T5SpanCorruption`` holds the ``transformers`` model's weights
(every layer: stacking and dropping only choose which layers run), the module's hyper-parameters (with
its class path, as LightningCLI records them), the datamodule's tokenizer files and the RST budget's
state. ``export_checkpoint`` writes them as a directory that ``AutoModelForMaskedLM`` /
``AutoModelForSeq2SeqLM`` and ``AutoTokenizer`` load with no code of this project, plus a model card
(README.md) naming the budget, the RST spent, the steps, the tokens and the configuration.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.budget import saved_budget_state
from core.checkpoints import data_state
from core.class_paths import import_class
from core.ledger import WorkLedger
from core.errors import UserError

__all__ = ["FAMILIES", "PretrainingCheckpoint", "export_checkpoint", "load_checkpoint"]

# class path of the pre-training module -> model family
FAMILIES = {
    "lightning_modules.bert_mlm.BertMLM": "bert",
    "lightning_modules.t5_span_corruption.T5SpanCorruption": "t5",
}


@dataclass
class PretrainingCheckpoint:
    """A loaded pre-training checkpoint: the module (all layers active), its family, tokenizer and run facts."""

    path: Path
    family: str
    module: Any
    tokenizer: Any
    facts: dict[str, Any] = field(default_factory=dict)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"--ckpt_path {path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise UserError(f"--ckpt_path {path}: not a Lightning checkpoint this project can read ({type(error).__name__})") from None


def _tokenizer(checkpoint: dict[str, Any], path: Path, tokenizer_dir: str | None):
    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer {tokenizer_dir}: holds no tokenizer.json")
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    name = checkpoint.get("datamodule_hparams_name") and checkpoint.get("datamodule_hyper_parameters", {}).get("_class_path")
    files = (data_state(checkpoint) or {}).get("tokenizer_files")
    if files is None:
        raise UserError(f"{path} holds no tokenizer (written by an older version, or without the datamodule {name or ''}): "
                        "pass --tokenizer DIR, the tokenizer directory of its data cache (<cache>/tokenizers/...)")
    with tempfile.TemporaryDirectory() as tmp:
        for file_name, text in files.items():
            (Path(tmp) / file_name).write_text(text, encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)


def _facts(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """Steps, sequences, tokens, RST spent and budget, the run's configuration."""
    budget = saved_budget_state(checkpoint) or {}
    ledger = checkpoint.get("work_ledger") or {}
    sequences = sum(float(v) for k, v in ledger.items() if k.startswith("fwd_bwd/"))
    per_sequence = (data_state(checkpoint) or {}).get("tokens_per_sequence")
    seq_len = int(checkpoint.get("datamodule_hyper_parameters", {}).get("seq_len") or 1)  # cut passes: in proportion
    config_file = path.parent.parent / "config.yaml"  # LightningCLI writes it into the run's log directory
    return {
        "checkpoint": str(path),
        "global_step": int(checkpoint.get("global_step", 0)),
        "sequences_trained": int(sequences),
        "tokens_trained": int(WorkLedger(ledger).tokens_trained(per_sequence, seq_len)) if per_sequence else None,
        "rst_spent_seconds": float(budget["spent_seconds"]) if "spent_seconds" in budget else None,
        "rst_budget_seconds": float(budget["budget_seconds"]) if "budget_seconds" in budget else None,
        "active_layers_at_save": list(checkpoint.get("active_layers") or []),
        "config": config_file.read_text() if config_file.is_file() else None,
        "model_hyper_parameters": {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")},
        "data_hyper_parameters": {k: v for k, v in checkpoint.get("datamodule_hyper_parameters", {}).items()
                                  if not k.startswith("_")},
    }


def load_checkpoint(ckpt_path: str | Path, family: str | None = None, tokenizer_dir: str | None = None) -> PretrainingCheckpoint:
    """Load a pre-training checkpoint on the CPU, all layers active; ``family`` ("bert"/"t5") refuses the other one."""
    path = Path(ckpt_path)
    checkpoint = _read(path)
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if class_path not in FAMILIES:
        raise UserError(f"{path} is not a pre-training checkpoint of this project's BertMLM or T5SpanCorruption "
                        f"(its module: {class_path or 'unknown'})")
    found = FAMILIES[class_path]
    if family is not None and found != family:
        raise UserError(f"{path} is a {found.upper()} checkpoint; this needs a {family.upper()} one")
    module_class = import_class(class_path, what=str(path))
    module = module_class(**{k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")})
    module.load_state_dict(checkpoint["state_dict"])
    module.set_active_layers(None)
    module.eval()
    return PretrainingCheckpoint(path, found, module, _tokenizer(checkpoint, path, tokenizer_dir), _facts(checkpoint, path))


def model_card(loaded: PretrainingCheckpoint) -> str:
    """README.md of an exported directory: what was trained, under which budget, for how long."""
    f = loaded.facts
    auto = "AutoModelForMaskedLM" if loaded.family == "bert" else "AutoModelForSeq2SeqLM"
    rst = (f"{f['rst_spent_seconds']:,.1f} of a {f['rst_budget_seconds']:,.1f} s budget"
           if f["rst_spent_seconds"] is not None else "no RST budget recorded")
    tokens = f"{f['tokens_trained']:,}" if f["tokens_trained"] is not None else "not recorded"
    config = f["config"] or json.dumps({"model": f["model_hyper_parameters"], "data": f["data_hyper_parameters"]}, indent=2)
    return "\n".join([
        "---",
        "library_name: transformers",
        f"tags: [{'fill-mask' if loaded.family == 'bert' else 'text2text-generation'}, budgeted-pretraining]",
        "---",
        "",
        f"# {type(loaded.module).__name__} pre-trained under a Reference System Time budget",
        "",
        "Exported by `train.py export` of ntng-lightning (No Train No Gain, Kaddour et al., NeurIPS 2023).",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{type(loaded.module.model).__name__}`, {loaded.module.num_layers} layers |",
        f"| RST spent | {rst} |",
        f"| optimizer steps | {f['global_step']:,} |",
        f"| sequences trained | {f['sequences_trained']:,} |",
        f"| tokens trained | {tokens} |",
        f"| checkpoint | `{f['checkpoint']}` |",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {auto}",
        "tokenizer = AutoTokenizer.from_pretrained(DIR)",
        f"model = {auto}.from_pretrained(DIR)",
        "```",
        "",
        "## Configuration of the run",
        "",
        "```yaml" if f["config"] else "```json",
        config.rstrip(),
        "```",
        "",
    ])


def export_checkpoint(ckpt_path: str | Path, output: str | Path, tokenizer_dir: str | None = None,
                      loaded: PretrainingCheckpoint | None = None) -> PretrainingCheckpoint:
    """Write ``ckpt_path`` as a Hugging Face directory: config.json, model.safetensors, the tokenizer, README.md."""
    loaded = loaded or load_checkpoint(ckpt_path, tokenizer_dir=tokenizer_dir)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    model = loaded.module.model
    model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    (out / "README.md").write_text(model_card(loaded))
    (out / "training_facts.json").write_text(json.dumps({k: v for k, v in loaded.facts.items() if k != "config"}, indent=2) + "\n")
    return loaded
