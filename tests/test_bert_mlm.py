import pytest
import torch
import torch.nn.functional as F

from core.errors import UserError
from datamodules.collators import MLMCollator
from helpers import tiny_bert_args
from lightning_modules.bert_mlm import BertMLM


def _batch(batch_size=4, seq_len=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (batch_size, seq_len), generator=g)
    examples = [{"input_ids": row.numpy(), "example_id": i} for i, row in enumerate(ids)]
    return MLMCollator(mask_token_id=4, vocab_size=200, special_token_ids=(0, 1, 2, 3, 4), fixed_masks=True)(examples)


def _model(**kw):
    torch.manual_seed(0)
    return BertMLM(**tiny_bert_args(**kw))


def test_sparse_prediction_loss_equals_dense_loss_on_masked_positions():
    model, batch = _model(), _batch()
    sparse, targets = model.compute_loss(batch)
    dense = model.model(input_ids=batch["input_ids"], labels=batch["labels"])  # the stock HF loss
    assert targets == int((batch["labels"] != -100).sum())
    torch.testing.assert_close(sparse, dense.loss, rtol=1e-5, atol=1e-6)
    manual = F.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    torch.testing.assert_close(sparse, manual, rtol=1e-5, atol=1e-6)


def test_per_example_loss_is_the_training_loss_per_example():
    model, batch = _model(), _batch(batch_size=6)
    model.train()
    per_example = model.per_example_loss(batch)
    assert per_example.shape == (6,) and not per_example.requires_grad
    assert model.training  # mode restored
    counts = (batch["labels"] != -100).sum(1).float()
    loss, _ = model.compute_loss(batch)
    torch.testing.assert_close((per_example * counts).sum() / counts.sum(), loss.detach(), rtol=1e-5, atol=1e-6)
    # example 0 alone gives the same number
    alone = {k: v[:1] for k, v in batch.items()}
    torch.testing.assert_close(model.per_example_loss(alone)[0], per_example[0], rtol=1e-5, atol=1e-6)


def test_inactive_layers_are_skipped_get_no_gradient_and_change_the_output():
    model, batch = _model(num_layers=4), _batch()
    calls = [0] * 4
    for i, layer in enumerate(model.layer_stacks()[0]):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    full = model(batch["input_ids"]).detach()
    assert calls == [1, 1, 1, 1]
    model.set_active_layers([0, 2])
    assert model.active_layers == (0, 2) and model.num_active_layers == 2
    model.zero_grad()
    loss, _ = model.compute_loss(batch)
    loss.backward()
    assert calls == [2, 1, 2, 1]  # layers 1 and 3 did not run
    stack = model.layer_stacks()[0]
    for i in (1, 3):
        assert all(p.grad is None for p in stack[i].parameters())
    for i in (0, 2):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack[i].parameters())
    assert not torch.allclose(model(batch["input_ids"]), full)
    # the state dict always holds every layer, and None restores the full model
    assert sum(k.startswith("model.roberta_prelayernorm.encoder.layer.3.") for k in model.state_dict())
    model.set_active_layers(None)
    torch.testing.assert_close(model(batch["input_ids"]), full)


def test_empty_or_out_of_range_layer_selection_is_an_error():
    model = _model()
    with pytest.raises(UserError, match="empty selection"):
        model.set_active_layers([])
    with pytest.raises(UserError, match="outside"):
        model.set_active_layers([0, 5])


def test_training_step_charges_the_ledger_with_the_active_layers():
    model, batch = _model(num_layers=4), _batch(batch_size=5)
    model.set_active_layers([0, 1, 2])
    model.training_step(batch, 0)
    model.set_active_layers(None)
    model.training_step(batch, 1)
    assert dict(model.work_ledger.counts) == {"fwd_bwd/3": 5.0, "fwd_bwd/4": 5.0}


def test_no_weight_decay_on_biases_and_norm_weights():
    from lightning_modules.parameter_groups import parameter_groups

    model = _model()
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] or "layer_norm" in names[id(p)]
               for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_bad_model_shapes_are_user_errors():
    with pytest.raises(UserError, match="divisible"):
        BertMLM(**tiny_bert_args(hidden_size=30, num_heads=4))
    with pytest.raises(UserError, match="num_layers"):
        BertMLM(**tiny_bert_args(num_layers=0))
