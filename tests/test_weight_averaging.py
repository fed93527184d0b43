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
