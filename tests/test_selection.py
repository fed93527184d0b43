"""Batch selection: the maths, the selectors on hand-made candidates, the splits, the irreducible-loss
file and its checks, runs with RST, resume, T5, bf16 and DDP."""

import json
import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
import yaml

import cli
from callbacks.irreducible_scoring import score_training_examples
from callbacks.rho_loss import RhoLoss
from callbacks.rst import RSTBudget
from callbacks.selective_backprop import SelectiveBackprop
from callbacks.uniform_selection import UniformSelection
from core.batch import EXAMPLE_ID, INPUT_IDS, PASS_INDEX
from core.batch_dicts import concat_batches, count_examples, split_batch, take_rows
from core.cost_table import CostTable
from core.errors import UserError
from core.irreducible_losses import load_irreducible_losses, sidecar_path, write_irreducible_losses
from core.ledger import WorkLedger
from core.planning import passes_read
from core.sealing import file_sha256, seal
from core.selection import (
    LossHistory,
    expected_keep_rate,
    keep_probabilities,
    keep_uniforms,
    strict_percentiles,
    top_k_indices,
)
from datamodules import MLMDataModule, SpanCorruptionDataModule
from datamodules.packed_cache import split_documents
from helpers import ROOT, scalars, tiny_bert_args, tiny_fit_args, tiny_mlm_data_args
from lightning_modules.bert_mlm import BertMLM
from lightning_modules.t5_span_corruption import T5SpanCorruption

# --------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_keep_rate_is_near_one_over_one_plus_beta_on_uniform_losses(beta):
    rng = np.random.default_rng(0)
    history, kept, seen = LossHistory(1024), 0, 0
    for batch in range(300):
        losses = rng.random(128)
        ids = np.arange(batch * 128, (batch + 1) * 128)
        probabilities = keep_probabilities(losses, history, beta)
        if batch >= 8:  # once the history is full
            kept += int((keep_uniforms(7, [0] * 128, ids) < probabilities).sum())
            seen += 128
    assert kept / seen == pytest.approx(1 / (1 + beta), abs=0.01)
    assert expected_keep_rate(beta) == pytest.approx(1 / (1 + beta))


def test_a_floor_raises_the_keep_rate_by_its_closed_form():
    rng = np.random.default_rng(1)
    history, probabilities = LossHistory(4096), []
    for _ in range(200):
        probabilities.append(keep_probabilities(rng.random(256), history, beta=2.0, floor=0.3))
    assert np.mean(np.concatenate(probabilities[20:])) == pytest.approx(expected_keep_rate(2.0, 0.3), abs=0.01)


def test_strict_percentile_and_history_update_order_on_a_hand_example():
    history = LossHistory(4, [1.0, 2.0, 3.0])
    # the batch joins the history first: [1, 2, 3] + [2, 5] keeps the newest four, [2, 3, 2, 5]
    probabilities = keep_probabilities([2.0, 5.0], history, beta=1.0)
    assert list(history.values()) == [2.0, 3.0, 2.0, 5.0]
    # strictly below 2: none of four; strictly below 5: three of four
    assert probabilities.tolist() == [0.0, 0.75]
    assert strict_percentiles([2.0, 5.0], np.array([1.0, 2.0, 3.0])).tolist() == [1 / 3, 1.0]  # the other order
    assert keep_probabilities([2.0, 5.0], LossHistory(4, [1.0, 2.0, 3.0]), beta=2.0, floor=0.1).tolist() == [0.1, 0.5625]


def test_top_k_is_exact_and_breaks_ties_by_the_smaller_example_id():
    scores, ids = [1.0, 3.0, 3.0, 2.0, 3.0], [10, 7, 5, 9, 6]
    assert top_k_indices(scores, ids, 2).tolist() == [2, 4]  # the 3.0s of ids 5 and 6, not 7
    assert top_k_indices(scores, ids, 4).tolist() == [1, 2, 3, 4]
    assert top_k_indices(scores, ids, 0).tolist() == []
    with pytest.raises(ValueError):
        top_k_indices(scores, ids, 6)


def test_keep_draws_depend_on_seed_pass_and_id_only():
    ids = np.arange(1000)
    first = keep_uniforms(3, [0] * 1000, ids)
    assert np.array_equal(keep_uniforms(3, [0] * 1000, ids[::-1]), first[::-1])
    assert not np.array_equal(keep_uniforms(3, [1] * 1000, ids), first)
    assert not np.array_equal(keep_uniforms(4, [0] * 1000, ids), first)
    assert 0.0 <= first.min() and first.max() < 1.0 and abs(first.mean() - 0.5) < 0.03


def test_batch_dicts_count_join_take_and_split_along_the_examples():
    first = {EXAMPLE_ID: torch.tensor([4, 7, 9]), INPUT_IDS: torch.tensor([[1, 2], [3, 4], [5, 6]])}
    second = {EXAMPLE_ID: torch.tensor([2]), INPUT_IDS: torch.tensor([[7, 8]])}
    assert count_examples(None) == 0 and count_examples(first) == 3
    joined = concat_batches(first, second)
    assert joined[EXAMPLE_ID].tolist() == [4, 7, 9, 2] and joined[INPUT_IDS].tolist()[3] == [7, 8]
    assert concat_batches(None, second) is second and concat_batches(first, None) is first
    assert concat_batches(take_rows(first, []), second) is second  # an empty side is skipped
    rows = take_rows(joined, np.array([3, 0]))
    assert rows[EXAMPLE_ID].tolist() == [2, 4] and rows[INPUT_IDS].tolist() == [[7, 8], [1, 2]]
    head, rest = split_batch(joined, 3)
    assert head[EXAMPLE_ID].tolist() == [4, 7, 9] and rest[EXAMPLE_ID].tolist() == [2]
    head, rest = split_batch(joined, 4)
    assert head[INPUT_IDS].shape == (4, 2) and rest is None


# --------------------------------------------------------------------------- selectors on hand-made candidates


class ScoresById(torch.nn.Module):
    """A stand-in model: the loss of an example is ``losses[example_id]``; it charges a ledger like the real ones."""

    num_active_layers = 3

    def __init__(self, losses):
        super().__init__()
        self.losses = torch.as_tensor(losses, dtype=torch.float32)
        self.work_ledger = WorkLedger()
        self.device = torch.device("cpu")

    def per_example_loss(self, batch):
        return self.losses[batch[EXAMPLE_ID]]


def _candidates(ids, pass_index=0):
    ids = torch.as_tensor(ids, dtype=torch.long)
    return {INPUT_IDS: ids[:, None].repeat(1, 4), EXAMPLE_ID: ids, PASS_INDEX: torch.full_like(ids, pass_index)}


def _serve(selector, model, candidate_batches, batch_size, steps):
    def open_candidates(position, mask_pass_period):
        return iter(candidate_batches[position:])

    selector._module = model
    batches = iter(selector.training_batches(open_candidates, batch_size))
    return [next(batches).assemble() for _ in range(steps)]


def _rho(ratio, batch_size, accumulation, num_examples, irreducible=None):
    rho = RhoLoss(ratio=ratio, irreducible_losses="unused.npy")
    rho._table = np.zeros((1, num_examples), dtype=np.float32) if irreducible is None else irreducible[None, :]
    rho.keep_per_mega = batch_size * accumulation
    rho.mega_batch = round(rho.keep_per_mega / ratio)
    return rho


def test_rho_loss_trains_exactly_the_top_of_each_mega_batch_and_charges_every_candidate():
    rng = np.random.default_rng(0)
    training, irreducible = rng.random(64), rng.random(64).astype(np.float32)
    order = rng.permutation(64)
    batches = [_candidates(order[i : i + 8]) for i in range(0, 64, 8)]
    model = ScoresById(training)
    rho = _rho(0.25, batch_size=4, accumulation=2, num_examples=64, irreducible=irreducible)  # keep 8 of 32
    served = _serve(rho, model, batches, batch_size=4, steps=4)
    reducible = training - irreducible.astype(np.float64)
    for mega in range(2):
        candidates = order[mega * 32 : (mega + 1) * 32]
        best = sorted(candidates, key=lambda i: -reducible[i])[:8]
        trained = torch.cat([b[EXAMPLE_ID] for b in served[2 * mega : 2 * mega + 2]]).tolist()
        assert sorted(trained) == sorted(best)
        assert trained == [i for i in candidates if i in best]  # in candidate order
    assert all(len(b[EXAMPLE_ID]) == 4 for b in served)
    assert dict(model.work_ledger.counts) == {"fwd/3": 64.0}  # every candidate scored once, at 3 layers


def test_selective_backprop_trains_exactly_the_examples_its_draws_keep():
    rng = np.random.default_rng(1)
    losses = rng.random(96)
    batches = [_candidates(range(i, i + 16), pass_index=2) for i in range(0, 96, 16)]
    sb = SelectiveBackprop(beta=1.0, history=32, seed=5)
    served = _serve(sb, ScoresById(losses), batches, batch_size=8, steps=3)
    history, expected = LossHistory(32), []
    for batch in batches:
        ids = batch[EXAMPLE_ID].numpy()
        keep = keep_uniforms(5, [2] * 16, ids) < keep_probabilities(losses[ids], history, 1.0)
        expected += ids[keep].tolist()
        if len(expected) >= 24:
            break
    assert torch.cat([b[EXAMPLE_ID] for b in served]).tolist() == expected[:24]
    assert sb.ready is not None and sb.ready[EXAMPLE_ID].tolist() == expected[24:]  # the surplus waits


def test_permuting_the_candidates_selects_the_same_examples():
    rng = np.random.default_rng(2)
    losses = rng.random(32)
    ids = np.arange(32)
    permuted = rng.permutation(32)
    for make in (lambda: SelectiveBackprop(beta=1.0, history=64, seed=1), lambda: _rho(0.5, 16, 1, 32)):
        chosen = []
        for order in (ids, permuted):
            selector = make()
            selector._module = ScoresById(losses)
            selector.take_in(_candidates(order), losses[order])
            chosen.append(sorted(selector.ready[EXAMPLE_ID].tolist()))
        assert chosen[0] == chosen[1] and 0 < len(chosen[0]) < 32


def test_priming_keeps_everything_and_free_selection_charges_nothing():
    losses = np.linspace(0, 1, 64)
    batches = [_candidates(range(i, i + 16)) for i in range(0, 64, 16)]
    model = ScoresById(losses)
    sb = SelectiveBackprop(beta=3.0, prime_batches=2, free_selection=True)
    served = _serve(sb, model, batches, batch_size=16, steps=2)
    assert [b[EXAMPLE_ID].tolist() for b in served] == [list(range(16)), list(range(16, 32))]
    assert dict(model.work_ledger.counts) == {}
    assert sb.planned_scored_per_trained() == 0.0
    assert SelectiveBackprop(beta=1.0).planned_scored_per_trained() == 2.0
    assert RhoLoss(ratio=0.25, irreducible_losses="x.npy").planned_scored_per_trained() == 4.0
    assert RhoLoss(ratio=0.5, irreducible_model="x.ckpt").planned_scored_per_trained() == 4.0  # two models score


def test_uniform_selection_keeps_its_draws_below_p_scores_nothing_and_keeps_about_p():
    losses = np.random.default_rng(3).random(4096)
    batches = [_candidates(range(i, i + 64), pass_index=1) for i in range(0, 4096, 64)]
    model = ScoresById(losses)
    uniform = UniformSelection(keep_probability=0.3, seed=7)
    served = _serve(uniform, model, batches, batch_size=32, steps=30)
    draws = keep_uniforms(7, [1] * 4096, np.arange(4096))
    expected = np.flatnonzero(draws < 0.3).tolist()
    assert torch.cat([b[EXAMPLE_ID] for b in served]).tolist() == expected[:960]
    assert dict(model.work_ledger.counts) == {}  # nothing scored, nothing charged: only training is charged
    assert uniform.planned_scored_per_trained() == 0.0
    read = uniform.candidate_batches * 64
    kept = np.count_nonzero(draws[:read] < 0.3)
    assert abs(kept / read - 0.3) < 4 * np.sqrt(0.3 * 0.7 / read)  # the keep rate is p, within 4 standard errors
    with pytest.raises(UserError, match="keep_probability=0"):
        UniformSelection(keep_probability=0.0)


# --------------------------------------------------------------------------- splits


def test_the_three_splits_are_disjoint_and_stable_across_runs(corpus_file, tmp_path):
    import datasets

    documents = datasets.Dataset.from_dict({"text": [f"document {i}" for i in range(100)]})
    splits = split_documents(documents, 0.05, seed=0, holdout_fraction=0.2)
    names = {name: set(split["text"]) for name, split in splits.items()}
    assert (len(names["validation"]), len(names["holdout"]), len(names["train"])) == (5, 19, 76)
    assert not names["validation"] & names["holdout"] and not names["validation"] & names["train"]
    assert not names["holdout"] & names["train"]
    assert names["tokenizer"] == names["holdout"] | names["train"]
    assert set(split_documents(documents, 0.05, seed=0)["validation"]["text"]) == names["validation"]  # any holdout
    again = split_documents(documents, 0.05, seed=0, holdout_fraction=0.2)
    assert all(list(again[n]["text"]) == list(splits[n]["text"]) for n in splits)

    metas = []
    for cache in (tmp_path / "a", tmp_path / "b"):
        data = MLMDataModule(**tiny_mlm_data_args(corpus_file, holdout_fraction=0.2, cache_dir=str(cache)))
        data.prepare_data()
        data.setup("fit")
        metas.append(data.stats)
    # the same documents in each split (the tokenizer, trained twice here, need not be bit-identical)
    assert metas[0]["documents"] == metas[1]["documents"] == {"validation": 20, "holdout": 76, "train": 304}
    assert metas[0]["source"] == metas[1]["source"]
    assert metas[0]["train"]["input_ids_sha256"] != metas[0]["holdout"]["input_ids_sha256"]
    plain = MLMDataModule(**tiny_mlm_data_args(corpus_file, cache_dir=str(tmp_path / "a")))
    plain.prepare_data()
    plain.setup("fit")
    assert plain.stats["tokenizer_sha256"] == metas[0]["tokenizer_sha256"]  # one vocabulary with and without holdout
    assert plain.stats["validation"]["input_ids_sha256"] == metas[0]["validation"]["input_ids_sha256"]
    holdout = MLMDataModule(**tiny_mlm_data_args(corpus_file, holdout_fraction=0.2, train_split="holdout",
                                                 cache_dir=str(tmp_path / "a")))
    holdout.setup("fit")
    assert len(holdout.train_dataset) == metas[0]["holdout"]["sequences"]
    with pytest.raises(UserError, match="needs a holdout split"):
        MLMDataModule(**tiny_mlm_data_args(corpus_file, train_split="holdout"))


# --------------------------------------------------------------------------- the irreducible-loss file


def _fingerprint():
    return {
        "objective": "mlm", "source": "files:abc", "split": "train", "split_seed": 0, "validation_fraction": 0.05,
        "holdout_fraction": 0.2, "sequence_length": 32, "tokenizer_sha256": "t0k",
        "masking": {"mask_seed": 0, "mlm_probability": 0.15}, "num_examples": 5, "input_ids_sha256": "1d5",
    }


def _write_losses(path, fingerprint, losses=None):
    np.save(path, np.arange(5, dtype=np.float32) if losses is None else losses)
    sidecar = {"format": "irreducible-losses/1", "examples": fingerprint, "passes": 1, "losses_sha256": file_sha256(path)}
    sidecar_path(path).write_text(json.dumps(seal(sidecar)))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"source": "news:xyz"}, "another corpus"),
        ({"split_seed": 1}, "another split seed"),
        ({"holdout_fraction": 0.1}, "another holdout fraction"),
        ({"tokenizer_sha256": "other"}, "another tokenizer"),
        ({"masking": {"mask_seed": 1, "mlm_probability": 0.15}}, "another masking"),
        ({"num_examples": 6}, "another number of examples"),
        ({"input_ids_sha256": "other"}, "another input ids"),
    ],
)
def test_an_irreducible_file_made_for_other_examples_is_refused(tmp_path, change, named):
    path = tmp_path / "losses.npy"
    _write_losses(path, {**_fingerprint(), **change})
    with pytest.raises(UserError, match=named) as error:
        load_irreducible_losses(str(path), _fingerprint())
    assert "\n" not in str(error.value)


def test_a_missing_or_malformed_irreducible_file_names_the_fix(tmp_path):
    path = tmp_path / "losses.npy"
    with pytest.raises(UserError, match="no irreducible-loss file at .*`python train.py score"):
        load_irreducible_losses(str(path), _fingerprint())
    _write_losses(path, _fingerprint(), np.arange(5, dtype=np.float64))
    with pytest.raises(UserError, match="not float32 losses for 5 examples"):
        load_irreducible_losses(str(path), _fingerprint())
    _write_losses(path, _fingerprint())
    table, sidecar = load_irreducible_losses(str(path), _fingerprint())
    assert table.shape == (1, 5) and sidecar["passes"] == 1


def test_an_irreducible_file_of_another_mask_seed_names_the_seed_to_score_with(tmp_path):
    """Guards the masking check's message now that the mask seed is the run's: it says which seed to score with."""
    path = tmp_path / "losses.npy"
    _write_losses(path, _fingerprint())
    ours = {**_fingerprint(), "masking": {"mask_seed": 2, "mlm_probability": 0.15}}
    with pytest.raises(UserError, match=r"another masking .*`train.py score \.\.\. --seed_everything 2`"):
        load_irreducible_losses(str(path), ours)


def test_passes_read_counts_the_candidates_of_every_step():
    """Guards the arithmetic RhoLoss's pass check rests on: ceil(steps x candidates / batch) rank-batches, then
    ceil(batches / batches per pass)."""
    assert passes_read(10, 16, 8, 20) == 1 and passes_read(10, 16, 8, 19) == 2 and passes_read(10, 16, 8, 10) == 2
    assert passes_read(11, 16, 8, 10) == 3 and passes_read(1, 8, 8, 1) == 1 and passes_read(0, 8, 8, 5) == 1


def test_written_losses_load_back_with_a_sealed_sidecar(tmp_path):
    fields = {"examples": _fingerprint(), "passes": 1, "mean_loss": 2.0}
    one = np.arange(5, dtype=np.float32)[None, :]
    sidecar = write_irreducible_losses(tmp_path / "deep" / "one.npy", one, fields)
    assert np.load(tmp_path / "deep" / "one.npy").shape == (5,)  # one pass: (examples,)
    assert list(sidecar) == ["format", "examples", "passes", "mean_loss", "losses_sha256", "sha256"]
    assert json.loads(sidecar_path(tmp_path / "deep" / "one.npy").read_text()) == sidecar
    assert sidecar["losses_sha256"] == file_sha256(tmp_path / "deep" / "one.npy")
    assert not list((tmp_path / "deep").glob("*.partial*"))
    table, read = load_irreducible_losses(str(tmp_path / "deep" / "one.npy"), _fingerprint())
    assert read == sidecar and table.tolist() == one.tolist()
    two = np.stack([one[0], one[0] + 1])
    write_irreducible_losses(tmp_path / "two.npy", two, {**fields, "passes": 2})
    table, _ = load_irreducible_losses(str(tmp_path / "two.npy"), _fingerprint())
    assert table.shape == (2, 5) and table.tolist() == two.tolist()


def test_the_names_batch_selection_held_before_the_split_still_import():
    import callbacks.batch_selection as old
    import callbacks.rho_loss
    import core.irreducible_losses

    assert old.SelectiveBackprop is SelectiveBackprop and old.RhoLoss is RhoLoss
    assert old.score_training_examples is score_training_examples
    assert old.load_irreducible_model is callbacks.rho_loss.load_irreducible_model
    assert old.load_irreducible_losses is load_irreducible_losses and old.sidecar_path is sidecar_path
    assert old.IRREDUCIBLE_FORMAT == core.irreducible_losses.IRREDUCIBLE_FORMAT == "irreducible-losses/1"
    with pytest.raises(AttributeError, match="no attribute 'Selection'"):
        _ = old.Selection


# --------------------------------------------------------------------------- runs


class Batches(L.Callback):
    """Records, per training micro-batch, the optimizer step, the example ids and the loss."""

    def __init__(self):
        self.records = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records.append((trainer.global_step, batch[EXAMPLE_ID].tolist(), float(outputs["loss"])))


def _fit(tmp_path, corpus, selector, *, max_steps=12, accumulate=1, ckpt_path=None, every=0, budget=None,
         model=None, data=None, precision="32-true"):
    L.seed_everything(0)
    model = model or BertMLM(**tiny_bert_args(), learning_rate=5e-3)
    data = data or MLMDataModule(**tiny_mlm_data_args(corpus, batch_size=8))
    probe = Batches()
    callbacks = [selector, probe]
    if budget is not None:
        callbacks.append(budget)
    if every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every,
                                                             save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(max_steps=max_steps if budget is None else -1, accumulate_grad_batches=accumulate,
                        callbacks=callbacks, logger=False, enable_checkpointing=bool(every), enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=1000, check_val_every_n_epoch=None,
                        limit_val_batches=1, precision=precision, default_root_dir=tmp_path, max_epochs=-1)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, probe


def test_charged_rst_equals_the_hand_sum_of_scored_and_trained_examples(corpus_file, tmp_path):
    table = tmp_path / "table.json"
    table.write_text(json.dumps(seal({"format": "rst-table/1", "seq_len": 32, "micro_batch_size": 8,
                                      "fwd_bwd_seconds": [1.0, 1.0], "fwd_seconds": [0.25, 0.25],
                                      "optimizer_step_seconds": {"AdamW": 0.5}})))
    sb = SelectiveBackprop(beta=1.0, history=64)
    budget = RSTBudget(budget="20s", table=str(table))
    trainer, model, probe = _fit(tmp_path, corpus_file, sb, budget=budget, accumulate=2)
    steps = trainer.global_step
    scored = sb.candidate_batches * 8
    assert dict(model.work_ledger.counts) == {"fwd/2": scored, "fwd_bwd/2": steps * 16.0, "optimizer_step/AdamW": steps}
    # per step: 2 trained micro-batches x 1.0 + 0.5; per scored micro-batch of 8: 0.25
    assert budget.spent_seconds == pytest.approx(steps * 2.5 + sb.candidate_batches * 0.25)
    assert budget.selection_spent == pytest.approx(sb.candidate_batches * 0.25)
    assert budget.spent_seconds >= 20 and budget.spent_seconds - 20 < 2.5 + 0.25 * sb.candidate_batches / steps * 3
    assert all(len(ids) == 8 for _, ids, _ in probe.records)
    assert len(probe.records) == 2 * steps


def test_scoring_reports_the_checkpoint_budget_and_prices_its_forwards_with_the_clock_table(corpus_file, tmp_path):
    table = tmp_path / "table.json"
    table.write_text(json.dumps(seal({"format": "rst-table/1", "seq_len": 32, "micro_batch_size": 8,
                                      "fwd_bwd_seconds": [1.0, 1.0], "fwd_seconds": [0.25, 0.25],
                                      "optimizer_step_seconds": {"AdamW": 0.5}})))
    budget = RSTBudget(budget="5s", table=str(table))
    trainer, model, _ = _fit(tmp_path, corpus_file, SelectiveBackprop(beta=1.0, history=64), budget=budget)
    checkpoint = tmp_path / "irreducible.ckpt"
    trainer.save_checkpoint(checkpoint)
    data = MLMDataModule(**tiny_mlm_data_args(corpus_file, batch_size=8))
    sidecar = score_training_examples(trainer, model, data, checkpoint, tmp_path / "il.npy", batch_size=16)
    count = sidecar["examples"]["num_examples"]
    assert count == len(data.splits["train"]) and np.load(tmp_path / "il.npy").shape == (count,)
    assert sidecar["costs"]["training_rst_seconds"] == budget.spent_seconds >= 5
    assert sidecar["costs"]["scoring_rst_seconds"] == pytest.approx(count / 8 * 0.25)  # forward-only, 2 layers
    assert sidecar["costs"]["cost_table"] == str(table) and sidecar["active_layers"] == 2


@pytest.mark.slow
def test_a_wall_clock_budget_counts_the_scoring_time(corpus_file, tmp_path):
    sb = SelectiveBackprop(beta=1.0, history=64)
    budget = RSTBudget(budget="3s", mode="wall")
    trainer, _, _ = _fit(tmp_path, corpus_file, sb, budget=budget)
    assert budget.spent_seconds >= 3 and trainer.global_step > 0
    assert 0 < budget.selection_spent == pytest.approx(sb.scoring_wall_seconds, abs=1e-6)
    assert budget.selection_spent < budget.spent_seconds


def _users_rule():
    """The example rule of docs/adding-a-method.md (examples/my_methods): only its take_in is written."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from my_methods.easiest_half import EasiestHalf
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return EasiestHalf()


@pytest.mark.parametrize("make", [lambda: SelectiveBackprop(beta=1.0, history=40),
                                  lambda: UniformSelection(keep_probability=0.5), _users_rule],
                         ids=["selective-backprop", "uniform", "a-users-rule"])
def test_a_selection_resumed_at_step_6_trains_on_the_same_examples(make, corpus_file, tmp_path):
    _, _, full = _fit(tmp_path / "full", corpus_file, make(), max_steps=12, every=6)
    _, _, resumed = _fit(tmp_path / "resumed", corpus_file, make(), max_steps=12,
                         ckpt_path=tmp_path / "full" / "ckpt" / "step=6.ckpt")
    after = [r for r in full.records if r[0] > 6]  # steps are counted after each update
    assert [ids for _, ids, _ in resumed.records] == [ids for _, ids, _ in after]
    assert [loss for *_, loss in resumed.records] == pytest.approx([loss for *_, loss in after], rel=1e-5)


@pytest.mark.slow
def test_rho_loss_pipeline_fit_score_select_and_resume(corpus_file, tmp_path, capsys):
    out = tmp_path / "runs"
    common = ("--data.holdout_fraction", "0.2", "--trainer.max_steps", "8", "--data.batch_size", "8")
    irreducible = tiny_fit_args(corpus_file, out, "--data.train_split", "holdout", *common,
                                "--trainer.logger.init_args.name", "irreducible")
    cli.main(irreducible)
    losses = tmp_path / "il.npy"
    cli.main(["score", *irreducible[1:], "--ckpt_path", "last", "--output", str(losses), "--passes", "2"])
    assert f"wrote {losses}" in capsys.readouterr().out
    table = np.load(losses)
    sidecar = json.loads(sidecar_path(losses).read_text())
    assert table.dtype == np.float32 and table.shape == (2, sidecar["examples"]["num_examples"])
    assert sidecar["examples"]["split"] == "train" and sidecar["examples"]["holdout_fraction"] == 0.2
    assert 0 < table.mean() < 10 and not np.array_equal(table[0], table[1])  # each pass its own masks

    # the scores are the per-example losses of that checkpoint, with the training masks of each pass
    data = MLMDataModule(**tiny_mlm_data_args(corpus_file, batch_size=8, holdout_fraction=0.2, mlm_probability=0.25))
    data.setup("fit")  # the demo config's masking
    ckpt = torch.load(sidecar["checkpoint"], weights_only=True)
    model = BertMLM(**tiny_bert_args())
    model.load_state_dict(ckpt["state_dict"])
    batches = data._open_candidates(data.candidate_batches_per_pass())  # pass 1, rank-batch 0
    first = next(batches)
    assert first[PASS_INDEX].tolist() == [1] * 8
    expected = model.per_example_loss(first).numpy()
    assert table[1, first[EXAMPLE_ID].numpy()] == pytest.approx(expected, rel=1e-5)

    def rho_data():
        return MLMDataModule(**tiny_mlm_data_args(corpus_file, batch_size=8, holdout_fraction=0.2, mlm_probability=0.25))

    rho = RhoLoss(ratio=0.5, irreducible_losses=str(losses))
    trainer, model, probe = _fit(tmp_path / "rho", corpus_file, rho, max_steps=10, every=5,
                                 data=rho_data())
    assert rho.candidate_batches == 20 and dict(model.work_ledger.counts)["fwd/2"] == 160
    assert all(len(ids) == 8 for _, ids, _ in probe.records)
    _, _, resumed = _fit(tmp_path / "rho-resumed", corpus_file, RhoLoss(ratio=0.5, irreducible_losses=str(losses)),
                         max_steps=10, ckpt_path=tmp_path / "rho" / "ckpt" / "step=5.ckpt",
                         data=rho_data())
    after = [r for r in probe.records if r[0] > 5]
    assert [ids for _, ids, _ in resumed.records] == [ids for _, ids, _ in after]
    assert [loss for *_, loss in resumed.records] == pytest.approx([loss for *_, loss in after], rel=1e-5)

    with pytest.raises(UserError, match="another number of examples|another holdout fraction"):
        _fit(tmp_path / "wrong", corpus_file, RhoLoss(ratio=0.5, irreducible_losses=str(losses)), max_steps=2)


@pytest.mark.slow
def test_rho_loss_refuses_a_run_that_reads_past_the_scored_passes(corpus_file, tmp_path):
    """Guards the pass check: before, a run reading two passes with a file scored for one trained pass 1 with pass
    0's masks (and irreducible losses) while the baseline drew fresh masks; now it is refused in one line naming
    the command that scores enough passes, runs when the file holds them, and runs with a warning when reuse is
    allowed."""
    table = tmp_path / "table.json"
    table.write_text(json.dumps(seal({"format": "rst-table/1", "seq_len": 32, "micro_batch_size": 8,
                                      "fwd_bwd_seconds": [1.0, 1.0], "fwd_seconds": [0.25, 0.25],
                                      "optimizer_step_seconds": {"AdamW": 0.5}})))

    def data():
        return MLMDataModule(**tiny_mlm_data_args(corpus_file, batch_size=8, holdout_fraction=0.2))

    def budget():  # a step trains 8 examples (1 s), scores 16 candidates (0.5 s), steps AdamW (0.5 s): 2 RST-s
        return RSTBudget(budget=steps * 2.0 - 1, table=str(table))

    probe = data()
    probe.prepare_data()
    probe.setup("fit")
    per_pass = probe.candidate_batches_per_pass()
    steps = per_pass // 2 + 1  # 2 candidate micro-batches a step: a little more than one pass
    trainer, model = L.Trainer(logger=False), BertMLM(**tiny_bert_args())
    checkpoint = tmp_path / "irreducible.ckpt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    assert score_training_examples(trainer, model, data(), checkpoint, tmp_path / "one.npy")["passes"] == 1
    with pytest.raises(UserError, match=rf"RhoLoss: this run's {steps} optimizer steps read 2 passes of the training "
                                        rf"split, but .*one.npy was scored for 1: .* --passes 2 --seed_everything 0`, or "
                                        "set allow_pass_reuse: true") as error:
        _fit(tmp_path / "refused", corpus_file, RhoLoss(irreducible_losses=str(tmp_path / "one.npy")), budget=budget(),
             data=data())
    assert "\n" not in str(error.value)
    score_training_examples(trainer, model, data(), checkpoint, tmp_path / "two.npy", passes=2)
    rho = RhoLoss(irreducible_losses=str(tmp_path / "two.npy"))
    run, _, _ = _fit(tmp_path / "two", corpus_file, rho, budget=budget(), data=data())
    assert run.global_step == steps and rho.candidate_batches > per_pass  # it did read into the second pass
    with pytest.warns(UserWarning, match="allow_pass_reuse: true, so pass p is masked like pass p mod 1"):
        _fit(tmp_path / "reuse", corpus_file, RhoLoss(irreducible_losses=str(tmp_path / "one.npy"), allow_pass_reuse=True),
             budget=budget(), data=data())


def test_rho_loss_with_an_online_irreducible_model_charges_its_forwards(corpus_file, tmp_path):
    data = lambda: MLMDataModule(**tiny_mlm_data_args(corpus_file, batch_size=8, holdout_fraction=0.2))  # noqa: E731
    _fit(tmp_path / "il", corpus_file, SelectiveBackprop(), max_steps=3, every=3, data=data())
    rho = RhoLoss(ratio=0.5, irreducible_model=str(tmp_path / "il" / "ckpt" / "step=3.ckpt"))
    trainer, model, probe = _fit(tmp_path / "rho", corpus_file, rho, max_steps=4, data=data())
    assert dict(model.work_ledger.counts)["fwd/2"] == 2 * 4 * 16  # the model and the irreducible model, 16 per step
    with pytest.raises(UserError, match="irreducible model .* has 2 layers"):
        _fit(tmp_path / "bad", corpus_file, RhoLoss(irreducible_model=str(tmp_path / "il" / "ckpt" / "step=3.ckpt")),
             max_steps=1, data=data(), model=BertMLM(**tiny_bert_args(num_layers=3)))


@pytest.mark.slow
def test_t5_selective_backprop_with_accumulation_and_bf16(corpus_file, tmp_path):
    model = T5SpanCorruption(vocab_size=300, num_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16, max_seq_len=32,
                             learning_rate=1e-2)
    data = SpanCorruptionDataModule(corpus=tiny_mlm_data_args(corpus_file)["corpus"], vocab_size=300, seq_len=32,
                                    batch_size=8, validation_fraction=0.05, max_validation_sequences=16)
    sb = SelectiveBackprop(beta=1.0, history=64)
    trainer, model, probe = _fit(tmp_path, corpus_file, sb, max_steps=6, accumulate=2, model=model, data=data,
                                 precision="bf16-mixed")
    assert trainer.global_step == 6 and len(probe.records) == 12
    assert all(len(ids) == 8 for _, ids, _ in probe.records)
    assert dict(model.work_ledger.counts)["fwd/2"] == sb.candidate_batches * 8 > 12 * 8
    assert all(np.isfinite(loss) for *_, loss in probe.records)


@pytest.mark.slow
def test_selection_curves_and_the_rst_split_reach_tensorboard(corpus_file, tmp_path):
    args = tiny_fit_args(corpus_file, tmp_path, "--config", str(ROOT / "configs/bert/demo-selective-backprop.yaml"),
                         "--trainer.max_steps", "10")
    cli.main(args)
    curves = scalars(tmp_path / "bert-demo-selective-backprop" / "version_0")
    for tag in ("selection/keep_rate", "selection/candidates_per_step", "selection/score_kept_mean",
                "selection/score_rejected_mean"):
        assert [step for step, _ in curves[tag]] == [4, 9], tag
    assert all(0 < rate <= 1 for _, rate in curves["selection/keep_rate"])
    assert all(n >= 16 for _, n in curves["selection/candidates_per_step"])


def test_plan_charges_the_expected_scoring(capsys):
    cli.main(["plan", "--config", str(ROOT / "configs/bert/baseline.yaml"),
                "--config", str(ROOT / "configs/bert/selective-backprop.yaml")])
    plan = json.loads(capsys.readouterr().out)
    table = CostTable.load(ROOT / "configs/rst/bert-paper.json")
    per_step = 12 * table.fwd_bwd(16) + 24 * table.fwd(16)  # the paper: 24 x 0.09285 + 12 x 0.2253 = 4.93 s
    assert per_step == pytest.approx(4.932)
    assert plan["optimizer_steps"] == int(np.ceil(86400 / per_step))
    assert plan["scored_examples"] == pytest.approx(plan["optimizer_steps"] * 3072)
    assert plan["selection_rst_seconds"] == pytest.approx(plan["optimizer_steps"] * 24 * table.fwd(16))


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("overlay, name, callback", [
    ("configs/bert/demo-selective-backprop.yaml", "bert-demo-selective-backprop", "SelectiveBackprop"),
    ("examples/easiest-half.yaml", "bert-demo-easiest-half", "EasiestHalf"),  # a user's rule: only take_in written
], ids=["selective-backprop", "a-users-rule"])
def test_two_ddp_processes_select_on_their_own_and_step_together(overlay, name, callback, corpus_file, tmp_path):
    probe = tmp_path / "probe.yaml"
    probe.write_text(yaml.safe_dump({"trainer": {"callbacks+": [
        {"class_path": "ddp_probe.RecordActiveLayers", "init_args": {"directory": str(tmp_path / "records")}}]}}))
    args = tiny_fit_args(corpus_file, tmp_path, "--config", str(ROOT / overlay),
                         "--config", str(probe), "--trainer.max_steps", "6", "--trainer.accumulate_grad_batches", "2",
                         "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "examples")])})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 6 steps, 12,288 tokens" in result.stdout  # 6 steps x 2 ranks x 2 x 16 sequences x 32 tokens
    records = [json.loads((tmp_path / "records" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    training = [[r for r in rank if r[0] != "validation"] for rank in records]
    assert [r[0] for r in training[0]] == [r[0] for r in training[1]] == [s for s in range(6) for _ in range(2)]
    assert all(len(r[2]) == 16 for rank in training for r in rank)
    assert not {i for r in training[0] for i in r[2]} & {i for r in training[1] for i in r[2]}  # disjoint candidates
    ckpt = torch.load(tmp_path / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["callbacks"][callback]
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    scored = sum(rank["candidate_batches"] for rank in state["ranks"]) * 16
    assert ckpt["work_ledger"]["fwd/2"] == scored  # the ranks' own counts, summed
