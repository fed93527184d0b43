"""Optimizers: Lion, Sophia-G (and its Hessian estimate), Muon, SOAP, schedule-free."""

import json
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import cli
from core.batch import IGNORE_INDEX, INPUT_IDS, LABELS
from core.contracts import EstimatesHessian
from core.cost_table import CostTable
from core.errors import UserError
from core.sealing import seal
from datamodules import MLMDataModule
from helpers import ROOT, fit_tiny_bert, tiny_bert_args, tiny_mlm_data_args
from lightning_modules.bert_mlm import BertMLM
from lightning_modules.optimizers import Lion, MuonWithAdamW, SophiaG, rms_scaled_lr
from lightning_modules.parameter_groups import muon_parameter_groups
from lightning_modules.t5_span_corruption import T5SpanCorruption

# --------------------------------------------------------------------------- updates by hand and against references


def _problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(5, 3, generator=generator), torch.randn(3, generator=generator)]
    grads = [[torch.randn(w.shape, generator=generator) for w in weights] for _ in range(4)]
    return weights, grads


def _run(optimizer_class, weights, grads, **kwargs):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = optimizer_class(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    return params, optimizer


def test_one_lion_step_is_the_update_worked_by_hand():
    w, g = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, -0.1, 0.0])
    params, _ = _run(Lion, [w], [[g]], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    # m = 0: update = sign(0.1 g); theta (1 - 0.1 * 0.5) - 0.1 sign
    assert params[0].detach().tolist() == pytest.approx([1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1, 0.5 * 0.95])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lion_takes_the_same_steps_as_lion_pytorch(weight_decay):
    from lion_pytorch import Lion as ReferenceLion

    weights, grads = _problem()
    ours, _ = _run(Lion, weights, grads, lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay)
    theirs, _ = _run(ReferenceLion, weights, grads, lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def test_lion_rms_scale_multiplies_the_step_by_the_tensor_rms():
    w, g = torch.full((4,), 3.0), torch.ones(4)
    params, _ = _run(Lion, [w], [[g]], lr=0.1, rms_scale=True)
    assert params[0].detach().tolist() == pytest.approx([3.0 - 0.1 * 3.0] * 4)  # RMS = 3
    assert rms_scaled_lr(0.1, torch.zeros(4)) == pytest.approx(0.1 * 1e-3)  # the floor


def test_one_sophia_step_is_the_update_worked_by_hand():
    w, g = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])
    params = [torch.nn.Parameter(w.clone())]
    optimizer = SophiaG(params, lr=0.1, betas=(0.5, 0.9), rho=0.5, weight_decay=0.2)
    params[0].grad = torch.tensor([2.0, 0.0])
    optimizer.update_hessian()  # h = 0.1 * [4, 0]
    params[0].grad = g.clone()
    optimizer.set_batch_positions(10.0)
    optimizer.step()
    # m = 0.5 g = [0.5, -0.5]; ratio = min(|m| / (0.5 * 10 * h + 1e-15), 1) = [0.5 / 2, 1]
    expected = [1.0 * (1 - 0.02) - 0.1 * 0.25, 1.0 * (1 - 0.02) + 0.1 * 1.0]
    assert params[0].detach().tolist() == pytest.approx(expected)
    assert float(optimizer.win_rate) == 0.5  # one of two coordinates not clipped
    assert isinstance(optimizer, EstimatesHessian)  # how the training module and plan find it


def test_sophia_with_hessian_updates_takes_the_same_steps_as_sophia_opt():
    from sophia_opt import SophiaG as ReferenceSophia

    weights, grads = _problem(1)
    results = []
    for optimizer_class in (SophiaG, ReferenceSophia):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = optimizer_class(params, lr=1e-2, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
        for step, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            if isinstance(optimizer, SophiaG):
                optimizer.set_batch_positions(64)
                optimizer.step()
            else:
                optimizer.step(bs=64)
            if step % 2 == 1:
                for p, g in zip(params, step_grads, strict=True):
                    p.grad = (g * 0.5).clone()
                optimizer.update_hessian()
        results.append(params)
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------- Sophia's Hessian estimate


def _bert_batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (4, 32), generator=generator)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, ::5] = ids[:, ::5]
    return {INPUT_IDS: ids, LABELS: labels}


def _expected_hessian(model, batch, generator_seed, beta2=0.99):
    """(1 - beta2) * grad^2 of CE(vocabulary logits at the labelled positions, labels sampled from their softmax)."""
    model.zero_grad(set_to_none=True)
    logits = model.target_logits(batch).float()
    generator = torch.Generator().manual_seed(generator_seed)
    sampled = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
    F.cross_entropy(logits, sampled).backward()
    expected = {name: (1 - beta2) * p.grad.float() ** 2 for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return expected


class _EstimateTrainer:
    """What ``estimate_hessian`` reads of a trainer: one process, no mixed precision."""

    world_size = 1
    precision_plugin = L.pytorch.plugins.precision.Precision()

    def __init__(self, gradient_clip_val: float | None = None) -> None:
        self.gradient_clip_val = gradient_clip_val


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_the_hessian_comes_from_vocabulary_logits_at_labelled_positions(family):
    torch.manual_seed(0)
    if family == "bert":
        model, batch = BertMLM(**tiny_bert_args()), _bert_batch()
        assert model.target_logits(batch).shape == (int((batch[LABELS] != IGNORE_INDEX).sum()), 200)
    else:
        model = T5SpanCorruption(vocab_size=300, num_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16)
        generator = torch.Generator().manual_seed(1)
        labels = torch.randint(3, 300, (3, 9), generator=generator)
        labels[:, -3:] = IGNORE_INDEX  # padded targets: never sampled
        batch = {INPUT_IDS: torch.randint(3, 300, (3, 16), generator=generator), LABELS: labels}
        assert model.target_logits(batch).shape == (18, 300)
    step, seed = 10, 0
    expected = _expected_hessian(model, batch, hash((seed, step)) & 0x7FFFFFFF)
    optimizer = SophiaG(model.parameters(), betas=(0.965, 0.99))
    model._trainer = _EstimateTrainer()
    model.estimate_hessian(optimizer, [batch], step)
    for name, p in model.named_parameters():
        if name in expected:
            assert torch.allclose(optimizer.state[p]["hessian"], expected[name], rtol=1e-5, atol=1e-12), name
    assert dict(model.work_ledger.counts) == {"hessian/2": float(batch[INPUT_IDS].shape[0])}


def test_the_hessian_estimate_is_the_unclipped_gradient_and_bs_its_label_count():
    """Guards Liu et al. 2023, Algorithms 2 and 3: ``h <- beta2 h + (1 - beta2) g_hat^2`` with ``g_hat`` the
    sampled-label gradient as it is, and ``bs`` = B, the labels that loss averaged over. The module used to
    clip ``g_hat`` at training's ``gradient_clip_val`` (h shrank by (c / ||g_hat||)^2, the effective rho
    grew by as much) and to leave ``bs`` to the training step. ``bs`` survives a state-dict round trip."""
    torch.manual_seed(0)
    model, batch = BertMLM(**tiny_bert_args()), _bert_batch()
    step, clip, beta2 = 10, 1e-4, 0.99
    expected = _expected_hessian(model, batch, hash((0, step)) & 0x7FFFFFFF, beta2)
    norm = (sum(float(h.sum()) for h in expected.values()) / (1 - beta2)) ** 0.5  # ||g_hat||
    assert norm > 100 * clip  # a clip at `clip` would shrink h by (clip / norm)^2 < 1e-4
    optimizer = SophiaG(model.parameters(), betas=(0.965, beta2))
    model._trainer = _EstimateTrainer(gradient_clip_val=clip)
    model.estimate_hessian(optimizer, [batch], step)
    for name, p in model.named_parameters():
        if name in expected:
            assert torch.allclose(optimizer.state[p]["hessian"], expected[name], rtol=1e-5, atol=1e-12), name
    labels = int((batch[LABELS] != IGNORE_INDEX).sum())
    assert optimizer.batch_positions == labels
    restored = SophiaG(model.parameters())
    restored.load_state_dict(optimizer.state_dict())
    assert restored.batch_positions == labels


@pytest.mark.slow
def test_sophias_bs_counts_the_labels_of_the_hessian_micro_batches_only(corpus_file, tmp_path, monkeypatch):
    """Guards ``bs`` = B of Liu et al. 2023's Algorithm 2 (the estimator is B g_hat^2, B the batch the
    estimate is taken on), not the labels of every micro-batch of the step: with ``hessian_micro_batches=1``
    of 2, the estimate uses the first micro-batch and ``bs`` is its label count (it was both counts: with
    the paper's BERT, 6 of 12 micro-batches, rho acted twice as large)."""
    labels: list[tuple[int, int]] = []
    training_step = BertMLM.training_step

    def counting(self, batch, batch_idx):
        labels.append((self.trainer.global_step + 1, int((batch[LABELS] != IGNORE_INDEX).sum())))
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(BertMLM, "training_step", counting)
    sophia = lambda groups: SophiaG(groups, lr=2e-3, hessian_interval=3, hessian_micro_batches=1)  # noqa: E731
    trainer, model, _ = fit_tiny_bert(tmp_path, corpus_file, sophia, max_steps=3, accumulate=2)
    first, second = (n for step, n in labels if step == 3)
    assert float(trainer.optimizers[0].batch_positions) == first and second > 0
    assert dict(model.work_ledger.counts)["hessian/2"] == 16.0  # one micro-batch of 16 sequences


# --------------------------------------------------------------------------- Muon


def test_muon_gets_only_the_hidden_matrices():
    for model in (BertMLM(**tiny_bert_args()),
                  T5SpanCorruption(vocab_size=300, num_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16)):
        groups = muon_parameter_groups(model, 0.01)
        muon = groups[0]["params"]
        names = {id(p): n for n, p in model.named_parameters()}
        assert groups[0]["muon"] and all(p.ndim == 2 for p in muon)
        muon_names = [names[id(p)] for p in muon]
        assert all("embed" not in n and "shared" not in n and "lm_head" not in n and "relative_attention" not in n
                   for n in muon_names), muon_names
        assert all(".layer." in n or ".block." in n for n in muon_names)
        others = [p for g in groups[1:] for p in g["params"]]
        assert len(muon) + len(others) == len(list(model.parameters()))
        optimizer = MuonWithAdamW(groups)
        assert isinstance(optimizer.muon, torch.optim.Muon) and len(optimizer.param_groups) == 3


def test_muon_on_a_torch_without_torch_optim_muon_asks_for_torch_2_9(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    matrix = torch.nn.Parameter(torch.randn(4, 4))
    expected = (f"MuonWithAdamW needs torch.optim.Muon, which torch {torch.__version__} lacks: it came with torch 2.9; "
                "upgrade (pip install 'torch>=2.9') or choose another optimizer")
    with pytest.raises(UserError, match=re.escape(expected)):
        MuonWithAdamW([{"params": [matrix], "muon": True}])


def test_stacking_copies_every_optimizers_per_parameter_state():
    from callbacks.stacking import copy_optimizer_state

    for make in (lambda ps: SophiaG(ps), lambda ps: MuonWithAdamW([{"params": ps, "muon": True}])):
        source, target = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
        optimizer = make([source, target])
        source.grad, target.grad = torch.randn(4, 4), torch.randn(4, 4)
        if isinstance(optimizer, SophiaG):
            optimizer.update_hessian()
        optimizer.step()
        assert copy_optimizer_state(optimizer, [(source, target)]) == 1
        for key, value in optimizer.state[source].items():
            copied = optimizer.state[target][key]
            assert torch.equal(copied, value) and (not torch.is_tensor(value) or copied is not value), key
        if isinstance(optimizer, MuonWithAdamW):
            assert optimizer.muon.state[target]["momentum_buffer"] is optimizer.state[target]["momentum_buffer"]


def test_calibrate_times_more_optimizers_and_updates_a_table(tmp_path, capsys):
    output = tmp_path / "tiny.json"
    model_args = ["--config", str(ROOT / "configs/bert/demo.yaml"), "--data.vocab_size", "200", "--data.seq_len", "32",
                  "--data.batch_size", "8", "--model.num_layers", "2", "--model.hidden_size", "32",
                  "--model.num_heads", "2", "--model.intermediate_size", "64"]
    quick = ["--warmup", "0", "--iterations", "2", "--rounds", "1"]
    cli.main(["calibrate", "--output", str(output), *quick, *model_args,
                "--optimizers", "lightning_modules.optimizers.Lion"])
    assert set(CostTable.load(output).optimizer_step_seconds) == {"AdamW", "Lion"}
    before = CostTable.load(output)
    cli.main(["calibrate", "--output", str(output), "--update", *quick, *model_args,
                "--optimizers", "lightning_modules.optimizers.SophiaG,lightning_modules.optimizers.MuonWithAdamW"])
    after = CostTable.load(output)
    assert set(after.optimizer_step_seconds) == {"AdamW", "Lion", "SophiaG", "MuonWithAdamW"}
    assert after.fwd_bwd_seconds == before.fwd_bwd_seconds and all(s > 0 for s in after.optimizer_step_seconds.values())
    assert "updated" in capsys.readouterr().out


# --------------------------------------------------------------------------- in a run


OPTIMIZERS = {
    "lion": ("lightning_modules.optimizers.Lion", {"lr": 1e-3, "weight_decay": 0.1}),
    "sophia": ("lightning_modules.optimizers.SophiaG", {"lr": 2e-3, "rho": 0.01, "weight_decay": 0.015,
                                                        "hessian_interval": 3}),
    "muon": ("lightning_modules.optimizers.MuonWithAdamW", {"lr": 0.02, "adamw_lr": 5e-3}),
    "soap": ("pytorch_optimizer.SOAP", {"lr": 5e-3, "precondition_frequency": 5}),
    "schedule-free": ("pytorch_optimizer.ScheduleFreeAdamW", {"lr": 5e-3, "weight_decay": 0.01}),
}


def _optimizer(name):
    import importlib

    path, kwargs = OPTIMIZERS[name]
    module, cls = path.rsplit(".", 1)
    optimizer_class = getattr(importlib.import_module(module), cls)
    return lambda params: optimizer_class(params, **kwargs)


def _fit(tmp_path, corpus, name, **kwargs):
    if name == "schedule-free":  # no decay schedule: constant after a warm-up
        kwargs.update(lr_schedule="constant", warmup_fraction=0.1)
    return fit_tiny_bert(tmp_path, corpus, _optimizer(name), **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_tiny_fit_lowers_the_loss_and_a_resume_continues_identically(name, corpus_file, tmp_path):
    _, model, full = _fit(tmp_path / "full", corpus_file, name, every=8)
    losses = [loss for _, loss in full.losses]
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.2, losses
    _, _, resumed = _fit(tmp_path / "resumed", corpus_file, name, ckpt_path=tmp_path / "full" / "ckpt" / "step=8.ckpt")
    after = [loss for step, loss in full.losses if step > 8]
    assert [loss for _, loss in resumed.losses] == pytest.approx(after, rel=1e-5)


def test_sophia_estimates_every_k_steps_and_charges_it(corpus_file, tmp_path):
    trainer, model, _ = _fit(tmp_path, corpus_file, "sophia", max_steps=9, accumulate=2)
    # Hessian estimates after steps 3, 6, 9, each over the step's 2 micro-batches of 16
    assert dict(model.work_ledger.counts) == {"fwd_bwd/2": 9 * 32.0, "hessian/2": 3 * 32.0,
                                              "optimizer_step/SophiaG": 9.0}
    optimizer = trainer.optimizers[0]
    assert 0.0 <= float(optimizer.win_rate) <= 1.0
    assert any(float(s["hessian"].abs().sum()) > 0 for s in optimizer.state.values())


def test_plan_predicts_a_sophia_run_with_its_hessian_passes(corpus_file, tmp_path, capsys):
    import yaml

    from helpers import tiny_fit_args

    table = tmp_path / "table.json"
    table.write_text(json.dumps(seal({"format": "rst-table/1", "seq_len": 32, "micro_batch_size": 16,
                                      "fwd_bwd_seconds": [0.5, 1.0], "fwd_seconds": None,
                                      "optimizer_step_seconds": {"SophiaG": 0.25}})))
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "model": {"init_args": {"optimizer": {"class_path": "lightning_modules.optimizers.SophiaG",
                                              "init_args": {"lr": 2e-3, "hessian_interval": 3}}}},
        "trainer": {"max_steps": -1, "callbacks": [{"class_path": "callbacks.rst.RSTBudget",
                                                    "init_args": {"budget": "14s", "table": str(table)}}]},
    }))
    args = tiny_fit_args(corpus_file, tmp_path, "--config", str(overlay))
    cli.main(["plan", *args[1:]])
    plan = json.loads(capsys.readouterr().out)
    # per step 1.0 + 0.25, and a Hessian micro-batch (1.0) after steps 3, 6, 9: 14 s are crossed at step 9
    assert plan["optimizer_steps"] == 9 and plan["hessian_rst_seconds"] == 3.0
    cli.main(args)
    assert "done: 9 steps" in capsys.readouterr().out


def test_schedule_free_switches_to_eval_weights_for_validation_and_checkpoints(corpus_file, tmp_path):
    class Modes(L.Callback):
        def __init__(self):
            self.modes = []

        def on_validation_start(self, trainer, pl_module):
            self.modes.append(("validation", trainer.optimizers[0].param_groups[0]["train_mode"]))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.modes.append(("train", trainer.optimizers[0].param_groups[0]["train_mode"]))

    L.seed_everything(0)
    model = BertMLM(**tiny_bert_args(), optimizer=_optimizer("schedule-free"), lr_schedule="constant")
    modes = Modes()
    trainer = L.Trainer(max_steps=8, callbacks=[modes], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=4, check_val_every_n_epoch=None,
                        limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(model, MLMDataModule(**tiny_mlm_data_args(corpus_file)))
    assert {mode for kind, mode in modes.modes if kind == "validation"} == {False}
    assert {mode for kind, mode in modes.modes if kind == "train"} == {True}
    path = tmp_path / "sf.ckpt"
    optimizer = trainer.optimizers[0]
    optimizer.train()
    training_weights = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    optimizer.eval()
    eval_weights = model.state_dict()
    name = "model.roberta_prelayernorm.encoder.layer.0.attention.self.query.weight"
    # (switching modes is a lerp each way: equal up to rounding)
    assert torch.allclose(saved["state_dict"][name], eval_weights[name], atol=1e-7)
    assert (saved["state_dict"][name] - training_weights[name]).abs().max() > 1e-4
    assert saved["optimizer_states"][0]["param_groups"][0]["train_mode"] is False


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize(("overlay", "steps"), [("lion", 82838), ("sophia", 74741)])
def test_plan_on_the_paper_t5_table_gives_the_papers_counts(overlay, steps, capsys):
    cli.main(["plan", "--config", str(ROOT / "configs/t5/baseline.yaml"),
                "--config", str(ROOT / f"configs/t5/{overlay}.yaml")])
    plan = json.loads(capsys.readouterr().out)
    assert plan["optimizer_steps"] == steps  # the paper: about 82,838 and 74,740 (86400 s / 1.043 s, / 1.156 s)


def test_plan_charges_sophias_hessian_passes_on_the_bert_table(capsys):
    cli.main(["plan", "--config", str(ROOT / "configs/bert/baseline.yaml"),
                "--config", str(ROOT / "configs/bert/sophia.yaml")])
    plan = json.loads(capsys.readouterr().out)
    table = CostTable.load(ROOT / "configs/rst/bert-paper.json")
    per_ten_steps = 10 * 12 * table.fwd_bwd(16) + 6 * table.fwd_bwd(16)  # 6 Hessian micro-batches every 10 steps
    assert plan["optimizer_steps"] == pytest.approx(86400 / per_ten_steps * 10, abs=10)
    assert plan["hessian_rst_seconds"] == pytest.approx(plan["optimizer_steps"] // 10 * 6 * table.fwd_bwd(16), rel=1e-3)


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ddp_processes_keep_identical_replicas_with_sophia(corpus_file, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    from helpers import tiny_fit_args

    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "model": {"init_args": {"optimizer": {"class_path": "lightning_modules.optimizers.SophiaG", "init_args": {
            "lr": 2e-3, "rho": 0.01, "weight_decay": 0.015, "hessian_interval": 2}}}},
        "trainer": {"callbacks+": [{"class_path": "ddp_probe.RecordParameters",
                                    "init_args": {"directory": str(tmp_path / "records")}}]},
    }))
    args = tiny_fit_args(corpus_file, tmp_path, "--config", str(overlay), "--trainer.max_steps", "6",
                         "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / "records" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0]["global_step"] == records[1]["global_step"] == 6
    assert records[0]["parameters"] == records[1]["parameters"]  # the Hessian estimate is the same on both ranks
    ckpt = torch.load(tmp_path / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["work_ledger"]["hessian/2"] == 3 * 2 * 16  # after steps 2, 4, 6: one micro-batch of 16 per rank
