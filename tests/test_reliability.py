"""Reliability: kill and resume, SIGTERM, damaged checkpoints, non-finite numbers, concurrent runs, long budgets."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import cli
from core.cost_table import CostTable
from helpers import ROOT, tiny_fit_args
from training.summary import read_summary

# 2 micro-batches of 16 x 32 tokens per optimizer step at 1.0 s each + 0.25 s for AdamW: 2.25 RST-s a step;
# a 30 s budget ends at step 14 (31.5 s); a save every 7 RST-s lands at steps 4, 7, 10 and 13.
TABLE = dict(format="rst-table/1", seq_len=32, micro_batch_size=16, fwd_bwd_seconds=[0.5, 1.0], fwd_seconds=[0.2, 0.4],
             optimizer_step_seconds={"AdamW": 0.25})


def _overlay(directory: Path, *probes: dict, budget: str = "30s", every: str | int = "7s") -> Path:
    """A config overlay: the RST budget on TABLE, LR monitor, RunCheckpoint, the probes."""
    directory.mkdir(parents=True, exist_ok=True)
    CostTable.from_dict(TABLE).save(directory / "table.json")
    config = {"trainer": {"max_steps": -1, "accumulate_grad_batches": 2, "val_check_interval": 6, "callbacks": [
        {"class_path": "callbacks.rst.RSTBudget", "init_args": {"budget": budget, "table": str(directory / "table.json")}},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
        {"class_path": "callbacks.checkpointing.RunCheckpoint", "init_args": {"every": every}},
        *probes,
    ]}}
    path = directory / "overlay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _probe(name: str, **init_args) -> dict:
    return {"class_path": f"ddp_probe.{name}", "init_args": init_args}


def _args(corpus, out: Path, overlay: Path, *extra: str) -> list[str]:
    return [*tiny_fit_args(corpus, out, "--config", str(overlay)), "--trainer.max_steps", "-1", *extra]


def _steps(directory: Path, rank: int = 0) -> dict[int, dict]:
    """The RecordSteps lines by step; a resumed run's line replaces the killed run's."""
    lines = (directory / f"rank{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


def _start(args: list[str], signal_at: str | None = None) -> subprocess.Popen:
    """``train.py`` in its own process (started first, so its imports overlap the test's in-process run); with
    ``signal_at`` (``step:micro_batch:SIGNAME``) its ``SignalAt`` probe sends it that signal there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), **({"SIGNAL_AT": signal_at} if signal_at else {})}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(process: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return _finish(_start(args), timeout)


def _final_line(text: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith("done:"))
    return line.split("; TensorBoard")[0]


def _assert_same_from(step: int, resumed: dict[int, dict], full: dict[int, dict]) -> None:
    assert sorted(s for s in resumed if s > step) == sorted(s for s in full if s > step)
    for s in sorted(full):
        if s <= step:
            continue
        again, before = resumed[s], full[s]
        assert again["ids"] == before["ids"] and again["layers"] == before["layers"], s
        assert again["rst"] == before["rst"] and again["lr"] == pytest.approx(before["lr"], rel=1e-9, abs=1e-15), s
        assert again["loss"] == pytest.approx(before["loss"], rel=1e-5), s


STACKING = {"class_path": "callbacks.stacking.LayerStacking", "init_args": {"initial_layers": 1, "fractions": [0.5]}}
DROPPING = {"class_path": "callbacks.layer_dropping.LayerDropping", "init_args": {"gamma_f": 100.0, "theta_bar": 0.5}}
SELECTIVE_BACKPROP = {"class_path": "callbacks.selective_backprop.SelectiveBackprop", "init_args": {"beta": 1.0, "history": 64}}
RHO_LOSS = {"class_path": "callbacks.rho_loss.RhoLoss", "init_args": {"ratio": 0.5}}
# every method in a killed run: a depth schedule and a batch selector can share one (a run has at most one of each)
METHODS = {
    "baseline": [],
    "stacking+selective-backprop": [STACKING, SELECTIVE_BACKPROP],
    "dropping+rho-loss": [DROPPING, RHO_LOSS],
}


@pytest.fixture(scope="module")
def irreducible_losses(corpus_file, tmp_path_factory):
    """RHO-loss's irreducible losses: a tiny model trained on the holdout split, scored by ``train.py score`` for the
    3 passes of the training split the killed run's 18 steps read (RhoLoss refuses a file of fewer passes)."""
    out = tmp_path_factory.mktemp("irreducible")
    args = tiny_fit_args(corpus_file, out, "--data.train_split", "holdout", "--data.holdout_fraction", "0.2",
                         "--trainer.max_steps", "6", "--trainer.logger.init_args.name", "irreducible")
    cli.main(args)
    losses = out / "il.npy"
    cli.main(["score", *args[1:], "--ckpt_path", "last", "--output", str(losses), "--passes", "3"])
    return losses


def _outcome(log_dir: Path) -> tuple:
    """What two runs that should agree must agree on, from the ``summary.json`` a fit writes: status, steps, tokens,
    RST (to the microsecond: a resumed clock adds its offset in another order) and the final validation loss (to
    the 4 decimals the summary line prints)."""
    summary = read_summary(log_dir)
    return (summary.status, summary.optimizer_steps, summary.tokens, round(summary.rst_seconds, 6),
            round(summary.val_loss, 4))


@pytest.fixture(scope="module")
def uninterrupted_baseline(corpus_file, tmp_path_factory) -> tuple[tuple, dict[int, dict]]:
    """The baseline run the kill and the SIGTERM tests compare with, run once: its outcome and its steps.

    Each test asks for it after starting its own interrupted process, so that the two overlap."""
    full_dir = tmp_path_factory.mktemp("uninterrupted")
    full = _overlay(full_dir, _probe("RecordSteps", directory=str(full_dir / "steps")))
    cli.main(_args(corpus_file, full_dir, full))
    return _outcome(full_dir / "bert-demo" / "version_0"), _steps(full_dir / "steps")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_sigkill_inside_a_step_then_resume_last_repeats_the_uninterrupted_run(method, corpus_file, tmp_path, capsys,
                                                                              request):
    callbacks = [json.loads(json.dumps(c)) for c in METHODS[method]]
    extra: list[str] = []
    budget = "30s"
    if "rho-loss" in method:  # scoring twice the candidates makes its steps dearer: a larger budget
        budget = "45s"
        callbacks[-1]["init_args"]["irreducible_losses"] = str(request.getfixturevalue("irreducible_losses"))
        extra = ["--data.holdout_fraction", "0.2"]
        capsys.readouterr()  # the fixture's own runs
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    # a real SIGKILL of a real process, on the second micro-batch of step 6: after a save, inside a step
    run = _overlay(killed_dir, *callbacks, _probe("RecordSteps", directory=str(killed_dir / "steps")),
                   _probe("SignalAt"), budget=budget)  # the same configuration for the killed run and its resumption
    process = _start(_args(corpus_file, killed_dir, run, *extra), signal_at="6:1:SIGKILL")
    if method == "baseline":  # the uninterrupted run, meanwhile (shared with the SIGTERM test)
        uninterrupted, full_steps = request.getfixturevalue("uninterrupted_baseline")
    else:
        full = _overlay(full_dir, *callbacks, _probe("RecordSteps", directory=str(full_dir / "steps")), budget=budget)
        cli.main(_args(corpus_file, full_dir, full, *extra))
        uninterrupted, full_steps = _outcome(full_dir / "bert-demo" / "version_0"), _steps(full_dir / "steps")
    assert uninterrupted[0] == "finished" and uninterrupted[1] >= 7

    killed = _finish(process)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert max(_steps(killed_dir / "steps")) == 5
    saved = torch.load(killed_dir / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    # RunCheckpoint every 7 RST-s: the last step before the kill at which the RST crossed a multiple of 7
    crossings = [s for s in range(1, 6) if full_steps[s]["rst"] // 7 > (full_steps[s - 1]["rst"] if s > 1 else 0) // 7]
    assert crossings and saved["global_step"] == crossings[-1]
    capsys.readouterr()
    cli.main(_args(corpus_file, killed_dir, run, *extra, "--ckpt_path", "last"))
    captured = capsys.readouterr()
    assert _outcome(killed_dir / "bert-demo" / "version_0") == uninterrupted
    assert "resuming from " in captured.err and f"{os.sep}version_0{os.sep}checkpoints{os.sep}last.ckpt" in captured.err
    _assert_same_from(saved["global_step"], _steps(killed_dir / "steps"), full_steps)
    assert sorted(p.name for p in (killed_dir / "bert-demo").iterdir()) == ["version_0"]  # the resumed run logs where the killed one did


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_exits_143_and_resumes_exactly(corpus_file, tmp_path, capsys, request):
    stopped_dir = tmp_path / "stopped"
    run = _overlay(stopped_dir, _probe("RecordSteps", directory=str(stopped_dir / "steps")), _probe("SignalAt"))
    process = _start(_args(corpus_file, stopped_dir, run), signal_at="6:0:SIGTERM")
    uninterrupted, full_steps = request.getfixturevalue("uninterrupted_baseline")  # meanwhile, if not run yet
    stopped = _finish(process)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "SIGTERM: saved " in stopped.stderr and "at optimizer step 6; continue with --ckpt_path last" in stopped.stderr
    assert "pre-empted: stopped by SIGTERM at optimizer step 6" in stopped.stdout and "done:" not in stopped.stdout
    last = stopped_dir / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6  # the step in progress finished, then saved
    preempted = read_summary(stopped_dir / "bert-demo" / "version_0")
    assert (preempted.status, preempted.optimizer_steps, preempted.checkpoint) == ("preempted", 6, str(last))
    cli.main(_args(corpus_file, stopped_dir, run, "--ckpt_path", "last"))
    assert _outcome(stopped_dir / "bert-demo" / "version_0") == uninterrupted
    _assert_same_from(6, _steps(stopped_dir / "steps"), full_steps)


# --------------------------------------------------------------------------- checkpoint files


def _fake_checkpoint(path: Path, step: int, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.ones(64)}}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_last_is_the_newest_checkpoint_of_any_version_and_a_damaged_one_is_named(tmp_path):
    from core.checkpoints import check_checkpoint, claim_version, resume_target
    from core.errors import UserError

    older = _fake_checkpoint(tmp_path / "version_1" / "checkpoints" / "last.ckpt", 10, 1_000)
    newer = _fake_checkpoint(tmp_path / "version_0" / "checkpoints" / "last.ckpt", 20, 2_000)
    target = resume_target(tmp_path, "last")
    assert (target.checkpoint, target.version, target.skipped) == (newer, "version_0", ())
    newer.write_bytes(newer.read_bytes()[:-100])  # cut short, as a kill during a non-atomic copy leaves it
    os.utime(newer, (2_000, 2_000))
    with pytest.raises(UserError, match=r"--ckpt_path last: the newest checkpoint .*version_0/checkpoints/last.ckpt is "
                                        r"truncated or corrupt \(.*\); resume from the newest intact one with "
                                        r"--ckpt_path last-good, or delete the file"):
        resume_target(tmp_path, "last")
    fallback = resume_target(tmp_path, "last-good")
    assert (fallback.checkpoint, fallback.version) == (older, "version_1") and fallback.skipped[0][0] == newer
    with pytest.raises(UserError, match="truncated or corrupt"):
        check_checkpoint(newer)
    flipped = bytearray(older.read_bytes())  # one flipped byte inside the tensor data: a CRC mismatch
    flipped[len(flipped) // 2] ^= 0xFF
    older.write_bytes(bytes(flipped))
    with pytest.raises(UserError, match="truncated or corrupt"):
        check_checkpoint(older)
    assert resume_target(tmp_path / "nothing", "last") is None  # a first start: nothing to resume
    assert [claim_version(tmp_path) for _ in range(2)] == ["version_2", "version_3"]


@pytest.mark.slow
def test_a_damaged_checkpoint_stops_fit_before_any_work(corpus_file, tmp_path, capsys):
    out = tmp_path / "runs"
    cli.main(tiny_fit_args(corpus_file, out, "--trainer.max_steps", "3"))
    last = out / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:  # the same configuration: its newest checkpoint is the damaged one
        cli.main(tiny_fit_args(corpus_file, out, "--trainer.max_steps", "3", "--ckpt_path", "last"))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --ckpt_path last: the newest checkpoint {last} is truncated or corrupt")
    assert sorted(p.name for p in (out / "bert-demo").iterdir()) == ["version_0"]  # no new run folder
    with pytest.raises(SystemExit):
        cli.main(tiny_fit_args(corpus_file, out, "--trainer.max_steps", "6", "--ckpt_path", str(last)))
    assert "the checkpoint is truncated or corrupt" in capsys.readouterr().err


class _FailingSaves:
    """``torch.save`` that writes some bytes into its target, then fails (a full disk, a kill mid-write)."""

    def __init__(self, real):
        self.real = real

    def __call__(self, obj, target, *args, **kwargs):
        if hasattr(target, "write"):
            target.write(b"PK\x03\x04 half a checkpoint")
        else:
            Path(target).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")


@pytest.mark.slow
def test_a_save_that_fails_midway_leaves_the_previous_last_checkpoint_whole(corpus_file, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import Callback

    from core.checkpoints import check_checkpoint

    class BreakSavesAt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 11:
                monkeypatch.setattr(torch, "save", _FailingSaves(torch.save))

    out = tmp_path / "runs"
    overlay = tmp_path / "break.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks+": [{"class_path": f"{__name__}.BreakSaves"}]}}))
    globals()["BreakSaves"] = BreakSavesAt
    with pytest.raises(OSError, match="No space left"):
        cli.main(tiny_fit_args(corpus_file, out, "--config", str(overlay), "--trainer.max_steps", "14"))
    monkeypatch.undo()
    last = out / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt"
    check_checkpoint(last)
    assert torch.load(last, weights_only=True)["global_step"] == 10  # RunCheckpoint saves every 10 steps here


# --------------------------------------------------------------------------- non-finite numbers


def _with_probes(tmp_path: Path, *probes: dict) -> Path:
    overlay = tmp_path / "probes.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks+": list(probes)}}))
    return overlay


@pytest.mark.slow
@pytest.mark.parametrize("where", ["gradient", "loss"])
@pytest.mark.parametrize("decided", ["on the device", "on the host"])
def test_a_non_finite_step_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(where, decided,
                                                                                           corpus_file, tmp_path, capsys):
    """Both ways of dropping the step (callbacks/numerics.py): the default fused AdamW drops it on the device and
    the host reads the verdict at the next logging step (15: the checkpoint of step 20 is never written);
    an unfused AdamW is checked on the host at the step itself."""
    out = tmp_path / "runs"
    overlay = _with_probes(tmp_path, _probe("PoisonAt", step=13, where=where))
    host = ["--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr", "5e-3", "--model.optimizer.foreach",
            "true"] if decided == "on the host" else []
    with pytest.raises(SystemExit) as stopped:
        cli.main(tiny_fit_args(corpus_file, out, "--config", str(overlay), "--trainer.max_steps", "20", *host))
    assert stopped.value.code == 2
    last = out / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt"
    message = capsys.readouterr().err.strip().splitlines()[-1]
    value = "loss nan" if where == "loss" else "gradient norm inf"
    assert message.startswith("error: non-finite numbers at optimizer step 13: ") and value in message
    assert f"the last good checkpoint is {last}" in message and "action=skip" in message
    assert ("read at step 15" in message) == (decided == "on the device")
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 10 and all(torch.isfinite(t).all() for t in state["state_dict"].values())


@pytest.mark.slow
def test_skip_drops_the_step_counts_it_and_continues(corpus_file, tmp_path, capsys):
    from helpers import scalars

    out = tmp_path / "runs"
    overlay = _with_probes(tmp_path, _probe("PoisonAt", step=3, where="loss"), _probe("PoisonAt", step=7),
                           {"class_path": "callbacks.numerics.NonFiniteCheck", "init_args": {"action": "skip"}})
    cli.main(tiny_fit_args(corpus_file, out, "--config", str(overlay), "--trainer.max_steps", "12",
                             "--trainer.log_every_n_steps", "1"))
    assert "done: 12 steps" in capsys.readouterr().out
    state = torch.load(out / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
    skipped = dict(scalars(out / "bert-demo" / "version_0")["numerics/skipped_steps"])
    assert (skipped[1], skipped[2], skipped[5], skipped[6], skipped[11]) == (0, 1, 1, 2, 2)
    # AdamW took 10 steps, not 12: the skipped steps left its state alone
    steps = {int(s["step"]) for s in state["optimizer_states"][0]["state"].values()}
    assert steps == {10}
    counts = next(v for k, v in state["callbacks"].items() if k.startswith("NonFiniteCheck"))
    assert counts == {"skipped_steps": 2}


def _snapshot(module, optimizer) -> tuple:
    return [p.detach().clone() for p in module.parameters()], copy.deepcopy(optimizer.state_dict())


def _assert_identical(a, b, where: str = "") -> None:
    """Bit-identical: ``torch.equal`` (and the dtype) on every tensor, ``==`` on everything else."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class _PoisonAndSnapshot(L.Callback):
    """Makes optimizer step ``step`` (counted from 1) non-finite, ``where="gradient"``: one gradient set to
    infinity after the backward; ``where="loss"``: one weight set to NaN for the forward (restored before
    the optimizer step). Snapshots the parameters and the optimizer's state dict before and after the step."""

    def __init__(self, step: int, where: str = "gradient") -> None:
        self.step, self.where, self.before, self.after, self._saved = step, where, None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step and self.before is None:
            self.before = _snapshot(pl_module, trainer.optimizers[0])
            if self.where == "loss":
                with torch.no_grad():
                    self._saved = next(pl_module.parameters()).clone()
                    next(pl_module.parameters()).fill_(float("nan"))

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step + 1 == self.step and self.where == "gradient":
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._saved is not None:
            with torch.no_grad():
                next(pl_module.parameters()).copy_(self._saved)
            self._saved = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.after is None:
            self.after = _snapshot(pl_module, trainer.optimizers[0])


def _skip_optimizers() -> dict:
    from pytorch_optimizer import ScheduleFreeAdamW

    from lightning_modules.optimizers import AdamWScale, Lion, SophiaG

    return {
        "adamw-foreach": lambda groups: torch.optim.AdamW(groups, lr=1e-3, foreach=True),
        "adamw-fused": lambda groups: torch.optim.AdamW(groups, lr=1e-3, fused=True),
        "adamw-scale": lambda groups: AdamWScale(groups, lr=1e-2),
        "adamw-scale-foreach": lambda groups: AdamWScale(groups, lr=1e-2),  # the GPU path, forced below
        "schedule-free": lambda groups: ScheduleFreeAdamW(groups, lr=5e-3),
        "lion": lambda groups: Lion(groups, lr=1e-3),
        "sophia": lambda groups: SophiaG(groups, lr=2e-3, hessian_interval=2),  # step 2 would estimate
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw-foreach", "adamw-fused", "adamw-scale", "adamw-scale-foreach", "schedule-free",
                                  "lion", "sophia"])
def test_a_skipped_step_leaves_parameters_and_the_whole_optimizer_state_bit_identical(name, corpus_file, tmp_path,
                                                                                       monkeypatch):
    """Guards NonFiniteCheck(action="skip")'s promise, for every optimizer the project ships: a skipped step
    changes no parameter and no optimizer state (step counts, moments, schedule-free AdamW's weight sum and
    step, Sophia's Hessian estimate and bs). Dropping the gradients alone let schedule-free AdamW count the
    step and Sophia take that step's Hessian estimate; now the step is abandoned before the optimizer runs,
    on the host, or, for an optimizer that takes ``found_inf`` (fused AdamW, AdamWScale on both its paths),
    by the optimizer itself on the device, which charges the step's optimizer work (its kernel ran)."""
    from callbacks.numerics import NonFiniteCheck, skips_on_device
    from helpers import fit_tiny_bert
    from lightning_modules.optimizers import AdamWScale

    if name == "adamw-scale-foreach":
        monkeypatch.setattr(AdamWScale, "_fusable", staticmethod(lambda params: False))

    probe, check = _PoisonAndSnapshot(step=2), NonFiniteCheck(action="skip")
    trainer, model, _ = fit_tiny_bert(tmp_path, corpus_file, _skip_optimizers()[name], lr_schedule="constant",
                                      max_steps=3, callbacks=[probe, check])
    assert trainer.global_step == 3 and check.skipped_steps == 1
    assert probe.before is not None and probe.after is not None
    _assert_identical(probe.before[0], probe.after[0], "parameters")
    _assert_identical(probe.before[1], probe.after[1], "optimizer")
    assert probe.before[1]["state"]  # step 1 was taken: there was state to keep
    on_device = skips_on_device(trainer.optimizers[0])
    assert on_device == (name in ("adamw-fused", "adamw-scale", "adamw-scale-foreach"))
    charged = sum(n for kind, n in model.work_ledger.counts.items() if kind.startswith("optimizer_step/"))
    assert charged == (3.0 if on_device else 2.0)
    assert any(not torch.equal(a, p) for a, p in zip(probe.after[0], model.parameters(), strict=True))  # step 3 ran


@pytest.mark.slow
def test_a_skipped_fp16_step_leaves_the_loss_scaler_ready_for_the_next_step(corpus_file, tmp_path):
    """Guards skipping under fp16 loss scaling (Lightning unscales the gradients before the hooks, and calls
    the scaler's update() only after the optimizer step): the abandoned step must end the scaler's step, or
    the next one fails with "unscale_() has already been called". The scale and the optimizer state stay."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from callbacks.numerics import NonFiniteCheck
    from helpers import fit_tiny_bert

    probe, check = _PoisonAndSnapshot(step=2, where="loss"), NonFiniteCheck(action="skip")
    trainer, _, _ = fit_tiny_bert(tmp_path, corpus_file, lambda groups: torch.optim.AdamW(groups, lr=1e-3),
                                  lr_schedule="constant", max_steps=4, callbacks=[probe, check],
                                  plugins=[MixedPrecision("16-mixed", "cpu")])
    assert trainer.global_step == 4 and check.skipped_steps == 1
    _assert_identical(probe.before[0], probe.after[0], "parameters")
    _assert_identical(probe.before[1], probe.after[1], "optimizer")
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**16  # the initial scale, untouched


def test_skip_is_refused_for_a_module_that_cannot_abandon_a_step():
    """Guards the same promise for modules other than the pre-training ones: dropping gradients cannot keep
    every optimizer's state, so ``action=skip`` needs ``SkipsOptimizerSteps`` and says so at start-up."""
    from callbacks.numerics import NonFiniteCheck
    from core.errors import UserError

    with pytest.raises(UserError, match="cannot: use action=stop"):
        NonFiniteCheck(action="skip").setup(None, L.LightningModule(), "fit")
    NonFiniteCheck(action="stop").setup(None, L.LightningModule(), "fit")


# --------------------------------------------------------------------------- runs side by side


@pytest.mark.slow
def test_two_runs_started_together_build_the_cache_once_and_log_to_separate_versions(tmp_path):
    from helpers import make_corpus

    corpus = make_corpus(tmp_path / "fresh.txt", documents=300, seed=7)  # a corpus no other test has cached
    cache, out = tmp_path / "cache", tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "NTNG_CACHE_DIR": str(cache)}
    probe = _with_probes(tmp_path, _probe("RecordSteps", directory=str(tmp_path / "steps-{}")))
    runs = []
    for index in range(2):
        overlay = tmp_path / f"probe{index}.yaml"
        overlay.write_text(probe.read_text().replace("steps-{}", f"steps-{index}"))
        args = tiny_fit_args(corpus, out, "--config", str(overlay), "--trainer.max_steps", "2")
        runs.append(subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    assert [code for code, *_ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    errors = "".join(err for *_, err in results)
    assert errors.count("Training a tokenizer") == 1 and errors.count("Packed dataset cached at") == 1
    assert errors.count("Reusing packed dataset cache") >= 1
    first, second = (_steps(tmp_path / f"steps-{index}") for index in range(2))
    assert [r["ids"] for r in first.values()] == [r["ids"] for r in second.values()]
    assert [r["loss"] for r in first.values()] == pytest.approx([r["loss"] for r in second.values()], rel=1e-6)
    assert sorted(p.name for p in (out / "bert-demo").iterdir()) == ["version_0", "version_1"]
    logs = {line.split("TensorBoard logs: ")[1].split(" ")[0] for _, out_text, _ in results
            for line in out_text.splitlines() if line.startswith("done:")}
    assert len(logs) == 2


# --------------------------------------------------------------------------- ranks


@pytest.mark.slow
@pytest.mark.ddp
def test_two_processes_train_like_one_and_take_every_decision_together(corpus_file, tmp_path, capsys):
    """Layer stacking under an RST budget, 1 process x 2 micro-batches of 16 per step or 2 processes x 1
    micro-batch of 16: the same examples in each step (rank-batch j of rank r is global batch j * world + r),
    the same RST per step, so the same stacking moment, stop step, updates and validation loss; the two
    ranks agree on every step's layers and RST."""
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    two = _overlay(two_dir, STACKING, _probe("RecordParameters", directory=str(two_dir / "params")),
                   _probe("RecordSteps", directory=str(two_dir / "steps")), budget="20s")
    process = _start(_args(corpus_file, two_dir, two, "--trainer.accumulate_grad_batches", "1",
                           "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.devices", "2",
                           "--trainer.accelerator", "cpu"))
    one = _overlay(one_dir, STACKING, _probe("RecordParameters", directory=str(one_dir / "params")),
                   _probe("RecordSteps", directory=str(one_dir / "steps")), budget="20s")
    cli.main(_args(corpus_file, one_dir, one))  # the overlay accumulates 2 micro-batches
    single_line = _final_line(capsys.readouterr().out)
    result = _finish(process)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _final_line(result.stdout) == single_line  # steps, tokens, final val/loss: the same on 1 or 2 processes

    ranks = [_steps(two_dir / "steps", rank) for rank in (0, 1)]
    alone = _steps(one_dir / "steps")
    assert sorted(ranks[0]) == sorted(ranks[1]) == sorted(alone)  # the same steps, the same last one
    for field in ("layers", "rst"):
        assert [r[field] for r in ranks[0].values()] == [r[field] for r in ranks[1].values()] == \
            [r[field] for r in alone.values()], field
    depths = [len(r["layers"]) for r in alone.values()]
    assert depths[0] == 1 and depths[-1] == 2  # it stacked, at the same step everywhere
    for step, record in alone.items():  # the two ranks' examples are the single process's step
        assert sorted(record["ids"]) == sorted(ranks[0][step]["ids"] + ranks[1][step]["ids"]), step

    single = json.loads((one_dir / "params" / "rank0.json").read_text())
    replicas = [json.loads((two_dir / "params" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert replicas[0] == replicas[1]  # the replicas agree exactly
    for name, value in single["parameters"].items():
        if name.endswith("attention.self.key.bias"):
            continue  # zero gradient in exact arithmetic (softmax ignores a shift): Adam scales rounding noise
        assert replicas[0]["parameters"][name] == pytest.approx(value, rel=1e-4, abs=1e-4), name


@pytest.mark.slow
@pytest.mark.ddp
def test_a_rank_that_raises_ends_every_rank_with_its_error(corpus_file, tmp_path):
    overlay = tmp_path / "raise.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks+": [_probe("RaiseAt", step=3, rank=1)]}}))
    result = _run(tiny_fit_args(corpus_file, tmp_path / "runs", "--config", str(overlay), "--trainer.max_steps", "20",
                                "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"),
                  timeout=180)
    assert result.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in result.stderr
    assert "done:" not in result.stdout


# --------------------------------------------------------------------------- long budgets


@pytest.mark.parametrize("table_file, examples_per_step, optimizer, stacking", [
    ("bert-paper.json", 4096, "AdamW", True),  # BERT, 24 h, stacking 4 -> 8 -> 16 layers: about 17,600 steps
    ("t5-paper.json", 144, "AdamWScale", False),  # T5, 24 h: about 84,000 steps
])
@pytest.mark.slow
def test_a_paper_scale_budget_sums_without_drift_and_the_lr_ends_at_exactly_zero(table_file, examples_per_step,
                                                                                  optimizer, stacking):
    """A paper budget step by step through the ledger and the clock (no model), resumed twice from its saved
    state as after pre-emptions: the RST agrees with the exact sum of the step prices (fractions) far
    below one step's price, and every schedule's learning rate ends at exactly zero."""
    from fractions import Fraction

    from core.budget import BudgetAccount
    from core.ledger import WorkLedger
    from lightning_modules.schedules import LRSchedule

    table = CostTable.load(ROOT / "configs/rst" / table_file)
    budget = 24 * 3600.0

    def layers_at(tau: float) -> int:
        if not stacking:
            return table.max_layers
        return 4 if tau < 0.125 else 8 if tau < 0.3 else table.max_layers

    account, ledger = BudgetAccount(budget, "table", table), WorkLedger()
    exact, step, cheapest = Fraction(0), 0, math.inf
    micro = Fraction(examples_per_step, table.micro_batch_size)
    while not account.exhausted():
        layers = layers_at(account.progress())
        ledger.charge_fwd_bwd(layers=layers, examples=examples_per_step)
        ledger.charge_optimizer_step(optimizer)
        price = Fraction(table.fwd_bwd(layers)) * micro + Fraction(table.optimizer_step(optimizer))
        exact += price
        cheapest = min(cheapest, float(price))
        account.record(account.price(ledger) - account.offset)
        step += 1
        if step in (10_000, 15_000):  # pre-empted: a new account resumes from the saved state
            saved = account.state_dict()
            account = BudgetAccount(budget, "table", table)
            account.resume(saved, step=step, work_before=ledger)
            account.start()
            ledger = WorkLedger(ledger.state_dict())
    assert step > 15_000, step
    assert abs(account.spent - float(exact)) < cheapest * 1e-6  # far below one step's price
    assert account.progress() == 1.0 and account.remaining() == 0.0
    schedules = [LRSchedule(name) for name in ("triangle", "linear", "cosine", "wsd")]
    assert [schedule(account.progress()) for schedule in schedules] == [0.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- safe loading


def test_an_edited_cost_table_is_refused_and_a_resealed_one_is_used(tmp_path):
    from core.errors import UserError

    path = tmp_path / "table.json"
    CostTable.from_dict(TABLE).save(path)
    assert CostTable.load(path).fwd_bwd(2) == 1.0
    data = json.loads(path.read_text())
    data["fwd_bwd_seconds"] = [0.5, 0.1]  # a cheaper step, typed in by hand
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"was changed after it was written \(its sha256 seal does not match its "
                                        r"content\): measure it again with `train.py calibrate`, or"):
        CostTable.load(path)
    del data["sha256"]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="has no sha256 seal"):
        CostTable.load(path)
    result = subprocess.run([sys.executable, "-m", "core.cost_table", "seal", str(path)], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0 and CostTable.load(path).fwd_bwd(2) == 0.1
    for shipped in sorted((ROOT / "configs/rst").glob("*.json")):
        CostTable.load(shipped)  # every shipped table carries its seal


def test_an_edited_sidecar_or_a_replaced_loss_file_is_refused(irreducible_losses, tmp_path):
    import numpy as np

    from core.errors import UserError
    from core.irreducible_losses import load_irreducible_losses, sidecar_path

    sidecar = json.loads(sidecar_path(irreducible_losses).read_text())
    expected = sidecar["examples"]
    losses, copy = tmp_path / "il.npy", tmp_path / "il.json"
    losses.write_bytes(irreducible_losses.read_bytes())
    copy.write_text(json.dumps({**sidecar, "examples": {**expected, "holdout_fraction": 0.2}}))
    load_irreducible_losses(str(losses), expected)  # untouched: used
    copy.write_text(json.dumps({**sidecar, "mean_loss": 0.0}))
    with pytest.raises(UserError, match="sidecar .* was changed after it was written"):
        load_irreducible_losses(str(losses), expected)
    copy.write_text(json.dumps(sidecar))
    np.save(losses, np.zeros_like(np.load(losses)))  # other losses, same shape and dtype
    with pytest.raises(UserError, match="is not the file its sidecar describes"):
        load_irreducible_losses(str(losses), expected)


@pytest.mark.slow
def test_checkpoints_load_as_weights_only_and_one_that_needs_more_is_refused_with_the_way_out(corpus_file, tmp_path,
                                                                                               capsys):
    from fractions import Fraction

    out = tmp_path / "runs"
    cli.main(tiny_fit_args(corpus_file, out, "--trainer.max_steps", "2"))
    last = out / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)  # what this project writes needs no pickled code
    state["extra"] = Fraction(1, 3)  # an object only full unpickling can rebuild
    foreign = tmp_path / "foreign.ckpt"
    torch.save(state, foreign)
    with pytest.raises(SystemExit) as stopped:
        cli.main(tiny_fit_args(corpus_file, out, "--trainer.max_steps", "4", "--ckpt_path", str(foreign)))
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"error: --ckpt_path {foreign} holds objects that loading with weights_only=True refuses")
    assert "--weights_only false" in message
    cli.main(tiny_fit_args(corpus_file, out, "--trainer.max_steps", "4", "--ckpt_path", str(foreign),
                             "--weights_only", "false"))  # the user's call: the run resumes
    assert "done: 4 steps" in capsys.readouterr().out


@pytest.mark.slow
def test_ckpt_path_last_resumes_only_a_run_of_the_same_configuration(corpus_file, tmp_path, capsys):
    """Defect 7: `--ckpt_path last` took the newest checkpoint under save_dir/name, so two runs that differ by an
    override (a learning rate, a seed) and share a logger folder resumed each other's weights."""
    out = tmp_path / "runs"
    cli.main(tiny_fit_args(corpus_file, out, "--trainer.max_steps", "3"))
    capsys.readouterr()
    cli.main(tiny_fit_args(corpus_file, out, "--trainer.max_steps", "3", "--model.learning_rate", "1e-3",
                           "--ckpt_path", "last"))
    err = capsys.readouterr().err
    assert "no checkpoint of this configuration" in err and "1 checkpoint(s) there are of other configurations" in err
    other = read_summary(out / "bert-demo" / "version_1")  # a new run, from scratch, in its own version
    assert other.optimizer_steps == 3
    cli.main(tiny_fit_args(corpus_file, out, "--trainer.max_steps", "3", "--ckpt_path", "last"))
    err = capsys.readouterr().err
    assert f"resuming from {out / 'bert-demo' / 'version_0' / 'checkpoints'}" in err  # the run of this configuration
    assert sorted(p.name for p in (out / "bert-demo").iterdir()) == ["version_0", "version_1"]
