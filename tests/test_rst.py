"""Reference System Time: durations, tables, ledger pricing, plan vs. real runs, DDP, resume."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import cli
from callbacks.rst import RSTBudget
from core.budget import BudgetAccount
from core.cost_table import CostTable
from core.durations import parse_duration
from core.errors import UserError
from core.ledger import WorkLedger
from core.planning import simulate
from helpers import ROOT, scalars, tiny_fit_args

# --------------------------------------------------------------------------- pure arithmetic


def test_durations_parse_seconds_minutes_hours_and_their_sums():
    assert parse_duration("90s") == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("24h") == 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1.5h") == 5400
    assert parse_duration(120) == 120
    assert parse_duration("45") == 45
    for bad in ("abc", "10x", "-5m", "0s", "h"):
        with pytest.raises(UserError):
            parse_duration(bad)


def _table(**overrides) -> CostTable:
    data = {
        "format": "rst-table/1",
        "seq_len": 32,
        "micro_batch_size": 4,
        "fwd_bwd_seconds": [0.1, 0.2, 0.3],
        "fwd_seconds": 0.05,
        "optimizer_step_seconds": {"AdamW": 0.01},
    }
    data.update(overrides)
    return CostTable.from_dict(data)


def test_ledger_is_priced_by_hand_computed_sums():
    ledger = WorkLedger()
    ledger.charge_fwd_bwd(layers=2, examples=8)  # 2 micro-batches x 0.2
    ledger.charge_fwd_bwd(layers=3, examples=2)  # half a micro-batch x 0.3
    ledger.charge_fwd(layers=3, examples=4)  # 1 x 0.05 (one price for every depth)
    ledger.charge_optimizer_step("AdamW", 3)  # 3 x 0.01
    assert _table().seconds(ledger) == pytest.approx(0.4 + 0.15 + 0.05 + 0.03)
    per_depth = _table(fwd_seconds=[0.01, 0.02, 0.04])
    assert per_depth.seconds(ledger) == pytest.approx(0.4 + 0.15 + 0.04 + 0.03)
    state = ledger.state_dict()
    restored = WorkLedger()
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert _table().seconds(restored) == _table().seconds(ledger)


def test_table_entries_that_cannot_price_the_work_are_named():
    ledger = WorkLedger()
    ledger.charge_fwd_bwd(layers=4, examples=4)
    with pytest.raises(UserError, match="fwd_bwd_seconds for 1..3 layers, not 4"):
        _table().seconds(ledger)
    ledger = WorkLedger()
    ledger.charge_fwd(layers=1, examples=4)
    with pytest.raises(UserError, match="no fwd_seconds"):
        _table(fwd_seconds=None).seconds(ledger)
    ledger = WorkLedger()
    ledger.charge_optimizer_step("Lion")
    with pytest.raises(UserError, match="prices the steps of AdamW, not Lion: time it .* --update --optimizers"):
        _table().seconds(ledger)
    assert _table(optimizer_step_seconds={}).seconds(ledger) == 0.0  # a table without step prices charges none
    ledger.charge_hessian(layers=2, examples=8)  # a Hessian pass costs a forward+backward, unless included
    assert _table(optimizer_step_seconds={}).seconds(ledger) == pytest.approx(0.4)
    assert _table(optimizer_step_seconds={}, hessian_in_optimizer_step=True).seconds(ledger) == 0.0
    with pytest.raises(UserError, match="micro-batches of 4, but data.batch_size is 8"):
        _table().check_run(micro_batch_size=8, seq_len=32, num_layers=2)
    with pytest.raises(UserError, match="sequences of 32 tokens, but the run uses 64"):
        _table().check_run(micro_batch_size=4, seq_len=64, num_layers=2)
    with pytest.raises(UserError, match="1..3 layers, but the model has 4"):
        _table().check_run(micro_batch_size=4, seq_len=32, num_layers=4)
    with pytest.raises(UserError, match="format"):
        CostTable.from_dict({"format": "v0"})


def test_a_saved_table_loads_back_equal_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "t" / "table.json"
    _table().save(path)
    assert CostTable.load(path).to_dict() == _table().to_dict()
    assert [p.name for p in path.parent.iterdir()] == ["table.json"]


def test_paper_tables_ship_with_the_typo_fixed():
    bert = CostTable.load(ROOT / "configs/rst/bert-paper.json")
    assert bert.fwd_bwd(7) == 0.1052 and bert.fwd_bwd(16) == 0.2253 and bert.fwd(16) == 0.09285
    assert CostTable.load(ROOT / "configs/rst/bert-paper-with-typo.json").fwd_bwd(7) == 0.01052
    t5 = CostTable.load(ROOT / "configs/rst/t5-paper.json")
    # the paper's per-step prices (2 micro-batches of 72) are recovered
    assert [round(2 * t5.fwd_bwd(k), 3) for k in (1, 6, 12)] == [0.129, 0.538, 1.031]
    assert 2 * t5.fwd_bwd(12) + t5.optimizer_step("SophiaG") == pytest.approx(1.156)


@pytest.mark.parametrize(
    "budget, steps",
    [("6h", 7989), ("12h", 15979), ("24h", 31957)],  # docs/paper.md
)
def test_paper_bert_table_gives_the_papers_step_counts(budget, steps):
    plan = simulate(
        CostTable.load(ROOT / "configs/rst/bert-paper.json"),
        parse_duration(budget),
        micro_batch_size=128,
        micro_batches_per_step=12,
        tokens_per_example=128,
        optimizer_name="AdamW",
        num_layers=16,
    )
    # the step that crosses the budget still runs: ceil(budget / 2.7036 s), within 1 of the paper's figure
    assert plan["optimizer_steps"] == math.ceil(parse_duration(budget) / (12 * 0.2253))
    assert abs(plan["optimizer_steps"] - steps) <= 1
    assert plan["rst_seconds"] >= parse_duration(budget) > plan["rst_seconds"] - 2.7036


@pytest.mark.parametrize(
    "optimizer, budget, steps",
    [("AdamWScale", "6h", 20951), ("AdamWScale", "12h", 41901), ("AdamWScale", "24h", 83802),
     ("Lion", "24h", 82838), ("SophiaG", "24h", 74740)],  # docs/paper.md
)
def test_paper_t5_table_gives_the_papers_step_counts(optimizer, budget, steps):
    plan = simulate(
        CostTable.load(ROOT / "configs/rst/t5-paper.json"),
        parse_duration(budget),
        micro_batch_size=72,
        micro_batches_per_step=2,
        tokens_per_example=568,
        optimizer_name=optimizer,
        num_layers=12,
    )
    assert abs(plan["optimizer_steps"] - steps) <= 1


def test_plan_command_on_the_paper_baseline_config(capsys):
    cli.main(["plan", "--config", str(ROOT / "configs/bert/baseline.yaml"), "--budget", "6h"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["optimizer_steps"] == 7990 and plan["micro_batches"] == 7990 * 12
    assert plan["tokens"] == 7990 * 1536 * 128
    assert [p["active_layers"] for p in plan["phases"]] == [16]


def test_a_budget_without_a_table_a_missing_table_or_an_unreadable_duration_is_refused():
    with pytest.raises(UserError, match="needs table=PATH"):
        RSTBudget(budget="1h")
    with pytest.raises(UserError, match="does not exist"):
        _ = RSTBudget(budget="1h", table="/nonexistent.json").table
    with pytest.raises(UserError, match="cannot read the duration"):
        RSTBudget(budget="one hour", mode="wall")


# --------------------------------------------------------------------------- real runs


def _write_budget_config(tmp_path: Path, budget: str, table: CostTable | None, *, every: int = 0, mode="table") -> Path:
    init = {"budget": budget, "mode": mode}
    if table is not None:
        table.save(tmp_path / "table.json")
        init["table"] = str(tmp_path / "table.json")
    checkpoint = {"save_last": True}
    if every:
        checkpoint.update(every_n_train_steps=every, save_top_k=-1, filename="{step}")
    config = {
        "trainer": {
            "max_steps": -1,
            "callbacks": [
                {"class_path": "callbacks.rst.RSTBudget", "init_args": init},
                {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoint},
            ],
        }
    }
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


TINY_TABLE = dict(seq_len=32, micro_batch_size=16, fwd_bwd_seconds=[0.5, 1.0], fwd_seconds=None,
                  optimizer_step_seconds={"AdamW": 0.25})


def _fit_with_budget(corpus, out, config, *extra):
    args = tiny_fit_args(corpus, out, "--config", str(config), "--trainer.accumulate_grad_batches", "2",
                         "--trainer.log_every_n_steps", "1", *extra)
    cli.main(args)
    return scalars(out / "bert-demo" / "version_0")


@pytest.mark.slow
def test_run_stops_at_the_budget_and_plan_predicts_it(corpus_file, tmp_path, capsys, caplog):
    config = _write_budget_config(tmp_path, "20.1s", _table(**TINY_TABLE))
    cli.main(["plan", *tiny_fit_args(corpus_file, tmp_path, "--config", str(config),
                                       "--trainer.accumulate_grad_batches", "2")[1:]])
    plan = json.loads(capsys.readouterr().out)
    # per step: 2 micro-batches x 1.0 s (2 layers) + 0.25 s optimizer = 2.25 s -> 9 steps reach 20.25 s
    assert plan["optimizer_steps"] == 9 and plan["rst_seconds"] == pytest.approx(20.25)
    scalars = _fit_with_budget(corpus_file, tmp_path, config)
    assert "RST budget 0m20.1s spent at optimizer step 9 (RST 20.250 s" in caplog.text
    assert "done: 9 steps, 9,216 tokens" in capsys.readouterr().out  # 9 x 2 x 16 x 32, as plan says
    assert plan["tokens"] == 9216
    rst = dict(scalars["rst/seconds"])
    assert rst[max(rst)] == pytest.approx(plan["rst_seconds"])
    assert scalars["rst/fraction"][-1][1] == pytest.approx(1.0)
    assert scalars["rst/remaining"][-1][1] == 0.0
    assert "time/wall_seconds" in scalars
    lr = [v for _, v in scalars["lr/decay"]]
    assert lr[0] == 0.0 and max(lr) > 0.85 * 5e-3 and lr[-1] < 0.25 * 5e-3  # the triangle, in RST
    # the learning rate is fully decayed exactly when the budget ends
    last = torch.load(tmp_path / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert [g["lr"] for g in last["optimizer_states"][0]["param_groups"]] == [0.0, 0.0]


@pytest.mark.slow
def test_resume_mid_budget_continues_with_the_same_rst_lr_step_and_losses(corpus_file, tmp_path, caplog):
    table = _table(**TINY_TABLE)
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full_dir.mkdir()
    resumed_dir.mkdir()
    config = _write_budget_config(full_dir, "30s", table, every=4)
    full = _fit_with_budget(corpus_file, full_dir, config)
    checkpoint = full_dir / "bert-demo" / "version_0" / "checkpoints" / "step=4.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] == 4
    budget_state = next(v for k, v in state["callbacks"].items() if k.startswith("RSTBudget"))
    assert budget_state["spent_seconds"] == pytest.approx(4 * 2.25)
    resumed = _fit_with_budget(corpus_file, resumed_dir, config, "--ckpt_path", str(checkpoint))
    assert caplog.text.count("spent at optimizer step 14 (RST 31.500 s") == 2  # both runs stop at the same step
    assert "RSTBudget: resuming with 9.000 of 30 RST-seconds spent." in caplog.text
    # logged at 0-based step indices: index 4 is the 5th step; the data continue where they stopped
    for tag in ("rst/seconds", "lr/decay", "train/loss"):
        after = {s: v for s, v in full[tag] if s >= 4}
        again = dict(resumed[tag])
        assert sorted(again) == sorted(after), tag
        for step, value in again.items():
            assert value == pytest.approx(after[step], rel=1e-5), (tag, step)


@pytest.mark.slow
def test_same_steps_and_loss_curve_with_one_or_two_threads(corpus_file, tmp_path, capsys):
    curves = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = tmp_path / f"threads{n}"
            out.mkdir()
            config = _write_budget_config(out, "20s", _table(**TINY_TABLE))
            scalars = _fit_with_budget(corpus_file, out, config)
            curves.append((scalars["train/loss"], scalars["val/loss"]))
    finally:
        torch.set_num_threads(threads)
    (train_1, val_1), (train_2, val_2) = curves
    assert [s for s, _ in train_1] == [s for s, _ in train_2]
    assert [v for _, v in train_1] == pytest.approx([v for _, v in train_2], rel=1e-4)
    assert [v for _, v in val_1] == pytest.approx([v for _, v in val_2], rel=1e-4)


@pytest.mark.slow
def test_wall_mode_uses_measured_time(corpus_file, tmp_path, caplog):
    config = _write_budget_config(tmp_path, "2s", None, mode="wall")
    scalars = _fit_with_budget(corpus_file, tmp_path, config)
    rst = [v for _, v in scalars["rst/seconds"]]
    assert rst[-1] >= 2.0 and rst == sorted(rst)  # one step may outlast the 2 s on a loaded machine: no strict rise
    assert "RST budget 0m02.0s spent" in caplog.text


def test_a_table_that_does_not_fit_the_run_fails_at_start_up(corpus_file, tmp_path, capsys):
    config = _write_budget_config(tmp_path, "20s", _table(**{**TINY_TABLE, "micro_batch_size": 8}))
    with pytest.raises(SystemExit):
        _fit_with_budget(corpus_file, tmp_path, config)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "measured for micro-batches of 8, but data.batch_size is 16" in err
    assert not (tmp_path / "bert-demo" / "version_0" / "checkpoints").exists()


def test_calibrate_writes_a_table_that_prices_the_config(tmp_path, capsys):
    output = tmp_path / "tiny.json"
    cli.main([
        "calibrate", "--output", str(output), "--warmup", "0", "--iterations", "2", "--rounds", "1",
        "--config", str(ROOT / "configs/bert/demo.yaml"),
        "--data.vocab_size", "200", "--data.seq_len", "32", "--data.batch_size", "8",
        "--model.num_layers", "3", "--model.hidden_size", "32", "--model.num_heads", "2",
        "--model.intermediate_size", "64",
    ])
    assert f"wrote {output}" in capsys.readouterr().out
    table = CostTable.load(output)
    assert (table.micro_batch_size, table.seq_len, table.max_layers) == (8, 32, 3)
    assert all(s > 0 for s in table.fwd_bwd_seconds) and len(table.fwd_seconds) == 3
    assert set(table.optimizer_step_seconds) == {"AdamW"}
    assert {"device", "torch", "precision", "date"} <= set(table.machine)
    assert table.model["num_layers"] == 3
    table.check_run(micro_batch_size=8, seq_len=32, num_layers=3)


def test_the_demo_config_runs_on_its_rst_budget(capsys):
    cli.main(["plan", "--config", str(ROOT / "configs/bert/demo.yaml")])
    plan = json.loads(capsys.readouterr().out)
    assert plan["table"] == "configs/rst/bert-demo-cpu.json" and plan["budget_seconds"] == 150
    table = CostTable.load(ROOT / "configs/rst/bert-demo-cpu.json")
    per_step = table.fwd_bwd(plan["phases"][0]["active_layers"]) + table.optimizer_step("AdamW")
    assert plan["optimizer_steps"] == math.ceil(150 / per_step)


@pytest.mark.slow
def test_a_resume_just_before_the_budget_ends_stops_at_the_same_step(corpus_file, tmp_path, caplog):
    table = _table(**TINY_TABLE)  # 2.25 s per optimizer step of 2 micro-batches
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full_dir.mkdir()
    resumed_dir.mkdir()
    config = _write_budget_config(full_dir, "7s", table, every=3)
    _fit_with_budget(corpus_file, full_dir, config)
    checkpoint = full_dir / "bert-demo" / "version_0" / "checkpoints" / "step=3.ckpt"  # 6.75 s spent
    _fit_with_budget(corpus_file, resumed_dir, config, "--ckpt_path", str(checkpoint))
    assert caplog.text.count("spent at optimizer step 4 (RST 9.000 s") == 2, caplog.text


# --------------------------------------------------------------------------- resuming the clock


def test_budget_account_resumes_only_what_it_can_continue_correctly():
    table = _table(**TINY_TABLE)
    account = BudgetAccount(30.0, "table", table)
    saved = account.state_dict() | {"spent_seconds": 9.0}
    assert BudgetAccount(30.0, "table", table).resume(saved, step=4, work_before=None) == (
        "resuming with 9.000 of 30 RST-seconds spent"
    )
    with pytest.raises(UserError, match="counted in table mode, this run is configured with mode=wall"):
        BudgetAccount(30.0, "wall").resume(saved, step=4, work_before=None)
    with pytest.raises(UserError, match=r"trained for an RST budget of 0m30.0s, this run asks for 1m00.0s"):
        BudgetAccount(60.0, "table", table).resume(saved, step=4, work_before=None)
    dearer = _table(**{**TINY_TABLE, "optimizer_step_seconds": {"AdamW": 0.5}})
    with pytest.raises(UserError, match="charged with other prices"):
        BudgetAccount(30.0, "table", dearer).resume(saved, step=4, work_before=None)
    # a checkpoint of a run without a budget: its work is priced (4 steps x (2 x 1.0 + 0.25) = 9 s) ...
    work = WorkLedger({"fwd_bwd/2": 4 * 2 * 16, "optimizer_step/AdamW": 4})
    fresh = BudgetAccount(30.0, "table", table)
    assert "priced" in fresh.resume(None, step=4, work_before=work)
    assert fresh.offset == pytest.approx(9.0)
    # ... unless the budget measures wall time, which nobody measured
    with pytest.raises(UserError, match="trained without an RST budget, so its wall time was never measured"):
        BudgetAccount(30.0, "wall").resume(None, step=4, work_before=work)
    assert BudgetAccount(30.0, "wall").resume(None, step=0, work_before=None) == "RST budget starts at 0"


@pytest.mark.slow
def test_resuming_in_another_mode_is_refused(corpus_file, tmp_path, capsys):
    config = _write_budget_config(tmp_path, "20s", _table(**TINY_TABLE), every=2)
    _fit_with_budget(corpus_file, tmp_path, config)
    checkpoint = tmp_path / "bert-demo" / "version_0" / "checkpoints" / "step=2.ckpt"
    (tmp_path / "wall").mkdir()
    wall = _write_budget_config(tmp_path / "wall", "20s", None, mode="wall")
    with pytest.raises(SystemExit) as stopped:
        _fit_with_budget(corpus_file, tmp_path / "wall", wall, "--ckpt_path", str(checkpoint))
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the checkpoint's RST was counted in table mode, this run is configured with mode=wall: "
        "resume with RSTBudget mode=table, or start a new run"
    )


@pytest.mark.slow
def test_adding_a_budget_to_a_run_that_had_none_prices_the_work_done(corpus_file, tmp_path, caplog):
    first = tmp_path / "first"
    cli.main(tiny_fit_args(corpus_file, first, "--trainer.max_steps", "4", "--trainer.accumulate_grad_batches", "2"))
    checkpoint = first / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt"
    second = tmp_path / "second"
    second.mkdir()
    config = _write_budget_config(second, "20.1s", _table(**TINY_TABLE))
    curves = _fit_with_budget(corpus_file, second, config, "--ckpt_path", str(checkpoint))
    # 4 steps of 2.25 s were done before: the clock starts at 9 s and stops at step 9 (20.25 s), as an
    # uninterrupted budgeted run does
    assert "its 4 optimizer steps are priced with" in caplog.text and ": 9.000 RST-seconds spent" in caplog.text
    assert "spent at optimizer step 9 (RST 20.250 s" in caplog.text
    assert dict(curves["rst/seconds"])[4] == pytest.approx(9.0 + 2.25)


@pytest.mark.slow
@pytest.mark.ddp
def test_tokens_stay_right_after_resuming_on_more_processes(corpus_file, tmp_path, capsys):
    """1 process for 3 steps, then 2 processes for 3 more: 3 x 16 + 3 x 2 x 16 sequences of 32 tokens."""
    first = tmp_path / "first"
    cli.main(tiny_fit_args(corpus_file, first, "--trainer.max_steps", "3"))
    checkpoint = first / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt"
    args = tiny_fit_args(corpus_file, tmp_path / "second", "--trainer.max_steps", "6", "--ckpt_path", str(checkpoint),
                         "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: 6 steps, {(3 * 16 + 3 * 2 * 16) * 32:,} tokens" in result.stdout, result.stdout
