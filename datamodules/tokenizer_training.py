"""Tokenizer training: WordPiece for BERT, Unigram (SentencePiece-style) with sentinels for T5.

Both are trained with ``tokenizers`` on the training documents only (the validation documents are
split off first) and wrapped as ``transformers`` fast tokenizers, so they save with
``save_pretrained`` and load with ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "BERT_SPECIAL_TOKENS",
    "T5_SENTINELS",
    "T5_SPECIAL_TOKENS",
    "canonical_vocabulary",
    "tokenizer_files",
    "train_unigram_tokenizer",
    "train_wordpiece_tokenizer",
]

# Fixed order, so the ids are known before the tokenizer is trained: [PAD]=0 ... [MASK]=4.
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
T5_SENTINELS = 100


def canonical_vocabulary(vocab: dict[str, int], special_tokens: Sequence[str]) -> dict[str, int]:
    """Renumber a trained vocabulary so that equal training data always give equal ids.

    The ``tokenizers`` trainers number tokens in hash-map order and break ties between equally
    frequent merges differently from process to process; the *set* of tokens is stable. WordPiece
    encodes by greedy longest match, so ids do not change how text is split: we number the special
    tokens first, then the alphabet (single characters) sorted, then the other tokens sorted.
    """
    def is_alphabet(token: str) -> bool:
        return len(token) == 1 or (token.startswith("##") and len(token) == 3)

    rest = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1]) if t not in special_tokens]
    alphabet = sorted(t for t in rest if is_alphabet(t))
    merged = sorted(t for t in rest if not is_alphabet(t))
    return {token: i for i, token in enumerate([*special_tokens, *alphabet, *merged])}


def _text_iterator(dataset, batch_size: int = 1000) -> Iterator[list[str]]:
    for start in range(0, len(dataset), batch_size):
        yield dataset[start : start + batch_size]["text"]


def train_wordpiece_tokenizer(dataset, vocab_size: int, lowercase: bool = True):
    """Train a BERT WordPiece tokenizer on the ``text`` column and wrap it as a ``transformers`` fast tokenizer.

    Normalization as Cramming and the paper's code (docs/paper.md "BERT"): NFD, lower case, accents stripped; BERT
    pre-tokenization; special tokens ``BERT_SPECIAL_TOKENS`` at ids 0..4. Encoding a text pair adds
    ``[CLS] A [SEP] B [SEP]`` for fine-tuning; pre-training packs without them.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BERT_SPECIAL_TOKENS),
        limit_alphabet=min(1000, max(vocab_size // 4, 50)),
        show_progress=True,
    )
    tokenizer.train_from_iterator(_text_iterator(dataset), trainer=trainer, length=len(dataset))
    tokenizer.model = models.WordPiece(
        vocab=canonical_vocabulary(tokenizer.get_vocab(), BERT_SPECIAL_TOKENS),
        unk_token="[UNK]",
        continuing_subword_prefix="##",
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    for expected, token in enumerate(BERT_SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected, (token, tokenizer.token_to_id(token))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def train_unigram_tokenizer(dataset, vocab_size: int, sentinels: int = T5_SENTINELS):
    """Train a SentencePiece-style Unigram tokenizer and wrap it as a ``transformers`` T5 tokenizer.

    Layout as T5's: ``<pad>=0, </s>=1, <unk>=2``, the trained pieces, then the ``sentinels`` tokens
    ``<extra_id_99> ... <extra_id_0>`` at the end (``<extra_id_0>`` has the largest id). NFKC
    normalization, whitespace split with the ``▁`` metaspace; encoding appends ``</s>``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    if vocab_size <= sentinels + len(T5_SPECIAL_TOKENS) + 10:
        raise ValueError(f"vocab_size={vocab_size} leaves no room next to {sentinels} sentinel tokens")
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - sentinels,
        special_tokens=list(T5_SPECIAL_TOKENS),
        unk_token="<unk>",
        show_progress=True,
    )
    tokenizer.train_from_iterator(_text_iterator(dataset), trainer=trainer, length=len(dataset))
    pieces = [(piece, score) for piece, score in json.loads(tokenizer.to_str())["model"]["vocab"]]
    assert [p for p, _ in pieces[:3]] == list(T5_SPECIAL_TOKENS), pieces[:3]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(sentinels - 1, -1, -1)]
    wrapped = T5Tokenizer(vocab=pieces, extra_ids=sentinels, model_max_length=1_000_000)
    wrapped.backend_tokenizer.normalizer = normalizers.NFKC()
    return wrapped


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The text files ``save_pretrained`` writes for ``tokenizer``, by name (``AutoTokenizer`` loads them back)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {path.name: path.read_text(encoding="utf-8") for path in sorted(Path(tmp).iterdir()) if path.is_file()}
