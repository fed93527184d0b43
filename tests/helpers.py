"""What the tests share: a generated corpus with real structure, tiny configurations, a tiny fit,
TensorBoard reading."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L

from datamodules.corpora import Corpus

ROOT = Path(__file__).resolve().parents[1]

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the committee", "a small bird", "the river"]
_VERBS = ["sees", "likes", "follows", "reads", "builds", "finds", "watches", "crosses"]
_OBJECTS = ["the house", "a red ball", "the long road", "an apple", "the bridge", "a letter", "the garden"]
_TAILS = ["in the morning", "every day", "with great care", "after dinner", "near the sea", "again"]


def make_corpus(path: Path, documents: int, seed: int = 0) -> Path:
    """Write ``documents`` paragraphs of simple, learnable English sentences, one blank line apart."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(documents):
        sentences = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
            for _ in range(rng.randint(3, 8))
        ]
        paragraphs.append(" ".join(sentences))
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def files_corpus(path: Path | str, **kwargs) -> Corpus:
    return Corpus(source="files", data_files=str(path), **kwargs)


def tiny_mlm_data_args(corpus: Path, **overrides) -> dict:
    args = dict(
        corpus=files_corpus(corpus),
        vocab_size=200,
        seq_len=32,
        batch_size=16,
        validation_fraction=0.05,
        max_validation_sequences=64,
    )
    args.update(overrides)
    return args


def tiny_bert_args(**overrides) -> dict:
    args = dict(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=200, max_seq_len=32)
    args.update(overrides)
    return args


class StepLosses(L.Callback):
    """The training loss of every micro-batch, with the optimizer step it belongs to."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append((trainer.global_step, float(outputs["loss"])))


def fit_tiny_bert(out: Path, corpus: Path, optimizer: Callable, *, lr_schedule: str = "triangle",
                  warmup_fraction: float = 0.0, max_steps: int = 16, ckpt_path: Path | None = None, every: int = 0,
                  accumulate: int = 1, callbacks: Sequence[L.Callback] = (), plugins: Sequence = ()):
    """Seed 0 and fit a tiny ``BertMLM`` with ``optimizer`` (a function of the parameter groups) in ``out``:
    validation every 8 steps, a checkpoint every ``every`` steps (``out/ckpt/step=N.ckpt``; 0: none), and
    ``callbacks`` after the loss probe, the trainer ``plugins``. Returns the trainer, the model and the ``StepLosses`` of the fit."""
    from datamodules import MLMDataModule
    from lightning_modules.bert_mlm import BertMLM

    L.seed_everything(0)
    model = BertMLM(**tiny_bert_args(), optimizer=optimizer, lr_schedule=lr_schedule, warmup_fraction=warmup_fraction)
    data = MLMDataModule(**tiny_mlm_data_args(corpus))
    probe = StepLosses()
    callbacks = [probe, *callbacks]
    if every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=every,
                                                             save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=bool(every),
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=8,
                        check_val_every_n_epoch=None, limit_val_batches=1, default_root_dir=out,
                        accumulate_grad_batches=accumulate, plugins=list(plugins))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, probe


def tiny_fit_args(corpus, out: Path, *extra: str) -> list[str]:
    """``train.py`` arguments: the BERT demo config shrunk to a 2-layer model on ``corpus``, 60 steps."""
    return [
        "fit",
        "--config", str(ROOT / "configs/bert/demo.yaml"),
        "--config", str(ROOT / "tests/configs/step-budget.yaml"),
        "--data.corpus.source", "files",
        "--data.corpus.data_files", str(corpus),
        "--data.vocab_size", "200",
        "--data.seq_len", "32",
        "--data.batch_size", "16",
        "--data.validation_fraction", "0.05",
        "--data.max_validation_sequences", "64",
        "--model.num_layers", "2",
        "--model.hidden_size", "32",
        "--model.num_heads", "2",
        "--model.intermediate_size", "64",
        "--model.learning_rate", "5e-3",
        "--trainer.max_steps", "60",
        "--trainer.val_check_interval", "30",
        "--trainer.log_every_n_steps", "5",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(out),
        *extra,
    ]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve TensorBoard holds in ``log_dir``: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_until_exit(args: list[str], capsys) -> tuple[int, list[str]]:
    """``cli.main(args)``, which must end the program: its exit status and its stderr lines."""
    import pytest

    import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main(args)
    return stopped.value.code, capsys.readouterr().err.strip().splitlines()


def doc(name: str) -> str:
    """The text of ``README.md``, or of the page ``docs/<name>`` (e.g. ``doc("usage.md")``)."""
    return (ROOT / name if name == "README.md" else ROOT / "docs" / name).read_text()


def documentation() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fit_fingerprint(args: list[str]) -> str:
    """The configuration fingerprint ``train.py fit`` records for these arguments (``args[0] == "fit"``): what
    ``--ckpt_path last`` matches, for tests that lay out checkpoint folders by hand."""
    from training.lightning_cli import PretrainingCLI
    from training.run_folder import config_fingerprint

    class _Parsed(Exception):
        pass

    class _FingerprintOnly(PretrainingCLI):
        def _parse_ckpt_path(self) -> None:
            raise _Parsed(config_fingerprint(self.config["fit"]))

    try:
        _FingerprintOnly(args=args, auto_configure_optimizers=False)
    except _Parsed as parsed:
        return str(parsed)
    raise AssertionError("the CLI did not parse the arguments")
