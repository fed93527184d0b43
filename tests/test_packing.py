from collections import Counter

import numpy as np
import pytest

from datamodules import MLMDataModule
from datamodules.packed_cache import PACK_BLOCK_DOCUMENTS, PackedCache, split_documents
from datamodules.packing import pack_token_stream
from helpers import files_corpus, tiny_mlm_data_args


def test_pack_token_stream_loses_only_the_declared_remainder():
    rng = np.random.default_rng(0)
    documents = [rng.integers(10, 50, size=rng.integers(1, 40)).tolist() for _ in range(100)]
    chunks, remainder = pack_token_stream(documents, seq_len=16, separator_id=3)
    stream = [t for doc in documents for t in [*doc, 3]]
    assert remainder == len(stream) % 16
    assert all(len(c) == 16 for c in chunks)
    assert [t for c in chunks for t in c] == stream[: len(stream) - remainder]


def test_pack_token_stream_without_separator_and_bad_length():
    chunks, remainder = pack_token_stream([[1, 2, 3], [4, 5]], seq_len=2, separator_id=None)
    assert chunks == [[1, 2], [3, 4]] and remainder == 1
    with pytest.raises(ValueError):
        pack_token_stream([[1]], seq_len=0, separator_id=None)


def _built(corpus, cache_dir, **kw):
    dm = MLMDataModule(**tiny_mlm_data_args(corpus, cache_dir=str(cache_dir), **kw))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_packed_training_split_is_the_token_stream_cut_into_sequences(corpus_file, tmp_path):
    dm = _built(corpus_file, tmp_path)
    documents, _ = files_corpus(corpus_file).load(tmp_path)
    train_docs = split_documents(documents, dm.validation_fraction, dm.split_seed)["train"]
    encoded = dm.tokenizer(list(train_docs["text"]), add_special_tokens=False)["input_ids"]
    expected, dropped = [], 0
    for start in range(0, len(encoded), PACK_BLOCK_DOCUMENTS):
        chunks, remainder = pack_token_stream(encoded[start : start + PACK_BLOCK_DOCUMENTS], 32, dm.tokenizer.sep_token_id)
        expected += chunks
        dropped += remainder
    packed = [tuple(row) for row in dm.train_dataset[:]["input_ids"].tolist()]
    # the same multiset of sequences: no token lost or duplicated except the declared remainder
    assert Counter(packed) == Counter(tuple(c) for c in expected)
    meta = dm.stats["train"]
    assert meta["dropped_remainder_tokens"] == dropped < 32 * (len(encoded) // PACK_BLOCK_DOCUMENTS + 1)
    assert meta["packed_tokens"] + dropped == meta["stream_tokens"] == sum(len(e) + 1 for e in encoded)
    assert meta["sequences"] == len(packed)
    np.testing.assert_array_equal(dm.train_dataset[:]["example_id"], np.arange(len(packed)))
    np.testing.assert_array_equal(dm.val_dataset[:]["example_id"], np.arange(len(dm.val_dataset)))


def test_ids_and_sequences_are_stable_across_runs_and_the_cache_is_reused(corpus_file, tmp_path, monkeypatch):
    first = _built(corpus_file, tmp_path / "a")
    # an independent rebuild with the same tokenizer (`tokenizers` training may break ties differently)
    second = _built(corpus_file, tmp_path / "b", tokenizer_path=str(first.cache_path / "tokenizer"))
    assert second.cache_path != first.cache_path
    for split in ("train_dataset", "val_dataset"):
        np.testing.assert_array_equal(getattr(first, split)[:]["input_ids"], getattr(second, split)[:]["input_ids"])
        np.testing.assert_array_equal(getattr(first, split)[:]["example_id"], getattr(second, split)[:]["example_id"])

    def no_rebuild(self, staging, num_proc):
        raise AssertionError("the second run must reuse the cache")

    monkeypatch.setattr(PackedCache, "_build_into", no_rebuild)
    third = _built(corpus_file, tmp_path / "a")
    np.testing.assert_array_equal(first.train_dataset[:]["input_ids"], third.train_dataset[:]["input_ids"])
    # a setting that changes the result changes the key
    other = MLMDataModule(**tiny_mlm_data_args(corpus_file, cache_dir=str(tmp_path / "a"), seq_len=16))
    assert other.cache_path != first.cache_path


def test_tokenizer_is_saved_as_a_transformers_fast_tokenizer(corpus_file, tmp_path):
    from transformers import AutoTokenizer

    dm = _built(corpus_file, tmp_path)
    loaded = AutoTokenizer.from_pretrained(dm.cache_path / "tokenizer")
    assert loaded.is_fast
    assert [loaded.pad_token_id, loaded.cls_token_id, loaded.sep_token_id, loaded.mask_token_id] == [0, 2, 3, 4]
    ids = loaded("The cat sees the house.")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3
    assert loaded.decode(ids[1:-1]) == "the cat sees the house."


def test_canonical_vocabulary_numbers_specials_then_alphabet_then_merges():
    from datamodules.tokenizer_training import canonical_vocabulary

    trained = {"[PAD]": 0, "[UNK]": 1, "##ng": 2, "b": 3, "the": 4, "a": 5, "##a": 6, "##ad": 7}
    assert canonical_vocabulary(trained, ["[PAD]", "[UNK]"]) == {
        "[PAD]": 0, "[UNK]": 1, "##a": 2, "a": 3, "b": 4, "##ad": 5, "##ng": 6, "the": 7,
    }


def test_a_given_tokenizer_must_exist_and_fit(corpus_file, tmp_path):
    from core.errors import UserError

    with pytest.raises(UserError, match="holds no tokenizer.json"):
        MLMDataModule(**tiny_mlm_data_args(corpus_file, tokenizer_path=str(tmp_path)))
    first = _built(corpus_file, tmp_path / "a")
    small = MLMDataModule(**tiny_mlm_data_args(corpus_file, cache_dir=str(tmp_path / "b"), vocab_size=100,
                                               tokenizer_path=str(first.cache_path / "tokenizer")))
    with pytest.raises(UserError, match=r"has \d+ tokens, more than data.vocab_size=100"):
        small.prepare_data()
    assert not any((tmp_path / "b" / "packed").iterdir())  # nothing half-written


@pytest.mark.slow
def test_packed_sequences_do_not_depend_on_the_number_of_processes(tmp_path):
    """Packing works in blocks of documents fixed by index, so ``num_proc`` cannot move a block boundary."""
    from helpers import make_corpus

    corpus = make_corpus(tmp_path / "long.txt", documents=2 * PACK_BLOCK_DOCUMENTS + 300, seed=1)
    one = _built(corpus, tmp_path / "one")
    tokenizer = str(one.cache_path / "tokenizer")
    two = _built(corpus, tmp_path / "two", num_proc=2, tokenizer_path=tokenizer)
    three = _built(corpus, tmp_path / "three", num_proc=3, tokenizer_path=tokenizer)
    assert one.stats["documents"]["train"] > 2 * PACK_BLOCK_DOCUMENTS  # three blocks, split across processes
    for other in (two, three):
        for split in ("train_dataset", "val_dataset"):
            np.testing.assert_array_equal(getattr(one, split)[:]["input_ids"], getattr(other, split)[:]["input_ids"])
        assert other.stats["train"] == one.stats["train"]
    assert two.cache.key() == three.cache.key()  # the same settings but num_proc: one cache


def test_unigram_entropy_of_the_targets_is_the_entropy_of_the_non_special_tokens(corpus_file, tmp_path):
    dm = _built(corpus_file, tmp_path)
    tokens = dm.train_dataset[:]["input_ids"].ravel()
    tokens = tokens[tokens >= 5]  # [PAD] [UNK] [CLS] [SEP] [MASK] are never masked, so never predicted
    frequencies = np.bincount(tokens) / len(tokens)
    frequencies = frequencies[frequencies > 0]
    assert dm.target_unigram_entropy == pytest.approx(-(frequencies * np.log(frequencies)).sum(), rel=1e-12)
    assert dm.stats["entropy_sample_tokens"] == dm.train_dataset[:]["input_ids"].size
