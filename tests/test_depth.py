"""Layer stacking and layer dropping: the maths, the callbacks, resume, plan, DDP."""

import json
import math
import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml

import cli
from callbacks.layer_dropping import (
    LayerDropping,
    drop_probabilities,
    expected_active_layers,
    keep_level,
    sample_active_layers,
)
from callbacks.stacking import LayerStacking, copy_layer, depth_at
from core.cost_table import CostTable
from core.errors import UserError
from core.sealing import seal
from datamodules import MLMDataModule
from helpers import ROOT, files_corpus, tiny_bert_args, tiny_fit_args, tiny_mlm_data_args
from lightning_modules.bert_mlm import BertMLM
from lightning_modules.t5_span_corruption import T5SpanCorruption

# --------------------------------------------------------------------------- the maths


def test_stacking_doubles_the_depth_exactly_at_its_fractions():
    assert [depth_at(t, 4, [0.125, 0.3]) for t in (0.0, 0.1249, 0.125, 0.2999, 0.3, 1.0)] == [4, 4, 8, 8, 16, 16]


def test_keep_level_and_drop_probabilities():
    assert keep_level(0.0, 100, 0.5) == 1.0
    assert keep_level(1.0, 100, 0.5) == pytest.approx(0.5)
    # paper appendix C.2: drop probability 0.316 after 1 % of the budget, i.e. (1 - theta_bar)(1 - e^-1)
    assert 1 - keep_level(0.01, 100, 0.5) == pytest.approx(0.5 * (1 - math.exp(-1)), rel=1e-12)
    assert round(1 - keep_level(0.01, 100, 0.5), 3) == 0.316
    assert keep_level(0.5, 20, 0.5) == pytest.approx(0.5 + 0.5 * math.exp(-10), rel=1e-12)
    assert drop_probabilities(0.5, 4) == [0.125, 0.25, 0.375, 0.5]  # deeper layers are dropped more
    assert expected_active_layers(0.5, 16) == 11.75 == (3 * 16 - 1) / 4
    assert expected_active_layers(0.5, 10) == 7.25
    assert expected_active_layers(1.0, 12) == 12


@pytest.mark.parametrize("num_layers", [10, 16])
def test_sampled_active_layers_average_3l_minus_1_over_4_at_saturation(num_layers):
    generator = torch.Generator().manual_seed(0)
    draws = [len(sample_active_layers(0.5, num_layers, generator)) for _ in range(20000)]
    assert sum(draws) / len(draws) == pytest.approx((3 * num_layers - 1) / 4, abs=0.03)


def test_a_draw_is_never_empty_and_keeps_required_layers():
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        active = sample_active_layers(0.0, 2, generator, required=(0,))  # theta 0: p = 0.5, 1.0
        assert active == [0]
    never_empty = [sample_active_layers(-1.0, 2, generator) for _ in range(100)]  # p >= 1: all dropped
    assert all(a == [0] for a in never_empty)


def test_t5_blocks_are_copied_by_name_without_the_position_bias():
    torch.manual_seed(0)
    model = T5SpanCorruption(vocab_size=300, num_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16)
    for stack in model.layer_stacks():
        pairs = copy_layer(stack[0], stack[1])
        assert len(pairs) == len(list(stack[1].parameters()))
        source = dict(stack[0].named_parameters())
        for name, parameter in stack[1].named_parameters():
            assert torch.equal(parameter, source[name])
        assert "layer.0.SelfAttention.relative_attention_bias.weight" in source
        assert not hasattr(stack[1].layer[0].SelfAttention, "relative_attention_bias") or \
            stack[1].layer[0].SelfAttention.relative_attention_bias is None


# --------------------------------------------------------------------------- callbacks in a run


class Probe(L.Callback):
    """Records, per training micro-batch, the step, active layers and loss; checks copies right after growth."""

    def __init__(self, check_copies: bool):
        self.records, self.copies_checked, self.validation = [], 0, []
        self.check_copies = check_copies
        self._depth = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        active = pl_module.active_layers
        if self.check_copies and self._depth is not None and len(active) > self._depth:  # stacking just grew
            n = self._depth
            for stack in pl_module.layer_stacks():  # BERT: the encoder; T5: the encoder and the decoder
                for i in range(n):
                    source = dict(stack[i].named_parameters())
                    for name, copied in stack[n + i].named_parameters():  # by name: T5 block 0 has extra bias
                        assert torch.equal(copied, source[name]), name
            self.copies_checked += 1
        self._depth = len(active)
        self.records.append((trainer.global_step, batch_idx, active))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records[-1] = (*self.records[-1], float(outputs["loss"]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.validation.append(pl_module.active_layers)


def _fit(tmp_path, corpus, callbacks, *, max_steps=40, accumulate=1, ckpt_path=None, precision="32-true",
         num_layers=4, every=0):
    L.seed_everything(0)
    model = BertMLM(**tiny_bert_args(num_layers=num_layers), learning_rate=5e-3)
    data = MLMDataModule(**tiny_mlm_data_args(corpus))
    probe = Probe(check_copies=any(isinstance(c, LayerStacking) for c in callbacks))
    extra = []
    if every:
        extra.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every,
                                                         save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, callbacks=[*callbacks, probe, *extra],
                        logger=False, enable_checkpointing=bool(every), enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=10, check_val_every_n_epoch=None,
                        limit_val_batches=1, precision=precision, default_root_dir=tmp_path)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, probe


def test_stacking_fires_at_the_right_fractions_and_copies_layers(corpus_file, tmp_path):
    trainer, model, probe = _fit(tmp_path, corpus_file, [LayerStacking(initial_layers=1, fractions=[0.25, 0.5])])
    depth = {step: len(active) for step, _, active, _ in probe.records}
    assert [depth[s] for s in (0, 9, 10, 19, 20, 39)] == [1, 1, 2, 2, 4, 4]  # tau = step / 40
    assert probe.copies_checked == 2
    # charged at the layers actually run: 10 steps x 16 examples at 1 layer, 10 at 2, 20 at 4
    assert dict(model.work_ledger.counts) == {"fwd_bwd/1": 160.0, "fwd_bwd/2": 160.0, "fwd_bwd/4": 320.0,
                                              "optimizer_step/AdamW": 40.0}
    # validation (sanity check, then after steps 10, 20, 30, 40) runs the depth reached so far
    assert [len(v) for v in probe.validation] == [1, 1, 2, 4, 4]


def test_new_layers_start_with_fresh_or_copied_optimizer_state(corpus_file, tmp_path):
    for copy_state in (False, True):
        stacking = LayerStacking(initial_layers=2, fractions=[0.5], copy_optimizer_state=copy_state)
        trainer, model, _ = _fit(tmp_path / str(copy_state), corpus_file, [stacking], max_steps=11, num_layers=4)
        optimizer = trainer.optimizers[0]
        stack = model.layer_stacks()[0]
        source, target = next(stack[0].parameters()), next(stack[2].parameters())
        # 6 steps at depth 2 (tau < 0.5), growth, then 5 steps of training for all 4 layers
        assert int(optimizer.state[source]["step"]) == 11
        assert int(optimizer.state[target]["step"]) == (11 if copy_state else 5)


@pytest.mark.slow
def test_dropping_is_fixed_within_a_step_shared_across_micro_batches_and_off_in_validation(corpus_file, tmp_path):
    dropping = LayerDropping(gamma_f=100.0, theta_bar=0.5, seed=3)
    trainer, model, probe = _fit(tmp_path, corpus_file, [dropping], max_steps=30, accumulate=2, num_layers=8)
    by_step = {}
    for step, _, active, _ in probe.records:
        by_step.setdefault(step, set()).add(active)
    assert all(len(sets) == 1 for sets in by_step.values())  # one draw per optimizer step
    assert len({next(iter(s)) for s in by_step.values()}) > 3  # and the draws differ between steps
    assert all(v == tuple(range(8)) for v in probe.validation)
    assert model.active_layers == tuple(range(8))  # all layers after training
    # each draw is the documented one for (seed, step)
    for step, sets in by_step.items():
        tau = step / 30
        assert list(next(iter(sets))) == dropping.draw(tau, step, 8)


@pytest.mark.slow
def test_resume_in_the_middle_stage_gives_the_same_next_losses(corpus_file, tmp_path):
    stacking = dict(initial_layers=1, fractions=[0.25, 0.5])
    _, _, full = _fit(tmp_path / "full", corpus_file, [LayerStacking(**stacking)], every=15)
    checkpoint = tmp_path / "full" / "ckpt" / "step=15.ckpt"
    _, model, resumed = _fit(tmp_path / "resumed", corpus_file, [LayerStacking(**stacking)], ckpt_path=checkpoint)
    after = [r for r in full.records if r[0] >= 15]
    assert [(s, a) for s, _, a, _ in resumed.records] == [(s, a) for s, _, a, _ in after]
    assert [loss for *_, loss in resumed.records] == pytest.approx([loss for *_, loss in after], rel=1e-5)
    assert model.num_active_layers == 4


def test_stacking_and_dropping_cannot_be_combined(corpus_file, tmp_path):
    with pytest.raises(UserError, match="LayerStacking cannot be combined with LayerDropping"):
        _fit(tmp_path, corpus_file, [LayerStacking(initial_layers=1, fractions=[0.25, 0.5]), LayerDropping()])


def test_stacking_must_reach_the_model_depth(corpus_file, tmp_path):
    with pytest.raises(UserError, match="grows 2 layers to 8 in 2 doublings, but the model has 4: set initial_layers to 1"):
        _fit(tmp_path, corpus_file, [LayerStacking(initial_layers=2, fractions=[0.25, 0.5])])
    with pytest.raises(UserError, match="increasing values"):
        LayerStacking(initial_layers=1, fractions=[0.5, 0.25])


@pytest.mark.slow
def test_bf16_mixed_precision_with_both_methods(corpus_file, tmp_path):
    for method in (LayerStacking(initial_layers=1, fractions=[0.25, 0.5]), LayerDropping(gamma_f=100.0)):
        _, model, probe = _fit(tmp_path / type(method).__name__, corpus_file, [method], max_steps=20,
                               precision="bf16-mixed")
        losses = [loss for *_, loss in probe.records]
        assert all(loss == loss and loss < 20 for loss in losses)  # finite
        assert sum(losses[-3:]) < sum(losses[:3])


def _budget_overlay(tmp_path, method: dict) -> str:
    table = {"format": "rst-table/1", "seq_len": 32, "micro_batch_size": 16,
             "fwd_bwd_seconds": [0.5, 0.75, 1.0, 1.25], "optimizer_step_seconds": {"AdamW": 0.1}}
    (tmp_path / "table.json").write_text(json.dumps(seal(table)))
    overlay = {"trainer": {"max_steps": -1, "callbacks": [
        {"class_path": "callbacks.rst.RSTBudget", "init_args": {"budget": "30s", "table": str(tmp_path / "table.json")}},
        method,
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
    ]}}
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    return str(tmp_path / "overlay.yaml")


@pytest.mark.parametrize("method", [
    {"class_path": "callbacks.stacking.LayerStacking", "init_args": {"initial_layers": 1, "fractions": [0.125, 0.3]}},
    {"class_path": "callbacks.layer_dropping.LayerDropping", "init_args": {"gamma_f": 20.0, "seed": 5}},
])
@pytest.mark.slow
def test_plan_predicts_the_steps_the_run_takes(method, corpus_file, tmp_path, capsys, caplog):
    args = tiny_fit_args(corpus_file, tmp_path, "--config", _budget_overlay(tmp_path, method),
                         "--model.num_layers", "4")
    cli.main(["plan", *args[1:]])
    plan = json.loads(capsys.readouterr().out)
    cli.main(args)
    assert f"spent at optimizer step {plan['optimizer_steps']} (RST {plan['rst_seconds']:.3f} s" in caplog.text
    checkpoint = torch.load(tmp_path / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    charged = checkpoint["work_ledger"]
    # a stacking depth is part of the model; a dropping draw is not: the checkpoint then loads all layers
    assert checkpoint["active_layers"] == ([0, 1, 2, 3] if "LayerStacking" in method["class_path"] else None)
    for phase in plan["phases"] if "LayerStacking" in method["class_path"] else []:
        assert charged[f"fwd_bwd/{phase['active_layers']}"] == phase["micro_batches"] * 16
    from helpers import scalars

    curves = scalars(tmp_path / "bert-demo" / "version_0")
    depth = [v for _, v in curves["arch/active_layers"]]
    if "LayerStacking" in method["class_path"]:
        assert depth[0] == 1 and depth[-1] == 4 and sorted(set(depth)) == [1, 2, 4]
    else:
        assert 0 < curves["arch/drop_prob"][-1][1] <= 0.5 and min(depth) < 4
    table = CostTable.load(tmp_path / "table.json")
    from core.ledger import WorkLedger

    ledger = WorkLedger()
    ledger.load_state_dict(charged)
    assert table.seconds(ledger) == pytest.approx(plan["rst_seconds"])


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ddp_processes_drop_the_same_layers(corpus_file, tmp_path):
    probe = {"class_path": "ddp_probe.RecordActiveLayers", "init_args": {"directory": str(tmp_path / "records")}}
    overlay = {"trainer": {"callbacks+": [
        {"class_path": "callbacks.layer_dropping.LayerDropping", "init_args": {"gamma_f": 100.0}}, probe]}}
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    args = tiny_fit_args(corpus_file, tmp_path, "--config", str(tmp_path / "overlay.yaml"), "--model.num_layers", "6",
                         "--trainer.max_steps", "12", "--trainer.strategy", "ddp_find_unused_parameters_true",
                         "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / "records" / f"rank{r}.json").read_text()) for r in (0, 1))
    train0 = [(s, a) for s, a, _ in rank0 if s != "validation"]
    assert train0 == [(s, a) for s, a, _ in rank1 if s != "validation"] and len(train0) == 12
    assert len({tuple(a) for _, a in train0}) > 2  # layers were really dropped, identically on both ranks
    ids0 = {i for s, _, ids in rank0 if s != "validation" for i in ids}
    ids1 = {i for s, _, ids in rank1 if s != "validation" for i in ids}
    assert not ids0 & ids1  # and each rank trained on its own share of the data


def test_ddp_without_unused_parameter_search_is_refused(corpus_file, tmp_path):
    from callbacks.architecture import check_depth_schedule

    class FakeStrategy:
        _ddp_kwargs = {}

    class FakeTrainer:
        strategy, world_size, callbacks = FakeStrategy(), 2, []

    dropping = LayerDropping()
    FakeTrainer.callbacks = [dropping]
    with pytest.raises(UserError, match="ddp_find_unused_parameters_true"):
        check_depth_schedule(dropping, FakeTrainer(), BertMLM(**tiny_bert_args()))



@pytest.mark.slow
@pytest.mark.parametrize("method", ["stacking", "dropping"])
def test_both_methods_train_t5_encoder_and_decoder_alike(method, corpus_file, tmp_path):
    from datamodules import SpanCorruptionDataModule

    L.seed_everything(0)
    model = T5SpanCorruption(vocab_size=300, num_layers=4, d_model=32, d_ff=64, num_heads=2, d_kv=16,
                             learning_rate=1e-2)
    data = SpanCorruptionDataModule(corpus=files_corpus(corpus_file), vocab_size=300, seq_len=32,
                                    batch_size=8, validation_fraction=0.05)
    callback = LayerStacking(initial_layers=1, fractions=[0.25, 0.5]) if method == "stacking" else LayerDropping()
    probe = Probe(check_copies=method == "stacking")
    trainer = L.Trainer(max_steps=20, callbacks=[callback, probe], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, data)
    actives = [a for _, _, a, _ in probe.records]
    assert all(a[0] == 0 for a in actives)  # block 0 (the position bias) always runs
    if method == "stacking":
        assert [len(a) for a in actives[::5]] == [1, 2, 4, 4] and probe.copies_checked == 2
    else:
        assert len({a for a in actives}) > 2
    losses = [loss for *_, loss in probe.records]
    assert sum(losses[-3:]) < sum(losses[:3])


@pytest.mark.parametrize("model, method, steps, phases", [
    ("bert", "stacking", 46824, [(4, 13830), (8, 10624), (16, 22370)]),  # paper's arithmetic: 13,829 / 10,624 / 22,370
    ("t5", "stacking", 123880, [(3, 37114), (6, 28104), (12, 58662)]),  # paper's arithmetic: 37.1k / 28.1k / 58.7k
])
def test_paper_scale_stacking_plans_give_the_pinned_steps_per_phase(model, method, steps, phases, capsys):
    cli.main(["plan", "--config", str(ROOT / f"configs/{model}/baseline.yaml"),
                "--config", str(ROOT / f"configs/{model}/{method}.yaml")])
    plan = json.loads(capsys.readouterr().out)
    assert plan["optimizer_steps"] == steps
    assert [(p["active_layers"], p["optimizer_steps"]) for p in plan["phases"]] == phases


@pytest.mark.slow
def test_paper_scale_dropping_plan_runs_about_a_third_more_steps(capsys):
    cli.main(["plan", "--config", str(ROOT / "configs/bert/baseline.yaml"),
                "--config", str(ROOT / "configs/bert/dropping.yaml"), "--budget", "6h"])
    plan = json.loads(capsys.readouterr().out)
    # recount by hand: each step draws its layers (seed 0, the config's), pays 12 micro-batches at that depth
    table = CostTable.load(ROOT / "configs/rst/bert-paper.json")
    dropping = LayerDropping(gamma_f=100.0, theta_bar=0.5)
    budget, spent, steps, layers = 6 * 3600.0, 0.0, 0, 0
    while spent < budget:
        active = len(dropping.draw(spent / budget, steps, 16))
        spent += 12 * table.fwd_bwd(active)
        steps, layers = steps + 1, layers + active
    assert plan["optimizer_steps"] == steps
    assert plan["rst_seconds"] == pytest.approx(spent, rel=1e-9)
    assert plan["phases"][0]["active_layers"] == round(layers / steps, 3)
    # baseline 7,990 steps at 16 layers; dropping averages about 11.8 layers: about 1.33x the steps (paper section 4.2)
    assert 1.30 < plan["optimizer_steps"] / 7990 < 1.36


def test_optional_residual_rescaling_divides_the_branch_by_the_keep_probability():
    torch.manual_seed(0)
    model = BertMLM(**tiny_bert_args(num_layers=4))
    dropping = LayerDropping(gamma_f=100.0, theta_bar=0.5, rescale_residual=True)

    class Fake:
        callbacks, world_size, strategy = [dropping], 1, None

    dropping.setup(Fake(), model, "fit")  # registers the hooks
    dropping._theta = 0.5  # saturated: layer i of 4 is kept with probability 1 - 0.5 i / 4; the last 0.5
    dropping._set_keep_probabilities(model)
    layer, hidden = model.layer_stacks()[0][3], torch.randn(2, 8, 32)
    model.train()
    rescaled = layer(hidden)
    model.eval()
    plain = layer(hidden)  # no rescaling in evaluation (and dropout is 0, so the layer is the same)
    torch.testing.assert_close(rescaled, hidden + (plain - hidden) / 0.5)
    dropping.teardown(Fake(), model, "fit")
    model.train()
    torch.testing.assert_close(layer(hidden), plain)  # hooks removed
