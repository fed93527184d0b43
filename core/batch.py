"""The keys of a training batch, shared by the collators that build batches and the models that read them.

Every pre-training batch is a ``dict`` of tensors:

- ``input_ids`` ``(B, T)``: token ids (BERT: masked; T5: the corrupted encoder input);
- ``labels``: the targets, ``IGNORE_INDEX`` where nothing is predicted (BERT ``(B, T)``; T5 ``(B, T_target)``);
- ``attention_mask`` (optional, fine-tuning): 1 at real tokens, 0 at padding (pre-training packs
  without padding and sends none);
- ``example_id`` ``(B,)``: the index of each example in the packed training (or validation) split,
  stable across runs, so that anything computed per example (e.g. irreducible losses) lines up by id,
  never by stream position.

Examples read from the training stream also carry ``pass_index`` (which pass over the data), used by
the collators to draw training masks as a function of ``(seed, pass, example_id)``.
"""

__all__ = ["ATTENTION_MASK", "EXAMPLE_ID", "IGNORE_INDEX", "INPUT_IDS", "LABELS", "PASS_INDEX"]

INPUT_IDS = "input_ids"
LABELS = "labels"
ATTENTION_MASK = "attention_mask"
EXAMPLE_ID = "example_id"
PASS_INDEX = "pass_index"

# label of a position that is not predicted (PyTorch's cross-entropy default ``ignore_index``)
IGNORE_INDEX = -100
