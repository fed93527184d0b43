"""Sequence-length warm-up (Li, Zhang and He 2022): the lengths per step, the cut batches, their prices, and
``plan`` = run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import cli
from callbacks.sequence_warmup import SequenceLengthWarmup, warmup_length
from core.batch import IGNORE_INDEX, INPUT_IDS, LABELS
from core.cost_table import CostTable
from core.errors import UserError
from core.sealing import seal
from datamodules.collators import cut_mlm_batch, cut_span_corruption
from helpers import ROOT, run_until_exit, scalars, tiny_fit_args


def test_the_length_grows_linearly_in_multiples_to_full_at_the_fraction():
    # Li et al. section 4: start + (full - start) * min(t / T, 1), rounded down to a multiple of 8; here t/T = tau/fraction
    # tau 0.05: 16 + 48 x 0.125 = 22 -> 16; 0.10: 28 -> 24; 0.15: 34 -> 32; 0.25: 46 -> 40; 0.35: 58 -> 56
    lengths = [warmup_length(tau / 100, 16, 64, 0.4, 8) for tau in range(0, 101, 5)]
    assert lengths == [16, 16, 24, 32, 40, 40, 48, 56] + [64] * 13
    assert SequenceLengthWarmup(start_length=16, multiple=8).lengths(64) == [16, 24, 32, 40, 48, 56]
    with pytest.raises(UserError, match="shorter"):
        SequenceLengthWarmup(start_length=64).lengths(64)
    with pytest.raises(UserError, match="multiple"):
        SequenceLengthWarmup(start_length=20, multiple=8)


def test_a_masked_lm_batch_keeps_its_first_tokens_and_their_masks():
    batch = {INPUT_IDS: torch.arange(12).view(2, 6), LABELS: torch.arange(12).view(2, 6) + 100,
             "example_id": torch.tensor([7, 8])}
    cut = cut_mlm_batch(batch, 4, 6)
    assert cut[INPUT_IDS].tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]
    assert cut[LABELS].tolist() == [[100, 101, 102, 103], [106, 107, 108, 109]]
    assert cut["example_id"].tolist() == [7, 8]


def test_span_corruption_cut_keeps_the_targets_of_the_sentinels_its_input_still_holds():
    # raw 10 11 12 13 14 15 16 17, spans [11 12] -> 99, [15] -> 98, [17] -> 97
    inputs = torch.tensor([[10, 99, 13, 14, 98, 16, 97, 1]])
    targets = torch.tensor([[99, 11, 12, 98, 15, 97, 17, 1]])
    cut_inputs, cut_targets = cut_span_corruption(inputs, targets, 5, [99, 98, 97], eos_id=1)
    assert cut_inputs.tolist() == [[10, 99, 13, 14, 1]]  # one sentinel left: its span only
    assert cut_targets.tolist() == [[99, 11, 12, 1]]
    both_inputs, both_targets = cut_span_corruption(torch.cat([inputs, inputs]), torch.cat([targets, targets]), 6,
                                                    [99, 98, 97], eos_id=1)
    assert both_inputs[0].tolist() == [10, 99, 13, 14, 98, 1]
    assert both_targets[0].tolist() == [99, 11, 12, 98, 15, 1]
    full_inputs, full_targets = cut_span_corruption(inputs, targets, 8, [99, 98, 97], eos_id=1)
    assert full_targets.tolist() == targets.tolist() and full_inputs[0, -1] == 1
    ragged = cut_span_corruption(torch.stack([inputs[0], torch.tensor([99, 10, 13, 98, 14, 97, 16, 1])]),
                                 torch.stack([targets[0], torch.tensor([99, 11, 98, 12, 97, 15, 17, 1])]), 3,
                                 [99, 98, 97], eos_id=1)[1]
    assert ragged.tolist() == [[99, 11, 12, 1], [99, 11, 1, IGNORE_INDEX]]  # padded targets are ignored


def _overlay(tmp_path, prices_by_length: dict | None, start: int = 16, fraction: float = 0.5) -> str:
    table = {"format": "rst-table/1", "seq_len": 32, "micro_batch_size": 16, "fwd_bwd_seconds": [0.5, 1.0],
             "optimizer_step_seconds": {"AdamW": 0.1}}
    if prices_by_length is not None:
        table["fwd_bwd_seconds_by_length"] = prices_by_length
    (tmp_path / "table.json").write_text(json.dumps(seal(table)))
    overlay = {"trainer": {"max_steps": -1, "callbacks": [
        {"class_path": "callbacks.rst.RSTBudget", "init_args": {"budget": "20s", "table": str(tmp_path / "table.json")}},
        {"class_path": "callbacks.sequence_warmup.SequenceLengthWarmup",
         "init_args": {"start_length": start, "fraction": fraction, "multiple": 8}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
    ]}}
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    return str(tmp_path / "overlay.yaml")


@pytest.mark.slow
def test_plan_replays_the_lengths_and_the_run_charges_each_at_its_price(corpus_file, tmp_path, capsys, caplog):
    args = tiny_fit_args(corpus_file, tmp_path, "--config", _overlay(tmp_path, {"16": [0.25, 0.5], "24": [0.4, 0.75]}),
                         "--trainer.log_every_n_steps", "1")
    cli.main(["plan", *args[1:]])
    plan = json.loads(capsys.readouterr().out)
    # a step costs 0.5 + 0.1 at 16 tokens (tau < 0.25: spent 0 .. 4.8, 9 steps), 0.85 at 24 (tau < 0.5: spent 5.4 ..
    # 9.65, 6 steps) and 1.1 at 32 (spent 10.5 .. 19.3, 9 steps): 24 steps
    assert plan["sequence_lengths"] == {"16": 9, "24": 6, "full": 9} and plan["optimizer_steps"] == 24
    cli.main(args)
    assert f"spent at optimizer step 24 (RST {plan['rst_seconds']:.3f} s" in caplog.text
    checkpoint = torch.load(tmp_path / "bert-demo" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["work_ledger"] == {"fwd_bwd/2@16": 9 * 16.0, "fwd_bwd/2@24": 6 * 16.0, "fwd_bwd/2": 9 * 16.0,
                                         "optimizer_step/AdamW": 24.0}
    lengths = [v for _, v in scalars(tmp_path / "bert-demo" / "version_0")["data/seq_len"]]
    assert lengths == [16.0] * 9 + [24.0] * 6 + [32.0] * 9
    summary = json.loads((tmp_path / "bert-demo" / "version_0" / "summary.json").read_text())
    assert summary["tokens"] == 9 * 16 * 16 + 6 * 16 * 24 + 9 * 16 * 32  # each pass at its own length


def test_a_table_without_the_warm_ups_lengths_is_refused_in_one_line(corpus_file, tmp_path, capsys):
    args = tiny_fit_args(corpus_file, tmp_path, "--config", _overlay(tmp_path, {"16": [0.25, 0.5]}))
    for command in (["plan", *args[1:]], args):
        code, lines = run_until_exit(command, capsys)
        errors = [line for line in lines if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "not of 24" in errors[0] and "--update --lengths" in errors[0]


def test_calibrate_times_every_length_of_the_warm_up(corpus_file, tmp_path):
    args = tiny_fit_args(corpus_file, tmp_path, "--config", _overlay(tmp_path, None))
    cli.main(["calibrate", *args[1:], "--output", str(tmp_path / "table.json"), "--update", "--lengths",
              "--warmup", "0", "--iterations", "2", "--rounds", "1"])
    table = CostTable.load(tmp_path / "table.json")
    assert sorted(table.fwd_bwd_seconds_by_length) == [16, 24]
    assert all(len(p) == 2 and all(s > 0 for s in p) for p in table.fwd_bwd_seconds_by_length.values())
    assert table.fwd_bwd_seconds == [0.5, 1.0]  # the full length's prices kept


@pytest.mark.slow
def test_t5_trains_on_cut_span_corruption_batches(corpus_file, tmp_path, capsys):
    overlay = {"trainer": {"callbacks+": [{"class_path": "callbacks.sequence_warmup.SequenceLengthWarmup",
                                           "init_args": {"start_length": 16, "fraction": 0.5, "multiple": 8}}]}}
    (tmp_path / "warmup.yaml").write_text(yaml.safe_dump(overlay))
    cli.main([
        "fit", "--config", str(ROOT / "configs/t5/demo.yaml"), "--config", str(ROOT / "tests/configs/step-budget.yaml"),
        "--config", str(tmp_path / "warmup.yaml"),
        "--data.corpus.source", "files", "--data.corpus.data_files", str(corpus_file),
        "--data.vocab_size", "300", "--data.seq_len", "32", "--data.batch_size", "16",
        "--data.validation_fraction", "0.05", "--data.max_validation_sequences", "64",
        "--model.num_layers", "2", "--model.d_model", "32", "--model.d_ff", "64", "--model.num_heads", "2",
        "--model.d_kv", "16", "--trainer.max_steps", "40", "--trainer.val_check_interval", "40",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    curves = scalars(tmp_path / "t5-demo" / "version_0")
    lengths = [v for _, v in curves["data/seq_len"]]
    assert lengths[0] == 16 and lengths[-1] == 32 and sorted(set(lengths)) == [16.0, 24.0, 32.0]
    losses = [v for _, v in curves["train/loss"]]
    assert all(loss == loss for loss in losses) and sum(losses[-3:]) < sum(losses[:3])


def test_the_summary_counts_the_tokens_a_cut_sequence_trained():
    from core.ledger import WorkLedger

    # 9 micro-batches of 16 at 16 of 32 tokens, 6 at 24, 9 at full length
    ledger = WorkLedger({"fwd_bwd/2@16": 144, "fwd_bwd/2@24": 96, "fwd_bwd/2": 144, "optimizer_step/AdamW": 24})
    assert ledger.tokens_trained(32, 32) == 144 * 16 + 96 * 24 + 144 * 32
