"""What a seed varies: ``seed_everything`` alone varies the training order, the training masks, selective
backprop's keep draws and layer dropping's drop draws; the validation split and masks stay fixed; seed 0 gives
the numbers of the fixed seeds before; a resume with another seed is refused (docs/comparing.md, "What a seed
varies")."""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import pytest
import torch

from callbacks.irreducible_scoring import score_training_examples
from callbacks.layer_dropping import LayerDropping
from callbacks.selective_backprop import SelectiveBackprop
from core.batch import EXAMPLE_ID, INPUT_IDS, LABELS, PASS_INDEX
from core.errors import UserError
from core.irreducible_losses import load_irreducible_losses
from core.seeds import resolve_seed, run_seed
from datamodules import MLMDataModule, SpanCorruptionDataModule
from helpers import files_corpus, tiny_bert_args, tiny_mlm_data_args
from lightning_modules.bert_mlm import BertMLM


def _data(corpus, seed: int | None, **overrides) -> MLMDataModule:
    """A tiny MLM data module set up under ``seed_everything(seed)`` (``None``: no seed set at all)."""
    if seed is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    else:
        L.seed_everything(seed, verbose=False)
    data = MLMDataModule(**tiny_mlm_data_args(corpus, batch_size=8, **overrides))
    data.prepare_data()
    data.setup("fit")
    return data


def _first_pass_ids(data) -> list[int]:
    return [i for batch in data.train_dataloader() for i in batch[EXAMPLE_ID].tolist()]


def _validation(data) -> list[dict]:
    return [{k: v.clone() for k, v in batch.items()} for batch in data.val_dataloader()]


def test_the_run_seed_is_what_seed_everything_recorded_and_zero_without_it(monkeypatch):
    """Guards the one source every default seed reads: ``PL_GLOBAL_SEED``, as Lightning records it."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert run_seed() == 0 and resolve_seed(None) == 0 and resolve_seed(4) == 4
    L.seed_everything(7, verbose=False)
    assert run_seed() == 7 and resolve_seed(None) == 7 and resolve_seed(0) == 0
    monkeypatch.setenv("PL_GLOBAL_SEED", "x")
    with pytest.raises(UserError, match="not an integer seed"):
        run_seed()


def test_the_training_order_follows_the_run_seed_and_seed_0_reads_the_cache_order(corpus_file):
    """Guards point 5's data order: before, every seed read the training sequences in the cache's order."""
    zero, unseeded, one = _data(corpus_file, 0), _data(corpus_file, None), _data(corpus_file, 1)
    per_pass = zero.candidate_batches_per_pass() * 8
    assert _first_pass_ids(zero) == list(range(per_pass)) == _first_pass_ids(unseeded)  # the cache's order
    order = _first_pass_ids(one)
    assert order != _first_pass_ids(zero) and len(set(order)) == len(order) == per_pass
    assert order == _first_pass_ids(_data(corpus_file, 1))  # one seed, one order
    assert _first_pass_ids(_data(corpus_file, 0, order_seed=1)) == order  # an explicit order seed wins
    # the rows read are the rows of those ids (the permutation changes the order, not the examples)
    batch = next(iter(one.train_dataloader()))
    rows = one.train_dataset[batch[EXAMPLE_ID].tolist()]
    selected = batch[LABELS] != -100
    assert torch.equal(batch[LABELS][selected], torch.as_tensor(rows[INPUT_IDS])[selected])


def test_training_masks_follow_the_run_seed_and_validation_masks_never_do(corpus_file):
    """Guards point 5's masks: before, the training masks were ``data.mask_seed``'s (0) at every seed, and the
    validation masks followed ``data.mask_seed``, so a study varying the mask seed would have moved its yardstick."""
    zero, one = _data(corpus_file, 0), _data(corpus_file, 1)
    examples = [{**{k: v[i] for k, v in zero.train_dataset[0:8].items()}, PASS_INDEX: 0} for i in range(8)]
    masked = {seed: data.make_collator(fixed=False)(examples) for seed, data in ((0, zero), (1, one))}
    assert not torch.equal(masked[0][LABELS], masked[1][LABELS])
    assert zero.masking_settings()["mask_seed"] == 0 and one.masking_settings()["mask_seed"] == 1
    explicit = _data(corpus_file, 1, mask_seed=0)
    assert torch.equal(explicit.make_collator(fixed=False)(examples)[LABELS], masked[0][LABELS])
    reference = _validation(zero)
    for other in (one, explicit, _data(corpus_file, 0, mask_seed=5)):
        batches = _validation(other)
        assert len(batches) == len(reference)
        for a, b in zip(reference, batches, strict=True):
            assert all(torch.equal(a[key], b[key]) for key in a)


def test_t5_corruption_follows_the_run_seed_but_not_in_validation(corpus_file):
    """Guards point 5 for span corruption: the same mechanism as MLM's masks."""
    def data(seed):
        L.seed_everything(seed, verbose=False)
        module = SpanCorruptionDataModule(corpus=files_corpus(corpus_file), vocab_size=300, seq_len=32, batch_size=8,
                                          validation_fraction=0.05, max_validation_sequences=16)
        module.prepare_data()
        module.setup("fit")
        return module

    zero, one = data(0), data(1)
    examples = [{**{k: v[i] for k, v in zero.train_dataset[0:8].items()}, PASS_INDEX: 0} for i in range(8)]
    assert not torch.equal(zero.make_collator(False)(examples)[INPUT_IDS], one.make_collator(False)(examples)[INPUT_IDS])
    a, b = next(iter(zero.val_dataloader())), next(iter(one.val_dataloader()))
    assert torch.equal(a[INPUT_IDS], b[INPUT_IDS]) and torch.equal(a[LABELS], b[LABELS])


def test_keep_and_drop_draws_follow_the_run_seed_unless_set():
    """Guards point 5's selection and drop draws: before, both callbacks drew with seed 0 at every run seed."""
    L.seed_everything(0, verbose=False)
    draws0 = [LayerDropping().draw(0.5, step, 8) for step in range(40)]
    assert LayerDropping().draw_seed == 0 and SelectiveBackprop().keep_seed == 0
    L.seed_everything(1, verbose=False)
    dropping, explicit = LayerDropping(), LayerDropping(seed=0)
    assert dropping.draw_seed == 1 and SelectiveBackprop().keep_seed == 1 and SelectiveBackprop(seed=3).keep_seed == 3
    assert [dropping.draw(0.5, step, 8) for step in range(40)] != draws0
    assert [explicit.draw(0.5, step, 8) for step in range(40)] == draws0


# --------------------------------------------------------------------------- fits


class Record(L.Callback):
    """Per training micro-batch: example ids, labels and active layers; per validation batch: the batch."""

    def __init__(self) -> None:
        self.train, self.layers, self.validation, self.losses = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.layers.append(tuple(pl_module.active_layers))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append((batch[EXAMPLE_ID].tolist(), batch[LABELS].tolist()))
        self.losses.append(float(outputs["loss"]))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.validation.append({k: v.tolist() for k, v in batch.items()})


def _fit(tmp_path, corpus, seed: int, callbacks, *, max_steps=8, ckpt_path=None, every=0, data=None, model_args=None):
    L.seed_everything(seed, verbose=False)
    model = BertMLM(**tiny_bert_args(**(model_args or {})), learning_rate=5e-3)
    data = data or MLMDataModule(**tiny_mlm_data_args(corpus, batch_size=8))
    record = Record()
    extra = []
    if every:
        extra.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every,
                                                         save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(max_steps=max_steps, callbacks=[*callbacks, record, *extra], logger=False,
                        enable_checkpointing=bool(every), enable_progress_bar=False, enable_model_summary=False,
                        val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=2, max_epochs=-1,
                        default_root_dir=tmp_path)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, record


def _methods(**seeds):
    return [SelectiveBackprop(beta=1.0, history=64, seed=seeds.get("keep")),
            LayerDropping(gamma_f=100.0, theta_bar=0.5, seed=seeds.get("drop"))]


@pytest.mark.slow
def test_two_seeds_differ_in_order_masks_and_draws_but_validate_on_identical_batches(corpus_file, tmp_path):
    """Guards point 5 end to end: before, seeds 0 and 1 trained on the same examples with the same masks, kept
    with the same draws and dropped the same layers; only the initialisation differed."""
    methods = {0: _methods(), 1: _methods()}
    runs = {seed: _fit(tmp_path / f"seed{seed}", corpus_file, seed, methods[seed], model_args={"num_layers": 4})[1]
            for seed in (0, 1)}
    zero, one = runs[0], runs[1]
    assert [ids for ids, _ in zero.train] != [ids for ids, _ in one.train]  # another order (and other keeps)
    assert zero.layers != one.layers  # other drop draws
    assert (methods[0][0].keep_seed, methods[1][0].keep_seed, methods[0][1].draw_seed, methods[1][1].draw_seed) == (0, 1, 0, 1)
    # the masks of an example both runs trained on in pass 0 differ
    labels0 = {i: row for ids, labels in zero.train for i, row in zip(ids, labels, strict=True)}
    labels1 = {i: row for ids, labels in one.train for i, row in zip(ids, labels, strict=True)}
    shared = sorted(set(labels0) & set(labels1))
    assert shared and any(labels0[i] != labels1[i] for i in shared)
    assert zero.validation and zero.validation == one.validation  # the same yardstick

    # seed 0 with the defaults is the run with every seed fixed at 0 explicitly (the numbers of before)
    explicit = MLMDataModule(**tiny_mlm_data_args(corpus_file, batch_size=8, order_seed=0, mask_seed=0))
    _, fixed = _fit(tmp_path / "explicit", corpus_file, 0, _methods(keep=0, drop=0), data=explicit,
                    model_args={"num_layers": 4})
    assert fixed.train == zero.train and fixed.layers == zero.layers and fixed.losses == zero.losses


@pytest.mark.slow
def test_a_resume_with_another_seed_is_refused(corpus_file, tmp_path):
    """Guards the checkpoint's record of the seeds: before, a run resumed under another seed silently continued
    with other masks (and, for selective backprop, other keep draws)."""
    _fit(tmp_path / "run", corpus_file, 0, [SelectiveBackprop(beta=1.0, history=64)], max_steps=4, every=2)
    checkpoint = tmp_path / "run" / "ckpt" / "step=2.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["MLMDataModule"]["seeds"] == {"order_seed": 0, "mask_seed": 0}
    with pytest.raises(UserError, match="data.order_seed=1, but the checkpoint was trained with data.order_seed=0"):
        _fit(tmp_path / "other", corpus_file, 1, [SelectiveBackprop(beta=1.0, history=64)], max_steps=4,
             ckpt_path=checkpoint)
    data = MLMDataModule(**tiny_mlm_data_args(corpus_file, batch_size=8, order_seed=0, mask_seed=0))
    with pytest.raises(UserError, match="SelectiveBackprop seed=1, but the checkpoint was trained with .*seed=0"):
        _fit(tmp_path / "other-keeps", corpus_file, 1, [SelectiveBackprop(beta=1.0, history=64)], max_steps=4,
             ckpt_path=checkpoint, data=data)
    _fit(tmp_path / "same", corpus_file, 0, [SelectiveBackprop(beta=1.0, history=64)], max_steps=4,
         ckpt_path=checkpoint)  # the same seed resumes


def _checkpoint(tmp_path, model) -> str:
    """A checkpoint of ``model``'s weights, as ``score_training_examples`` reads one."""
    path = tmp_path / "irreducible.ckpt"
    if not path.exists():
        torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


def test_scored_files_record_the_run_seed_as_their_mask_seed(corpus_file, tmp_path):
    """Guards what RhoLoss matches: ``train.py score`` under ``--seed_everything S`` scores seed S's masks."""
    model = BertMLM(**tiny_bert_args())
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    files = {}
    for seed in (0, 3):
        L.seed_everything(seed, verbose=False)
        data = MLMDataModule(**tiny_mlm_data_args(corpus_file, batch_size=8))
        files[seed] = score_training_examples(trainer, model, data, _checkpoint(tmp_path, model), tmp_path / f"{seed}.npy")
        assert files[seed]["examples"]["masking"]["mask_seed"] == seed
    assert not np.array_equal(np.load(tmp_path / "0.npy"), np.load(tmp_path / "3.npy"))
    with pytest.raises(UserError, match="another masking .*--seed_everything 3"):
        load_irreducible_losses(str(tmp_path / "0.npy"), data.examples_fingerprint("train"))
