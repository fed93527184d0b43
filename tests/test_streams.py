"""The training stream: order independent of workers, resume offset, pass numbers."""

import datasets
import numpy as np

from datamodules.streams import ResumableLoader, SequentialTrainingStream


def _data(n=50):
    return datasets.Dataset.from_dict({"input_ids": [[i, i] for i in range(n)], "example_id": list(range(n))}).with_format("numpy")


def _collate(examples):
    return [(int(e["example_id"]), int(e["pass_index"])) for e in examples]


def _epochs(loader, epochs):
    return [[batch for batch in loader] for _ in range(epochs)]


def test_order_is_the_same_with_any_number_of_workers_and_passes_are_numbered():
    expected = [[[(4 * b + i, p) for i in range(4)] for b in range(12)] for p in range(2)]  # 50 // 4 = 12 batches
    for workers in (0, 2):
        loader = ResumableLoader(SequentialTrainingStream(_data(), 4), batch_size=4, collate_fn=_collate,
                                 num_workers=workers)
        assert len(loader) == 12
        assert _epochs(loader, 2) == expected, workers


def test_a_resumed_stream_starts_at_the_next_unseen_batch_once():
    loader = ResumableLoader(SequentialTrainingStream(_data(), 4, start_batch=10, pass_index=3), batch_size=4,
                             collate_fn=_collate)
    first, second = _epochs(loader, 2)
    assert first == [[(4 * b + i, 3) for i in range(4)] for b in (10, 11)]
    assert second[0] == [(0, 4), (1, 4), (2, 4), (3, 4)] and len(second) == 12


def test_collated_examples_are_identical_across_passes_only_in_content():
    from datamodules.collators import MLMCollator

    collator = MLMCollator(mask_token_id=4, vocab_size=100, special_token_ids=(0, 1, 2, 3, 4))
    example = {"input_ids": np.arange(5, 69), "example_id": 7}
    pass0 = collator([{**example, "pass_index": 0}])
    again = collator([{**example, "pass_index": 0}])
    pass1 = collator([{**example, "pass_index": 1}])
    assert np.array_equal(pass0["labels"], again["labels"])  # training masks are reproducible
    assert not np.array_equal(pass0["labels"], pass1["labels"])  # and change from pass to pass
