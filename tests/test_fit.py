"""End-to-end: the CLI trains a tiny BERT on a generated corpus; the loss falls; TensorBoard has it."""

from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import ROOT


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tiny_fit_args(corpus, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config", str(ROOT / "configs/bert/demo.yaml"),
        "--config", str(ROOT / "tests/configs/step-budget.yaml"),
        "--data.source", "files",
        "--data.data_files", str(corpus),
        "--data.vocab_size", "200",
        "--data.seq_len", "32",
        "--data.batch_size", "16",
        "--data.validation_fraction", "0.05",
        "--data.max_validation_sequences", "64",
        "--model.num_layers", "2",
        "--model.hidden_size", "32",
        "--model.num_heads", "2",
        "--model.intermediate_size", "64",
        "--model.learning_rate", "5e-3",
        "--trainer.max_steps", "60",
        "--trainer.val_check_interval", "30",
        "--trainer.log_every_n_steps", "5",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(out),
        *extra,
    ]


def test_fit_loss_falls_and_tensorboard_holds_the_curves(corpus_file, tmp_path, capsys):
    train.main(tiny_fit_args(corpus_file, tmp_path))
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done: 60 steps, 30,720 tokens, final val/loss ")  # 60 x 16 x 32 tokens
    log_dir = tmp_path / "bert-demo" / "version_0"
    assert f"TensorBoard logs: {log_dir}" in summary
    scalars = _scalars(log_dir)
    for tag in ("train/loss", "val/loss", "lr/pg1", "perf/tokens_per_second"):
        assert tag in scalars, sorted(scalars)
    train_loss = [v for _, v in scalars["train/loss"]]
    assert len(train_loss) >= 10
    assert sum(train_loss[-3:]) / 3 < sum(train_loss[:3]) / 3 - 1.0, train_loss
    val_loss = [v for _, v in scalars["val/loss"]]
    assert val_loss[-1] < val_loss[0]
    # the learning rate follows the triangle: rises to its peak at mid-budget, ends at 0
    lr = dict(scalars["lr/pg1"])
    assert lr[max(lr)] < 5e-3 * 0.1 and max(lr.values()) > 5e-3 * 0.9
    # the checkpoint loads back and holds the trained weights
    checkpoint = log_dir / "checkpoints" / "last.ckpt"
    assert f"checkpoint: {checkpoint}" in summary
    from lightning_modules.bert_mlm import BertMLM

    restored = BertMLM.load_from_checkpoint(checkpoint)
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] == 60
    assert dict(restored.work_ledger.counts) == {"fwd_bwd/2": 960.0, "optimizer_step/AdamW": 60.0}
    for name, value in restored.state_dict().items():
        torch.testing.assert_close(value, state["state_dict"][name])
    assert (log_dir / "config.yaml").exists()
