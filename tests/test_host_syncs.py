"""A training step that never waits for the device (docs/performance.md, "A step that never waits").

On a GPU every read of a device value on the host (``.item()``, ``.tolist()``, ``bool(tensor)``, ...) stops the
host from queueing the next step until the device has caught up. The common case (table-mode RST, no batch
selection, ``NonFiniteCheck`` on, the default optimizers) must read nothing between logging steps. On a CPU the
reads themselves are counted (``core.host_sync.HostReadCounter``), which is what a GPU would pay for.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import cli
from core.host_sync import HostReadCounter
from core.sealing import seal
from helpers import ROOT, tiny_fit_args

LOG_EVERY = 10
STEPS = 30


class _StepLabels(L.Callback):
    """Counts reads under the number of the optimizer step being taken, from its batch's start until the next
    batch or validation; the data loader's own reads (host data) are left out below."""

    def __init__(self, counter: HostReadCounter) -> None:
        self.counter = counter

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counter.label = trainer.global_step + 1

    def on_validation_start(self, trainer, pl_module) -> None:
        self.counter.label = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.counter.label = None


def _table(path: Path, optimizer: str) -> Path:
    path.write_text(json.dumps(seal({"format": "rst-table/1", "seq_len": 32, "micro_batch_size": 16,
                                     "fwd_bwd_seconds": [1.0, 1.0], "optimizer_step_seconds": {optimizer: 0.0}})))
    return path


def _counted_fit(args: list[str], tmp_path: Path, optimizer: str, monkeypatch) -> HostReadCounter:
    """``train.py fit`` with a table-mode RST budget of STEPS steps, logging every LOG_EVERY steps, the progress
    bar on and the default NonFiniteCheck, counting host reads per optimizer step."""
    import training.lightning_cli as lightning_cli

    overlay = tmp_path / "rst.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "callbacks.rst.RSTBudget",
         "init_args": {"budget": f"{STEPS}s", "table": str(_table(tmp_path / "table.json", optimizer))}},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
        {"class_path": "callbacks.checkpointing.RunCheckpoint", "init_args": {"save_last": True, "every": 10}},
    ]}}))
    counter = HostReadCounter()
    build = lightning_cli.PretrainingCLI.instantiate_trainer

    def instantiate_trainer(self, **kwargs):
        trainer = build(self, **kwargs)
        trainer.callbacks.append(_StepLabels(counter))
        return trainer

    monkeypatch.setattr(lightning_cli.PretrainingCLI, "instantiate_trainer", instantiate_trainer)
    with counter:
        cli.main([*args, "--config", str(overlay), "--trainer.max_steps", "-1", "--trainer.log_every_n_steps",
                  str(LOG_EVERY), "--trainer.val_check_interval", "15", "--trainer.enable_progress_bar", "true"])
    return counter


def _device_reads(counter: HostReadCounter, step: int) -> dict[str, int]:
    """The reads of ``step``, without the data loader's own (a new iterator draws its seed: host data)."""
    return {where: n for where, n in counter.where[step].items() if "torch/utils/data/" not in where}


def _steady_non_logging_steps() -> list[int]:
    return [step for step in range(2, STEPS) if step % LOG_EVERY]


def _t5_args(corpus: Path, out: Path) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs/t5/demo.yaml"),
        "--data.corpus.source", "files", "--data.corpus.data_files", str(corpus),
        "--data.vocab_size", "300", "--data.seq_len", "32", "--data.batch_size", "16",
        "--data.validation_fraction", "0.05", "--data.max_validation_sequences", "64",
        "--model.num_layers", "2", "--model.d_model", "32", "--model.d_ff", "64", "--model.num_heads", "2",
        "--model.d_kv", "16", "--trainer.logger.init_args.save_dir", str(out),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bert", "t5"])
def test_a_steady_training_step_reads_nothing_from_the_device(model, corpus_file, tmp_path, monkeypatch, capsys):
    """BERT with its default fused AdamW, T5 with AdamWScale on the path GPUs take (``torch._foreach_*``, forced
    here; its CPU path runs PyTorch's fused kernel per tensor with host step counts): zero reads on every
    optimizer step that is neither a logging step nor the first; the logging steps do read (the counter works)."""
    from lightning_modules.optimizers import AdamWScale

    if model == "bert":
        args, optimizer = tiny_fit_args(corpus_file, tmp_path), "AdamW"
    else:
        monkeypatch.setattr(AdamWScale, "_fusable", staticmethod(lambda params: False))
        args, optimizer = _t5_args(corpus_file, tmp_path), "AdamWScale"
    counter = _counted_fit(args, tmp_path, optimizer, monkeypatch)
    assert f"done: {STEPS} steps" in capsys.readouterr().out
    reads = {step: _device_reads(counter, step) for step in _steady_non_logging_steps()}
    assert all(not where for where in reads.values()), {step: where for step, where in reads.items() if where}
    assert all(_device_reads(counter, step) for step in range(LOG_EVERY, STEPS + 1, LOG_EVERY))


@pytest.mark.slow
def test_an_optimizer_that_cannot_drop_a_step_itself_is_checked_on_the_host_at_every_step(corpus_file, tmp_path,
                                                                                          monkeypatch):
    """The counter's control, and the documented cost: an unfused AdamW cannot take ``found_inf``, so
    ``NonFiniteCheck`` reads its verdict on the host once per optimizer step, and nothing else does."""
    args = [*tiny_fit_args(corpus_file, tmp_path), "--model.optimizer", "torch.optim.AdamW",
            "--model.optimizer.lr", "5e-3", "--model.optimizer.foreach", "true"]
    counter = _counted_fit(args, tmp_path, "AdamW", monkeypatch)
    for step in _steady_non_logging_steps():  # (torch's unfused AdamW reads its step counts: CPU tensors on a GPU too)
        reads = {where: n for where, n in _device_reads(counter, step).items() if "torch/optim/" not in where}
        assert [(where.split(":")[0], n) for where, n in reads.items()] == [("__bool__ at callbacks/numerics.py", 1)]


@pytest.mark.parametrize("fused", [True, False])
def test_adamwscale_given_found_inf_changes_nothing_and_given_zero_steps_as_without(fused, monkeypatch):
    """``found_inf`` 1 leaves parameters and state bit-identical, even with non-finite gradients (both paths);
    ``found_inf`` 0 takes the same step as no ``found_inf`` at all."""
    from lightning_modules.optimizers import AdamWScale

    monkeypatch.setattr(AdamWScale, "_fusable", staticmethod(lambda params: fused))
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=generator) for shape in [(6, 4), (5,)]]

    def optimizer_after_one_step():
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = AdamWScale(params, lr=1e-2, weight_decay=0.1)
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        return params, optimizer

    params, optimizer = optimizer_after_one_step()
    before = [p.detach().clone() for p in params], {k: {n: torch.as_tensor(v).clone() for n, v in s.items()}
                                                    for k, s in enumerate(optimizer.state.values())}
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before[0], params, strict=True))
    for k, state in enumerate(optimizer.state.values()):
        assert all(torch.equal(before[1][k][n], torch.as_tensor(v)) for n, v in state.items()), k

    reference, plain = optimizer_after_one_step()
    for p, q in zip(params, reference, strict=True):
        p.grad = q.grad = torch.full_like(p, 0.5)
    optimizer.found_inf = torch.zeros(())
    optimizer.step()
    plain.step()
    for p, q in zip(params, reference, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_the_progress_bar_shows_host_numbers_from_the_module_and_the_callbacks(bar):
    """``train.py`` swaps Lightning's bar (TQDM, or Rich where installed) for one that adds the module's and the
    callbacks' ``progress_bar_values()``: plain numbers, so showing them reads nothing from the device."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from callbacks.progress import RichStepProgressBar, StepProgressBar, host_values, with_host_values

    class Clock(L.Callback):
        def progress_bar_values(self) -> dict[str, float]:
            return {"rst_spent": 12.3456, "rst_left": 7.0}

    class Module(L.LightningModule):
        def progress_bar_values(self) -> dict[str, float]:
            return {"train/loss": 5.91234}

    given = TQDMProgressBar(refresh_rate=3) if bar == "tqdm" else RichProgressBar(refresh_rate=3)
    trainer = L.Trainer(callbacks=[Clock(), given], logger=False, enable_checkpointing=False)
    with_host_values(trainer)
    shown = trainer.progress_bar_callback
    assert type(shown) is (StepProgressBar if bar == "tqdm" else RichStepProgressBar) and shown.refresh_rate == 3
    assert host_values(trainer, Module()) == {"train/loss": "5.912", "rst_spent": "12.35", "rst_left": "7"}
