import torch

from datamodules.collators import IGNORE_INDEX, MLMCollator, apply_mlm_masking

SPECIAL = (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK]
VOCAB = 1000


def _examples(n: int, seq_len: int = 128, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(5, VOCAB, (n, seq_len), generator=g)
    rows[:, ::16] = 3  # separators inside the packed stream
    return [{"input_ids": row.numpy(), "example_id": i} for i, row in enumerate(rows)]


def _collator(**kw) -> MLMCollator:
    return MLMCollator(mask_token_id=4, vocab_size=VOCAB, special_token_ids=SPECIAL, **kw)


def test_masking_rate_and_80_10_10_split_on_a_large_sample():
    torch.manual_seed(0)
    examples = _examples(2000)
    original = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
    batch = _collator()(examples)
    selected = batch["labels"] != IGNORE_INDEX
    eligible = original != 3
    rate = selected.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.005
    n = selected.sum().item()
    as_mask = (batch["input_ids"][selected] == 4).sum().item() / n
    unchanged = (batch["input_ids"][selected] == original[selected]).sum().item() / n
    replaced = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) < 0.01
    # a random replacement equals the original with probability 1/995: negligible
    assert abs(unchanged - 0.1) < 0.01
    assert abs(replaced - 0.1) < 0.01
    # labels hold the original token where selected, -100 elsewhere; unselected inputs are untouched
    assert torch.equal(batch["labels"][selected], original[selected])
    assert torch.equal(batch["input_ids"][~selected], original[~selected])


def test_special_tokens_are_never_masked_and_never_inserted():
    torch.manual_seed(1)
    examples = _examples(500)
    original = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
    batch = _collator()(examples)
    assert not (batch["labels"][original == 3] != IGNORE_INDEX).any()
    replaced = (batch["input_ids"] != original) & (batch["input_ids"] != 4)
    assert replaced.any()
    assert (batch["input_ids"][replaced] >= 5).all()


def test_validation_masks_depend_only_on_example_id():
    examples = _examples(64)
    collator = _collator(fixed_masks=True, seed=7)
    torch.manual_seed(0)
    first = collator(examples)
    torch.manual_seed(123)  # the global RNG must not matter
    second = collator(examples)
    assert torch.equal(first["input_ids"], second["input_ids"])
    assert torch.equal(first["labels"], second["labels"])
    # same example in a different batch and position: same mask
    reordered = collator(list(reversed(examples[10:20])))
    assert torch.equal(reordered["labels"][-1], first["labels"][10])
    # another seed gives other masks; training masks differ between calls
    assert not torch.equal(_collator(fixed_masks=True, seed=8)(examples)["labels"], first["labels"])
    training = _collator()
    assert not torch.equal(training(examples)["labels"], training(examples)["labels"])


def test_apply_mlm_masking_is_a_pure_function_of_its_noise():
    ids = torch.tensor([[10, 11, 12, 13]])
    select = torch.tensor([[0.0, 0.0, 0.0, 0.9]])
    action = torch.tensor([[0.1, 0.85, 0.95, 0.1]])
    random_tokens = torch.tensor([[99, 98, 97, 96]])
    special = torch.zeros_like(ids, dtype=torch.bool)
    masked, labels = apply_mlm_masking(ids, select, action, random_tokens, special, 4, 0.15)
    assert masked.tolist() == [[4, 98, 12, 13]]
    assert labels.tolist() == [[10, 11, 12, IGNORE_INDEX]]
