"""What the device check's parts share: the shapes and scale of a run, the generated corpus, the
``train.py`` arguments of the baselines, and a short fit (``benchmarks/device_check.py``)."""

from __future__ import annotations

import argparse
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from benchmarks.contenders import TINY, Shape

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("bert", "t5")
PARTS = ("tables", "throughput", "compile", "host_syncs")
WARM_STEPS = 3  # optimizer steps left out of steady-state figures (compilation, allocator growth, first syncs)
SYNC_WARNING = "synchroniz"  # in the warning torch.cuda.set_sync_debug_mode("warn") gives
LR_MONITOR = {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}}


def log(text: str) -> None:
    print(text, file=sys.__stdout__, flush=True)  # past quiet()'s capture: progress shows while a part runs


# ----- shapes and scale ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape(Shape):
    """A model's dimensions with its feed-forward width as configured (T5 v1.1 base: 2048, not 4 x 768)."""

    ffn: int = 1024

    @property
    def intermediate(self) -> int:
        return self.ffn


def baseline_shape(model: str) -> ModelShape:
    """The dimensions of ``configs/<model>/baseline.yaml``: the paper's."""
    config = yaml.safe_load((ROOT / "configs" / model / "baseline.yaml").read_text())
    m, d = config["model"]["init_args"], config["data"]["init_args"]
    hidden, ffn = (m["hidden_size"], m["intermediate_size"]) if model == "bert" else (m["d_model"], m["d_ff"])
    return ModelShape(hidden=hidden, layers=m["num_layers"], heads=m["num_heads"], vocab=d["vocab_size"],
                      seq_len=d["seq_len"], batch=d["batch_size"], ffn=ffn)


TINY_SHAPES = {  # BERT: 4 layers, so that stacking grows 1 -> 2 -> 4 at the shipped config's two fractions
    "bert": ModelShape(**{**asdict(TINY), "layers": 4}, ffn=2 * TINY.hidden),
    "t5": ModelShape(**asdict(TINY), ffn=2 * TINY.hidden),
}


@dataclass(frozen=True)
class Scale:
    """How big and how long each part runs."""

    shapes: dict[str, ModelShape]
    calibration: dict[str, int]  # CalibrationSettings' warmup, iterations, rounds
    rounds: int  # throughput: interleaved rounds, timed steps per round, warm-up steps per round
    steps: int
    warmup: int
    compile_steps: int  # optimizer steps of each compile fit
    sync_steps: int  # optimizer steps of each host-sync fit
    sync_args: tuple[str, ...]  # train.py overrides of the host-sync fits (the counter slows every operation)
    documents: int  # of the generated corpus
    data_args: tuple[str, ...]  # train.py overrides of the data modules' processes


def full_scale() -> Scale:
    """The paper's shapes, sized to the 8 minutes of a GPU check (iterations >= SOAP's preconditioning period)."""
    return Scale(shapes={m: baseline_shape(m) for m in MODELS}, calibration={"warmup": 2, "iterations": 10, "rounds": 2},
                 rounds=2, steps=3, warmup=1, compile_steps=100, sync_steps=12, sync_args=(), documents=50000,
                 data_args=())


DRY_SCALE = Scale(shapes=TINY_SHAPES, calibration={"warmup": 1, "iterations": 2, "rounds": 1}, rounds=1, steps=1,
                  warmup=0, compile_steps=8, sync_steps=7, sync_args=("--trainer.accumulate_grad_batches", "2"),
                  documents=300,
                  data_args=("--data.init_args.num_workers", "0", "--data.init_args.num_proc", "null"))


# ----- the run -------------------------------------------------------------------------------------
@dataclass
class Check:
    """What the parts read: the options, the device, the scale, a scratch folder."""

    args: argparse.Namespace
    device: torch.device
    scale: Scale
    workdir: Path

    @property
    def corpus(self) -> Path:
        """A generated corpus of simple English sentences in the scratch folder (written on first use)."""
        path = self.workdir / "corpus.txt"
        if not path.exists():
            write_corpus(path, self.scale.documents)
        return path


def write_corpus(path: Path, documents: int) -> None:
    rng = random.Random(0)
    words = {
        "subject": ["the cat", "a dog", "the old man", "my sister", "the committee", "a small bird", "the river"],
        "verb": ["sees", "likes", "follows", "reads", "builds", "finds", "watches", "crosses"],
        "object": ["the house", "a red ball", "the long road", "an apple", "the bridge", "a letter", "the garden"],
        "tail": ["in the morning", "every day", "with great care", "after dinner", "near the sea", "again"],
    }
    paragraphs = (" ".join(" ".join(rng.choice(w) for w in words.values()) + "." for _ in range(rng.randint(3, 8)))
                  for _ in range(documents))
    path.write_text("\n\n".join(paragraphs) + "\n")


def gpu_slug(name: str) -> str:
    """``h100`` of ``NVIDIA H100 80GB HBM3``: the first word of the model name with a digit, lower case."""
    words = re.split(r"[\s_-]+", name.replace("NVIDIA", "").replace("GeForce", ""))
    word = next((w for w in words if any(c.isdigit() for c in w)), name)
    return re.sub(r"[^a-z0-9]+", "", word.lower()) or "gpu"


def config_args(check: Check, model: str) -> list[str]:
    """``train.py`` arguments of the model's baseline at this check's shape, device and folders."""
    shape = check.scale.shapes[model]
    names = ({"hidden": "hidden_size", "ffn": "intermediate_size"} if model == "bert" else
             {"hidden": "d_model", "ffn": "d_ff"})
    dims = {"num_layers": shape.layers, "num_heads": shape.heads, names["hidden"]: shape.hidden,
            names["ffn"]: shape.ffn, **({} if model == "bert" else {"d_kv": shape.hidden // shape.heads})}
    data = {"vocab_size": shape.vocab, "seq_len": shape.seq_len, "batch_size": shape.batch,
            "cache_dir": check.workdir / "cache"}
    return [
        "--config", str(ROOT / "configs" / model / "baseline.yaml"),
        "--trainer.accelerator", "gpu" if check.device.type == "cuda" else "cpu",
        "--trainer.devices", "1",
        "--trainer.logger.init_args.save_dir", str(check.workdir / "runs"),
        *(arg for k, v in dims.items() for arg in (f"--model.init_args.{k}", str(v))),
        *(arg for k, v in data.items() for arg in (f"--data.init_args.{k}", str(v))),
        *check.scale.data_args,
    ]


def shipped_callbacks(name: str) -> list[dict[str, Any]]:
    """The callbacks ``configs/bert/<name>.yaml`` adds to the baseline."""
    return yaml.safe_load((ROOT / "configs" / "bert" / f"{name}.yaml").read_text())["trainer"]["callbacks+"]


def baseline_callbacks(model: str, table: Path) -> list[dict[str, Any]]:
    """The callbacks of ``configs/<model>/baseline.yaml`` (a user's fit), its ``RSTBudget`` priced by ``table``."""
    callbacks = yaml.safe_load((ROOT / "configs" / model / "baseline.yaml").read_text())["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["class_path"] == "callbacks.rst.RSTBudget":
            callback["init_args"]["table"] = str(table)
    return callbacks


def fit(check: Check, model: str, name: str, callbacks: list[dict[str, Any]], steps: int, extra: list[str],
        probes: list[L.Callback]) -> L.Trainer:
    """Fit the baseline on the generated corpus for ``steps`` optimizer steps with ``callbacks`` in place of the
    config's (and the ``NonFiniteCheck`` a fit adds), no validation, checkpoints only by a ``RunCheckpoint`` among
    them; ``probes`` watch it. The caller silences it (``quiet``): a part that records warnings does so inside."""
    from training.lightning_cli import configured

    overrides = check.workdir / f"{name}.yaml"
    overrides.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    checkpoints = any(c["class_path"] == "callbacks.checkpointing.RunCheckpoint" for c in callbacks)
    args = [*config_args(check, model), "--config", str(overrides),
            "--data.init_args.corpus.source", "files", "--data.init_args.corpus.data_files", str(check.corpus),
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", str(checkpoints).lower(),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]
    trainer, module, datamodule = configured(args)
    trainer.callbacks.extend(probes)
    trainer.fit(module, datamodule=datamodule)
    return trainer
