"""T5 span corruption: collator statistics, tokenizer, module contracts, optimizer, end-to-end fit."""

import math

import numpy as np
import pytest
import torch

import cli
from core.errors import UserError
from datamodules import SpanCorruptionDataModule
from datamodules.collators import (
    SpanCorruptionCollator,
    random_spans_noise_mask,
    span_corruption,
    span_corruption_lengths,
)
from helpers import ROOT, files_corpus, scalars
from lightning_modules.optimizers import AdamWScale
from lightning_modules.t5_span_corruption import T5SpanCorruption

VOCAB = 1000
SENTINELS = list(range(VOCAB - 1, VOCAB - 101, -1))  # <extra_id_0> has the largest id, as in T5


def test_span_corruption_lengths_are_the_papers_568_and_114_for_512_tokens():
    assert span_corruption_lengths(512, 0.15, 3.0) == (568, 114)
    assert span_corruption_lengths(128) == (141, 29)


def _collator(inputs_length=512, **kw):
    return SpanCorruptionCollator(inputs_length=inputs_length, sentinel_ids=SENTINELS, eos_id=1, **kw)


def _examples(n, raw_length, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(3, VOCAB - 100, raw_length), "example_id": i} for i in range(n)]


def test_noise_density_and_mean_span_length_on_a_large_sample():
    rng = np.random.default_rng(0)
    masks = np.stack([random_spans_noise_mask(568, 0.15, 3.0, rng) for _ in range(2000)])
    assert masks.mean() == pytest.approx(85 / 568)  # round(568 x 0.15) = 85 noise tokens, every time
    starts = masks & ~np.pad(masks, [[0, 0], [1, 0]])[:, :-1]
    assert masks.sum() / starts.sum() == pytest.approx(85 / 28)  # 28 spans: mean length 3.04
    assert not masks[:, 0].any()  # spans interleave starting with non-noise
    # span lengths vary (random segmentation), their mean is what was asked
    lengths = np.diff(np.flatnonzero(np.diff(np.pad(masks[0].astype(int), 1))))[::2]
    assert lengths.min() >= 1 and lengths.max() > 3


def test_lengths_are_exact_sentinels_in_order_and_every_token_recoverable():
    collator = _collator()
    examples = _examples(64, 568)
    batch = collator(examples)
    assert batch["input_ids"].shape == (64, 512) and batch["labels"].shape == (64, 114)
    for example, inputs, targets in zip(examples, batch["input_ids"].numpy(), batch["labels"].numpy(), strict=True):
        assert inputs[-1] == 1 and targets[-1] == 1
        in_sentinels = [t for t in inputs if t in SENTINELS]
        out_sentinels = [t for t in targets if t in SENTINELS]
        assert in_sentinels == out_sentinels == SENTINELS[: len(in_sentinels)] and len(in_sentinels) == 28
        # merge: replace each sentinel of the input by the span that follows it in the target
        spans, current = {}, None
        for token in targets[:-1]:
            if token in SENTINELS:
                current = token
                spans[current] = []
            else:
                spans[current].append(token)
        merged = [t for token in inputs[:-1] for t in (spans[token] if token in SENTINELS else [token])]
        assert merged == list(example["input_ids"])


def test_validation_corruption_is_fixed_per_example_and_training_differs():
    examples = _examples(8, 141)
    fixed = _collator(128, fixed_masks=True, seed=3)
    torch.manual_seed(0)
    first = fixed(examples)
    torch.manual_seed(1)
    assert torch.equal(fixed(examples)["input_ids"], first["input_ids"])
    assert torch.equal(fixed(examples[3:4])["labels"][0], first["labels"][3])
    training = _collator(128)
    assert not torch.equal(training(examples)["input_ids"], training(examples)["input_ids"])


def test_span_corruption_of_a_worked_example_gives_the_sentinel_layout():
    tokens = np.array([10, 11, 12, 13, 14, 15])
    mask = np.array([False, True, True, False, False, True])  # T5 masks end with a noise span
    inputs, targets = span_corruption(tokens, mask, np.array([99, 98]), eos_id=1)
    assert inputs.tolist() == [10, 99, 13, 14, 98, 1]
    assert targets.tolist() == [99, 11, 12, 98, 15, 1]


def test_the_t5_tokenizer_puts_pad_eos_unk_first_and_the_sentinels_last(corpus_file, tmp_path):
    from transformers import AutoTokenizer

    dm = SpanCorruptionDataModule(corpus=files_corpus(corpus_file), vocab_size=300, seq_len=32,
                                  batch_size=8, validation_fraction=0.05, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    loaded = AutoTokenizer.from_pretrained(dm.cache_path / "tokenizer")
    assert [loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id] == [0, 1, 2]
    sentinels = loaded.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert sentinels == list(range(len(loaded) - 1, len(loaded) - 101, -1))
    ids = loaded("the cat sees the house.")["input_ids"]
    assert ids[-1] == 1 and loaded.decode(ids, skip_special_tokens=True) == "the cat sees the house."
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 32) and batch["labels"].shape == (8, dm.targets_length)
    assert dm.raw_sequence_length == span_corruption_lengths(32)[0]


def _model(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=VOCAB, num_layers=3, d_model=32, d_ff=64, num_heads=2, d_kv=16)
    args.update(kw)
    return T5SpanCorruption(**args)


def _batch(n=4, inputs_length=32, seed=0):
    collator = _collator(inputs_length, fixed_masks=True)
    return collator(_examples(n, collator.raw_length, seed))


def test_per_example_loss_matches_the_training_loss():
    model, batch = _model(), _batch(6)
    loss, targets = model.compute_loss(batch)
    assert targets == batch["labels"].numel()
    torch.testing.assert_close(model.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss, loss)
    per_example = model.per_example_loss(batch)
    assert per_example.shape == (6,) and not per_example.requires_grad
    torch.testing.assert_close(per_example.mean(), loss.detach(), rtol=1e-5, atol=1e-6)  # equal target lengths


@pytest.mark.slow
def test_the_loss_is_computed_once_per_step(monkeypatch):
    """The stock model computes a full-vocabulary loss when it gets ``labels``; the module must not ask for it,
    and computes its own once, with the output projection fused into it (no separate logits)."""
    import lightning_modules.t5_span_corruption as t5_module

    model, batch = _model(), _batch(6)
    cross_entropy_calls, fused_calls = [], []
    original_ce, original_fused = torch.nn.functional.cross_entropy, t5_module.linear_cross_entropy

    def counting_ce(*args, **kwargs):
        cross_entropy_calls.append(args[0].shape)
        return original_ce(*args, **kwargs)

    def counting_fused(hidden, weight, *args, **kwargs):
        fused_calls.append((tuple(hidden.shape), tuple(weight.shape)))
        return original_fused(hidden, weight, *args, **kwargs)

    def no_logits(*args, **kwargs):
        raise AssertionError("the training loss must not materialise lm_head logits")

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", counting_ce)
    monkeypatch.setattr(t5_module, "linear_cross_entropy", counting_fused)
    monkeypatch.setattr(model.model.lm_head, "forward", no_logits)
    model.compute_loss(batch)[0].backward()
    assert cross_entropy_calls == []
    d_model = model.model.config.d_model
    assert fused_calls == [((6, batch["labels"].shape[1], d_model), (VOCAB, d_model))]


@pytest.mark.slow
def test_the_output_head_is_untied_from_the_input_embedding():
    model = _model()
    head, embedding = model.model.lm_head.weight, model.model.shared.weight
    assert head is not embedding and head.data_ptr() != embedding.data_ptr()
    assert not torch.equal(head, embedding)
    assert model.model.config.tie_word_embeddings is False
    # the paper-scale configuration has exactly google/t5-v1_1-base's parameters: 2 x 32128 x 768 for the
    # (untied) embedding and head, 12 encoder blocks of 7,079,424, 12 decoder blocks of 9,439,488, and the
    # relative position biases (32 x 12, encoder and decoder) and final norms (768 each)
    count = sum(p.numel() for p in T5SpanCorruption().parameters())
    assert count == 2 * 32128 * 768 + 12 * 7_079_424 + 12 * 9_439_488 + 2 * (32 * 12 + 768) == 247_577_856


def test_the_untied_head_survives_save_and_load_pretrained(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model, batch = _model(), _batch(2)
    with torch.no_grad():  # train the head apart from the embedding, so a re-tie would show
        model.model.lm_head.weight.add_(0.5)
    model.model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is not loaded.shared.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.model.lm_head.weight)
    torch.testing.assert_close(loaded.shared.weight, model.model.shared.weight)
    model.eval()
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["labels"])
        decoder_input_ids = loaded._shift_right(batch["labels"])
        actual = loaded(input_ids=batch["input_ids"], decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(actual, expected)


def test_turning_blocks_off_changes_the_output_and_inactive_blocks_get_no_gradient():
    model, batch = _model(), _batch()
    full = model(batch["input_ids"], batch["labels"]).detach()
    model.set_active_layers([0, 2])
    model.zero_grad()
    loss, _ = model.compute_loss(batch)
    loss.backward()
    assert not torch.allclose(model(batch["input_ids"], batch["labels"]), full)
    encoder, decoder = model.layer_stacks()
    for stack in (encoder, decoder):
        assert all(p.grad is None for p in stack[1].parameters())
        assert all(p.grad is not None for p in stack[2].parameters())
    with pytest.raises(UserError, match="layer 0 cannot be switched off"):
        model.set_active_layers([1, 2])
    model.set_active_layers(None)
    torch.testing.assert_close(model(batch["input_ids"], batch["labels"]), full)


def test_adamwscale_matches_a_hand_computed_step():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # RMS = 5 / sqrt(2)
    optimizer = AdamWScale([p], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    p.grad = torch.tensor([1.0, -2.0])
    optimizer.step()
    # first step: bias-corrected m / sqrt(v) = sign(g), and the step is lr x RMS(theta)
    rms = 5 / math.sqrt(2)
    expected = torch.tensor([3.0, 4.0]) - 0.1 * rms * torch.tensor([1.0, -1.0])
    torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-4)
    small = torch.nn.Parameter(torch.zeros(3))  # RMS 0: the scale is floored at 1e-3
    opt2 = AdamWScale([small], lr=1.0)
    small.grad = torch.ones(3)
    opt2.step()
    torch.testing.assert_close(small.detach(), torch.full((3,), -1e-3), rtol=1e-3, atol=1e-6)


def test_adamwscale_fused_and_foreach_updates_agree(monkeypatch):
    """The CPU path (PyTorch's fused AdamW kernel with rescaled rate and epsilon) and the foreach path
    (used on GPUs) compute the same update, also when a tensor skips steps (no gradient) and with decay."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(30, 20), (7,), (50,)]
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    gradients = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(6)]

    def run(fused: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(AdamWScale, "_fusable", staticmethod(lambda params: fused))
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = AdamWScale(params, lr=1e-2, weight_decay=0.1)
        for step, grads in enumerate(gradients):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            if step % 3 == 0:
                params[2].grad = None
            optimizer.step()
        return [p.detach() for p in params]

    for fused, looped in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(fused, looped, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_t5_fit_loss_falls_and_the_checkpoint_loads(corpus_file, tmp_path, capsys):
    cli.main([
        "fit",
        "--config", str(ROOT / "configs/t5/demo.yaml"),
        "--config", str(ROOT / "tests/configs/step-budget.yaml"),
        "--data.corpus.source", "files", "--data.corpus.data_files", str(corpus_file),
        "--data.vocab_size", "300", "--data.seq_len", "32", "--data.batch_size", "16",
        "--data.validation_fraction", "0.05", "--data.max_validation_sequences", "64",
        "--model.num_layers", "2", "--model.d_model", "32", "--model.d_ff", "64",
        "--model.num_heads", "2", "--model.d_kv", "16",
        "--trainer.max_steps", "60", "--trainer.val_check_interval", "30",
        "--trainer.log_every_n_steps", "5", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"done: 60 steps, {60 * 16 * span_corruption_lengths(32)[0]:,} tokens")
    log_dir = tmp_path / "t5-demo" / "version_0"
    curves = scalars(log_dir)
    losses = [v for _, v in curves["train/loss"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses
    assert "val/loss" in curves and "lr/decay" in curves
    restored = T5SpanCorruption.load_from_checkpoint(log_dir / "checkpoints" / "last.ckpt")
    assert restored.num_layers == 2 and dict(restored.work_before.counts)["fwd_bwd/2"] == 960.0
    assert dict(restored.work_before.counts)["optimizer_step/AdamWScale"] == 60.0


def test_plan_and_calibrate_work_for_t5(tmp_path, capsys):
    import json

    from core.cost_table import CostTable

    cli.main(["plan", "--config", str(ROOT / "configs/t5/baseline.yaml"), "--budget", "6h"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["optimizer_steps"] == 20951 and plan["micro_batches"] == 2 * 20951  # docs/paper.md: about 20,951
    assert plan["optimizer"] == "AdamWScale" and plan["tokens"] == 20951 * 144 * 568
    output = tmp_path / "t5.json"
    cli.main([
        "calibrate", "--output", str(output), "--warmup", "0", "--iterations", "1", "--rounds", "1",
        "--config", str(ROOT / "configs/t5/demo.yaml"), "--data.vocab_size", "300", "--data.seq_len", "32",
        "--data.batch_size", "4", "--model.num_layers", "2", "--model.d_model", "32", "--model.d_ff", "64",
        "--model.num_heads", "2", "--model.d_kv", "16",
    ])
    table = CostTable.load(output)
    assert (table.micro_batch_size, table.seq_len, table.max_layers) == (4, 32, 2)
    assert set(table.optimizer_step_seconds) == {"AdamWScale"}
