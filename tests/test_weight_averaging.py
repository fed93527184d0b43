"""Weight averaging (EMA, LAWA) and the evaluation-weights seam: validation, every checkpoint and the export see
the averaged weights; training and a resume go on with the raw ones, exactly as an uninterrupted run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml

import cli
from callbacks.weight_averaging import EMA, LAWA, RAW_STATE_KEY, ema_update, uniform_average
from core.errors import UserError
from datamodules import MLMDataModule
from helpers import tiny_bert_args, tiny_fit_args, tiny_mlm_data_args
from lightning_modules.bert_mlm import BertMLM


def test_ema_and_uniform_average_against_hand_computed_numbers():
    average = {"w": torch.tensor([1.0, 2.0])}
    ema_update(average, {"w": torch.tensor([3.0, 6.0])}, decay=0.75)  # 0.75 x [1, 2] + 0.25 x [3, 6]
    assert average["w"].tolist() == [1.5, 3.0]
    snapshots = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([2.0, 3.0])}, {"w": torch.tensor([6.0, 3.0])}]
    assert uniform_average(snapshots)["w"].tolist() == [3.0, 2.0]
    with pytest.raises(UserError, match="decay"):
        EMA(decay=1.0)
    with pytest.raises(UserError, match="LAWA"):
        LAWA(k=0)


class RawWeights(L.Callback):
    """The trained (raw) parameters after every optimizer step, and what validation saw."""

    def __init__(self):
        self.after_step, self.validated, self._last = {}, [], -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self.after_step[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.validated.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def _fit(tmp_path, corpus, averaging, max_steps=6, ckpt_path=None):
    L.seed_everything(0)
    model = BertMLM(**tiny_bert_args(), learning_rate=5e-3)
    data = MLMDataModule(**tiny_mlm_data_args(corpus, batch_size=8))
    raw = RawWeights()
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1,
                                                filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, callbacks=[averaging, raw, saver], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=1000, check_val_every_n_epoch=None,
                        limit_val_batches=1, default_root_dir=tmp_path, max_epochs=-1)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, raw


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_checkpoints_and_validates_the_average_and_resumes_the_raw_weights_exactly(corpus_file, tmp_path):
    trainer, model, raw = _fit(tmp_path / "full", corpus_file, EMA(decay=0.5))
    by_hand = {n: w.clone() for n, w in raw.after_step[1].items()}
    averages = {1: {n: w.clone() for n, w in by_hand.items()}}
    for step in range(2, 7):
        by_hand = {n: 0.5 * by_hand[n] + 0.5 * raw.after_step[step][n] for n in by_hand}
        averages[step] = by_hand
    ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
    for name, value in ema.average.items():
        torch.testing.assert_close(value, averages[6][name], rtol=1e-6, atol=1e-7)

    checkpoint = torch.load(tmp_path / "full" / "ckpt" / "step=3.ckpt", weights_only=True)
    aliases = {"model.lm_head.decoder.weight": "model.roberta_prelayernorm.embeddings.word_embeddings.weight"}
    for key, value in checkpoint["state_dict"].items():
        name = aliases.get(key, key)
        if name in averages[3]:
            torch.testing.assert_close(value, averages[3][name], rtol=1e-6, atol=1e-7)  # every name of a tied weight
            assert torch.equal(checkpoint[RAW_STATE_KEY][key], raw.after_step[3][name])

    trainer.validate(model, datamodule=trainer.datamodule, verbose=False)
    for name, value in raw.validated[-1].items():  # validation saw the average ...
        torch.testing.assert_close(value, ema.average[name], rtol=1e-6, atol=1e-7)
    assert _equal({n: p.detach() for n, p in model.named_parameters()}, raw.after_step[6])  # ... training has the raw

    _, resumed, _ = _fit(tmp_path / "resumed", corpus_file, EMA(decay=0.5), ckpt_path=tmp_path / "full" / "ckpt" / "step=3.ckpt")
    assert _equal({n: p.detach() for n, p in resumed.named_parameters()}, raw.after_step[6])  # bit-identical


def test_lawa_averages_the_last_k_snapshots(corpus_file, tmp_path):
    trainer, _, raw = _fit(tmp_path, corpus_file, LAWA(k=2, interval=2))
    lawa = next(c for c in trainer.callbacks if isinstance(c, LAWA))
    assert len(lawa.snapshots) == 2  # steps 4 and 6 (2 dropped)
    for name, value in lawa.evaluation_weights().items():
        torch.testing.assert_close(value, (raw.after_step[4][name] + raw.after_step[6][name]) / 2, rtol=1e-6, atol=1e-7)


def test_the_export_of_an_averaging_run_holds_the_averaged_weights(corpus_file, tmp_path):
    from lightning_modules.export import load_checkpoint

    overlay = tmp_path / "ema.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks+": [
        {"class_path": "callbacks.weight_averaging.EMA", "init_args": {"decay": 0.5}}]}}))
    cli.main(tiny_fit_args(corpus_file, tmp_path, "--config", str(overlay), "--trainer.max_steps", "4"))
    path = tmp_path / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["callbacks"]) >= {"EMA"}
    average = checkpoint["callbacks"]["EMA"]["average"]
    exported = dict(load_checkpoint(path).module.named_parameters())
    for name, value in average.items():
        assert torch.equal(exported[name].detach(), value)
    assert any(not torch.equal(checkpoint[RAW_STATE_KEY][n], v) for n, v in average.items())  # raw differs


# ----- charging a method's own kind of work -------------------------------------------------------------------
def test_the_ledger_counts_own_kinds_of_work_as_events_or_examples():
    from core.ledger import WorkLedger

    a, b = WorkLedger(), WorkLedger()
    for ledger in (a, b):
        ledger.charge_work("ema_update", 3)
        ledger.charge_fwd_bwd(2, 16)
    a.charge_work("teacher_fwd", 16, per="examples")
    b.charge_work("teacher_fwd", 8, per="examples")
    total = WorkLedger.over_processes([a.state_dict(), b.state_dict()])
    # events every process does alike count once; each process's examples add up
    assert dict(total.counts) == {"ema_update/events": 3.0, "fwd_bwd/2": 32.0, "teacher_fwd/examples": 24.0}
    assert dict(a.global_work(2).counts) == {"ema_update/events": 3.0, "fwd_bwd/2": 32.0, "teacher_fwd/examples": 32.0}
    assert a.work_kinds() == ["ema_update", "teacher_fwd"]
    for bad in ("EMA", "ema update", "fwd"):
        with pytest.raises(ValueError):
            WorkLedger().charge_work(bad)
    with pytest.raises(ValueError, match="events"):
        WorkLedger({"ema_update/steps": 1.0})


def _table(**extra) -> dict:
    return {"format": "rst-table/1", "seq_len": 32, "micro_batch_size": 16, "fwd_bwd_seconds": [0.5, 1.0],
            "optimizer_step_seconds": {"AdamW": 0.1}, **extra}


def test_a_table_prices_own_work_and_refuses_a_kind_it_lacks_in_one_line():
    from core.cost_table import CostTable
    from core.ledger import WorkLedger

    table = CostTable.from_dict(_table(work_seconds={"ema_update": 0.25, "teacher_fwd": 0.01}), path="t.json")
    ledger = WorkLedger()
    ledger.charge_fwd_bwd(2, 32)
    ledger.charge_optimizer_step("AdamW", 2)
    ledger.charge_work("ema_update", 2)
    ledger.charge_work("teacher_fwd", 32, per="examples")
    assert table.seconds(ledger) == pytest.approx(2 * 1.0 + 2 * 0.1 + 2 * 0.25 + 32 * 0.01)
    # under 2 processes each rank's ledger pays half of every shared event, all of its own examples
    assert table.seconds(ledger, optimizer_share=0.5) == pytest.approx(2 * 1.0 + 0.1 + 0.25 + 32 * 0.01)
    ledger.charge_work("lawa_snapshot")
    with pytest.raises(UserError) as refused:
        table.seconds(ledger)
    assert "\n" not in str(refused.value) and "'lawa_snapshot'" in str(refused.value) and "--work" in str(refused.value)
    plain = CostTable.from_dict(_table())
    assert "work_seconds" not in plain.to_dict()  # a table without own-work prices keeps its digest and its file
    assert plain.prices_digest() != CostTable.from_dict(_table(work_seconds={"ema_update": 0.25})).prices_digest()


def _budgeted(tmp_path, corpus, table: dict, averaging: dict, budget: str = "12s") -> list[str]:
    import json

    from core.sealing import seal

    (tmp_path / "table.json").write_text(json.dumps(seal(table)))
    overlay = {"trainer": {"max_steps": -1, "callbacks": [
        {"class_path": "callbacks.rst.RSTBudget", "init_args": {"budget": budget, "table": str(tmp_path / "table.json")}},
        averaging,
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
    ]}}
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    return tiny_fit_args(corpus, tmp_path, "--config", str(tmp_path / "overlay.yaml"))


@pytest.mark.parametrize("averaging", [
    {"class_path": "callbacks.weight_averaging.EMA", "init_args": {"decay": 0.9, "every": 2}},
    {"class_path": "callbacks.weight_averaging.LAWA", "init_args": {"k": 2, "interval": 3}},
])
def test_plan_and_run_charge_the_averaging_work_alike(averaging, corpus_file, tmp_path, capsys, caplog):
    import json

    kind = "ema_update" if "EMA" in averaging["class_path"] else "lawa_snapshot"
    table = _table(work_seconds={kind: 0.3})
    args = _budgeted(tmp_path, corpus_file, table, averaging)
    cli.main(["plan", *args[1:]])
    plan = json.loads(capsys.readouterr().out)
    interval = averaging["init_args"].get("every") or averaging["init_args"]["interval"]
    steps = plan["optimizer_steps"]
    # 1 RST-second of training and 0.1 of AdamW per step, 0.3 per update: the updates cost steps the run loses
    assert plan["own_work"] == {kind: {"units": steps // interval, "rst_seconds": pytest.approx(0.3 * (steps // interval))}}
    assert steps < 12 / 1.1 + 1
    cli.main(args)
    assert f"spent at optimizer step {steps} (RST {plan['rst_seconds']:.3f} s" in caplog.text
    checkpoint = torch.load(tmp_path / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["work_ledger"][f"{kind}/events"] == steps // interval


def test_a_table_mode_run_whose_table_cannot_price_the_averaging_is_refused_at_start(corpus_file, tmp_path, capsys):
    from helpers import run_until_exit

    args = _budgeted(tmp_path, corpus_file, _table(), {"class_path": "callbacks.weight_averaging.EMA"})
    for command in (["plan", *args[1:]], args):
        code, lines = run_until_exit(command, capsys)
        errors = [line for line in lines if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "not 'ema_update'" in errors[0] and "--update --work" in errors[0]
    assert not (tmp_path / "bert-demo" / "version_0" / "checkpoints").exists()  # refused before a step


def test_calibrate_update_work_adds_the_averaging_prices_to_a_table(corpus_file, tmp_path):
    from core.cost_table import CostTable

    args = _budgeted(tmp_path, corpus_file, _table(), {"class_path": "callbacks.weight_averaging.LAWA"})
    cli.main(["calibrate", *args[1:], "--output", str(tmp_path / "table.json"), "--update", "--work"])
    table = CostTable.load(tmp_path / "table.json")
    assert set(table.work_seconds) == {"lawa_snapshot"} and 0 < table.work_seconds["lawa_snapshot"] < 1.0
    assert table.fwd_bwd_seconds == [0.5, 1.0]  # the other prices kept


def test_wall_mode_adds_own_work_measured_outside_a_training_batch_only():
    from callbacks.rst import RSTBudget

    budget = RSTBudget(budget="10s", mode="wall")
    budget.add_measured_work(0.5)
    budget._batch_start = 1.0  # a training batch in progress times the work itself
    budget.add_measured_work(0.25)
    assert budget._wall_own_work == 0.5
    table_mode = RSTBudget(budget="10s", table="configs/rst/bert-demo-cpu.json")
    table_mode.add_measured_work(0.5)  # the table prices the ledger's units instead
    assert table_mode._wall_own_work == 0.0
