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


def test_each_pass_starts_where_training_stands():
    consumed = [3 * 12 + 10]  # 3 passes of 12 batches and 10 batches of the 4th: a resume mid-pass
    loader = ResumableLoader(SequentialTrainingStream(_data(), 4), position=lambda: consumed[0], batch_size=4,
                             collate_fn=_collate)
    first = _epochs(loader, 1)[0]
    assert first == [[(4 * b + i, 3) for i in range(4)] for b in (10, 11)]
    consumed[0] += 1  # Lightning abandoned that pass after one batch (its restart at an epoch's end)
    second = _epochs(loader, 1)[0]
    assert second[0] == [(44, 3), (45, 3), (46, 3), (47, 3)] and len(second) == 1
    consumed[0] = 4 * 12
    assert _epochs(loader, 1)[0][0] == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_an_order_seed_permutes_every_pass_alike_with_any_workers_and_resumes_mid_pass():
    """Guards the run's training order (``training_order``): seed 0 reads the cache's order, another seed a
    permutation of it, the same in every pass and with any number of workers, and a resume mid-pass continues
    with the next unseen batch of that order."""
    from datamodules.streams import training_order

    assert training_order(50, 0) is None
    order = training_order(50, 1)
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    expected = [[[(int(order[4 * b + i]), p) for i in range(4)] for b in range(12)] for p in range(2)]
    for workers in (0, 2):
        loader = ResumableLoader(SequentialTrainingStream(_data(), 4, order=order), batch_size=4, collate_fn=_collate,
                                 num_workers=workers)
        assert _epochs(loader, 2) == expected, workers
    resumed = ResumableLoader(SequentialTrainingStream(_data(), 4, order=order), position=lambda: 12 + 10,
                              batch_size=4, collate_fn=_collate)
    assert _epochs(resumed, 1)[0] == expected[1][10:]
    assert training_order(50, 1).tolist() == order.tolist() != training_order(50, 2).tolist()


def test_a_pass_holds_whole_optimizer_steps():
    assert SequentialTrainingStream(_data(50), 4, batches_multiple_of=5).batches_per_pass() == 10  # not 12


def test_collated_examples_are_identical_across_passes_only_in_content():
    from datamodules.collators import MLMCollator

    collator = MLMCollator(mask_token_id=4, vocab_size=100, special_token_ids=(0, 1, 2, 3, 4))
    example = {"input_ids": np.arange(5, 69), "example_id": 7}
    pass0 = collator([{**example, "pass_index": 0}])
    again = collator([{**example, "pass_index": 0}])
    pass1 = collator([{**example, "pass_index": 1}])
    assert np.array_equal(pass0["labels"], again["labels"])  # training masks are reproducible
    assert not np.array_equal(pass0["labels"], pass1["labels"])  # and change from pass to pass


def test_resuming_from_a_checkpoint_written_at_the_end_of_a_pass_continues_exactly(corpus_file, tmp_path):
    import lightning as L

    from datamodules import MLMDataModule
    from helpers import tiny_bert_args, tiny_mlm_data_args
    from lightning_modules.bert_mlm import BertMLM

    class Record(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rows.append((trainer.global_step, int(batch["example_id"][0]), round(float(outputs["loss"]), 5)))

    def run(directory, ckpt_path=None):
        L.seed_everything(0)
        record = Record()
        at_pass_end = L.pytorch.callbacks.ModelCheckpoint(dirpath=directory, save_on_train_epoch_end=True,
                                                          save_top_k=-1, filename="{epoch}")
        trainer = L.Trainer(max_steps=40, callbacks=[record, at_pass_end], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=directory)
        trainer.fit(BertMLM(**tiny_bert_args(), learning_rate=5e-3), MLMDataModule(**tiny_mlm_data_args(corpus_file)),
                    ckpt_path=ckpt_path)
        return record.rows

    full = run(tmp_path / "full")  # 591 sequences: 36 batches of 16 per pass
    resumed = run(tmp_path / "resumed", tmp_path / "full" / "epoch=0.ckpt")
    assert [row[1] for row in resumed] == [0, 16, 32, 48]  # the second pass, from its start
    assert resumed == full[36:]
