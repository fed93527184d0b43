"""End-to-end: the CLI trains a tiny BERT on a generated corpus; the loss falls; TensorBoard has it."""

import re

import pytest
import torch

import cli
from helpers import scalars, tiny_fit_args


@pytest.mark.slow
def test_fit_loss_falls_and_tensorboard_holds_the_curves(corpus_file, tmp_path, capsys):
    cli.main(tiny_fit_args(corpus_file, tmp_path))
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done: 60 steps, 30,720 tokens, final val/loss ")  # 60 x 16 x 32 tokens
    loss, entropy = map(float, re.search(r"val/loss ([\d.]+) \(unigram entropy of this corpus ([\d.]+)\)", summary).groups())
    assert 0 < loss < 9 and 2 < entropy < 9  # ln(200) = 5.3: both are real cross-entropies of this vocabulary
    log_dir = tmp_path / "bert-demo" / "version_0"
    assert f"TensorBoard logs: {log_dir}" in summary
    curves = scalars(log_dir)
    for tag in ("train/loss", "val/loss", "lr/decay", "lr/no_decay", "perf/tokens_per_second"):
        assert tag in curves, sorted(curves)
    train_loss = [v for _, v in curves["train/loss"]]
    assert len(train_loss) >= 10
    assert sum(train_loss[-3:]) / 3 < sum(train_loss[:3]) / 3 - 1.0, train_loss
    val_loss = [v for _, v in curves["val/loss"]]
    assert val_loss[-1] < val_loss[0]
    # the learning rate follows the triangle: rises to its peak at mid-budget, ends at 0
    lr = dict(curves["lr/decay"])
    assert lr[max(lr)] < 5e-3 * 0.1 and max(lr.values()) > 5e-3 * 0.9
    # the checkpoint loads back and holds the trained weights
    checkpoint = log_dir / "checkpoints" / "last.ckpt"
    assert f"checkpoint: {checkpoint}" in summary
    from lightning_modules.bert_mlm import BertMLM

    restored = BertMLM.load_from_checkpoint(checkpoint)
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] == 60
    assert dict(restored.work_before.counts) == {"fwd_bwd/2": 960.0, "optimizer_step/AdamW": 60.0}
    assert dict(restored.work_ledger.counts) == {}  # nothing done by this process since loading
    for name, value in restored.state_dict().items():
        torch.testing.assert_close(value, state["state_dict"][name])
    assert (log_dir / "config.yaml").exists()
    # programs read the same facts from summary.json
    from training.summary import read_summary

    written = read_summary(log_dir)
    assert written.line() == summary
    assert (written.status, written.optimizer_steps, written.tokens) == ("finished", 60, 30_720)
    assert round(written.val_loss, 4) == loss and round(written.unigram_entropy, 4) == entropy
    assert written.train_loss == pytest.approx(train_loss[-1])  # the last step is a logging step (every 5 of 60)
    assert written.rst_seconds is None and written.checkpoint == str(checkpoint)  # a step budget: no RST clock
