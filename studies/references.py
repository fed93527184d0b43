"""Reference scores for a downstream task: the honest baselines a fine-tuned model's numbers are printed beside.

- **Majority class**: the most frequent training label (ties: the smallest) for every evaluation example;
  for regression the training mean, whose correlations are undefined and reported as 0.
- **TF-IDF + logistic regression** (scikit-learn): word uni- and bigrams, sublinear tf; ``Ridge`` for
  regression. Text pairs are joined as ``text_a + " \\n " + text_b`` (``texts_of``).
- **Lead-N** (generation): the source's first N whitespace words, N chosen on all training pairs by mean
  Rouge-L (an exact LCS computation, equal to torchmetrics', in a fraction of its time); scored with exactly
  the metric ``TextToText`` reports (``torchmetrics`` ``ROUGEScore``, no stemming).

Scores: per cent, under the model's keys ``"<split>/<metric>"``, by ``build_metrics`` on tensors like the
model's. ``task_references`` caches its result as JSON, keyed by a hash of the data and the methods' versions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.sealing import json_sha256

__all__ = ["choose_lead_n", "column_of", "lead", "lead_n_means", "lead_n_scores", "majority_scores", "rouge_l",
           "rouge_tokens", "task_references", "texts_of", "tfidf_scores"]

METHOD_VERSION = 1  # raise when a method changes, so cached references are recomputed
PAIR_SEPARATOR = " \n "
LEAD_CANDIDATES = range(1, 41)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def column_of(rows: Any, name: str) -> list[Any]:
    """One column of a ``datasets.Dataset`` or of a list of row dicts, as a list."""
    if hasattr(rows, "column_names"):
        return list(rows[name])
    return [row[name] for row in rows]


def texts_of(rows: Any) -> list[str]:
    """``text_a``, or ``text_a + " \\n " + text_b`` where the rows have a ``text_b`` column."""
    first = column_of(rows, "text_a")
    names = rows.column_names if hasattr(rows, "column_names") else set.intersection(*map(set, rows or [{}]))
    if "text_b" not in names:
        return first
    return [f"{a}{PAIR_SEPARATOR}{b}" for a, b in zip(first, column_of(rows, "text_b"), strict=True)]


def _scores(predictions: Sequence[float], labels: Sequence[float], metrics: Sequence[str], num_labels: int,
            split: str) -> dict[str, float]:
    """The model's metrics (``build_metrics``) on these predictions, in per cent, keyed ``split/metric``."""
    import torch

    from lightning_modules.finetuning import build_metrics

    dtype = torch.float32 if num_labels == 1 else torch.long
    collection = build_metrics(tuple(metrics), num_labels)
    collection.update(torch.tensor(list(predictions), dtype=dtype), torch.tensor(list(labels), dtype=dtype))
    return {f"{split}/{name}": 100.0 * float(value) for name, value in collection.compute().items()}


def majority_scores(train_labels: Sequence[Any], eval_labels: Sequence[Any], metrics: Sequence[str],
                    num_labels: int, split: str = "validation") -> dict[str, float]:
    """Predict the most frequent training label (ties: the smallest) everywhere; regression: the training mean,
    whose (undefined) correlations count as 0."""
    if not train_labels:
        raise UserError("majority class: no training labels")
    if num_labels == 1:
        mean = sum(float(y) for y in train_labels) / len(train_labels)
        with warnings.catch_warnings():  # torchmetrics warns that a constant's Pearson correlation is NaN
            warnings.simplefilter("ignore")
            scores = _scores([mean] * len(eval_labels), eval_labels, metrics, num_labels, split)
        return {key: 0.0 if math.isnan(value) else value for key, value in scores.items()}
    counts = Counter(train_labels)
    label = min(counts, key=lambda y: (-counts[y], y))
    return _scores([label] * len(eval_labels), eval_labels, metrics, num_labels, split)


def _fit(train_texts: Sequence[str], train_labels: Sequence[Any], num_labels: int,
         seed: int) -> Callable[[Sequence[str]], list[Any]]:
    """Fit TF-IDF + logistic regression (``Ridge`` for regression); return the prediction function."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    features = vectorizer.fit_transform(list(train_texts))
    if num_labels != 1 and len(set(train_labels)) < 2:  # one class: LogisticRegression cannot fit
        return lambda texts: [train_labels[0]] * len(texts)
    model = Ridge(random_state=seed) if num_labels == 1 else LogisticRegression(max_iter=2000, random_state=seed)
    model.fit(features, list(train_labels))
    return lambda texts: model.predict(vectorizer.transform(list(texts))).tolist()


def tfidf_scores(train_texts: Sequence[str], train_labels: Sequence[Any], eval_texts: Sequence[str],
                 eval_labels: Sequence[Any], metrics: Sequence[str], num_labels: int, seed: int = 0,
                 split: str = "validation") -> dict[str, float]:
    """TF-IDF (uni- and bigrams, sublinear tf) + logistic regression (``Ridge`` for regression), scored."""
    predict = _fit(train_texts, train_labels, num_labels, seed)
    return _scores(predict(eval_texts), eval_labels, metrics, num_labels, split)


def rouge_tokens(text: str) -> list[str]:
    """torchmetrics' Rouge tokens (no stemmer): lower-cased, split on anything but ``a-z0-9``."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _prefix_lcs(prediction: Sequence[str], target: Sequence[str]) -> list[int]:
    """``row[k]``: the longest common subsequence of ``target`` and ``prediction[:k]``, for every k."""
    row = [0] * (len(prediction) + 1)
    for token in target:
        new = [0]
        for j, predicted in enumerate(prediction, 1):
            new.append(row[j - 1] + 1 if predicted == token else max(row[j], new[j - 1]))
        row = new
    return row


def _f_measure(lcs: int, prediction_length: int, target_length: int) -> float:
    if lcs == 0:  # also every empty text, as torchmetrics
        return 0.0
    precision, recall = lcs / prediction_length, lcs / target_length
    return 2 * precision * recall / (precision + recall)


def lead_n_means(sources: Sequence[str], targets: Sequence[str],
                 candidates: Iterable[int] = LEAD_CANDIDATES) -> dict[int, float]:
    """Each candidate N's mean Rouge-L F-measure (per cent) of lead-N on these pairs.

    Exact and fast: one LCS table per pair against the longest lead gives every shorter lead's LCS (a lead's
    tokens are its words' tokens, as no token spans whitespace); it matches ``ROUGEScore`` (tests check it)."""
    candidates = sorted(set(candidates))
    if not candidates or candidates[0] < 1 or not sources:
        raise UserError(f"lead-N: needs training pairs and candidates >= 1 (got {len(sources)} pairs, {candidates})")
    totals = dict.fromkeys(candidates, 0.0)
    for source, target in zip(sources, targets, strict=True):
        words = source.split()[:candidates[-1]]
        word_tokens = [rouge_tokens(word) for word in words]
        ends = [0]  # ends[n]: the number of tokens in the first n words
        for tokens in word_tokens:
            ends.append(ends[-1] + len(tokens))
        target_tokens = rouge_tokens(target)
        row = _prefix_lcs([t for tokens in word_tokens for t in tokens], target_tokens)
        for n in candidates:
            k = ends[min(n, len(words))]
            totals[n] += _f_measure(row[k], k, len(target_tokens))
    return {n: 100.0 * total / len(sources) for n, total in totals.items()}


def choose_lead_n(sources: Sequence[str], targets: Sequence[str], candidates: Iterable[int] = LEAD_CANDIDATES) -> int:
    """The N whose lead-N has the best mean Rouge-L on these pairs (``lead_n_means``; ties: the smallest N)."""
    means = lead_n_means(sources, targets, candidates)
    return max(means, key=lambda n: (means[n], -n))


def lead(source: str, n: int) -> str:
    """The source's first ``n`` whitespace words."""
    return " ".join(source.split()[:n])


def rouge_l(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Mean Rouge-L F-measure in per cent, exactly as ``TextToText`` reports it."""
    from torchmetrics.text.rouge import ROUGEScore

    rouge = ROUGEScore(rouge_keys="rougeL", use_stemmer=False)
    rouge.update(list(predictions), list(targets))
    return 100.0 * float(rouge.compute()["rougeL_fmeasure"])


def lead_n_scores(train_sources: Sequence[str], train_targets: Sequence[str], eval_sources: Sequence[str],
                  eval_targets: Sequence[str], candidates: Iterable[int] = LEAD_CANDIDATES,
                  split: str = "validation") -> dict[str, Any]:
    """Lead-N: N chosen on the training pairs (``choose_lead_n``), Rouge-L on the evaluation pairs."""
    n = choose_lead_n(train_sources, train_targets, candidates)
    return {"n": n, f"{split}/rougeL": rouge_l([lead(s, n) for s in eval_sources], eval_targets)}


def _versions(kind: str) -> dict[str, Any]:
    import torchmetrics

    versions = {"references": METHOD_VERSION, "torchmetrics": torchmetrics.__version__}
    if kind == "generation":
        return {**versions, "lead_candidates": [LEAD_CANDIDATES.start, LEAD_CANDIDATES.stop - 1]}
    import sklearn

    return {**versions, "sklearn": sklearn.__version__, "seed": 0}


def _compute(task: Any, data: dict[str, dict[str, list[Any]]], eval_names: list[str]) -> dict[str, dict[str, Any]]:
    train = data["train"]
    if task.kind == "generation":
        n = choose_lead_n(train["source"], train["target"])
        scores = {f"{s}/rougeL": rouge_l([lead(x, n) for x in data[s]["source"]], data[s]["target"]) for s in eval_names}
        return {"lead_n": {"n": n, **scores}}
    predict = _fit(train["text"], train["label"], task.num_labels, 0)
    majority, tfidf = {}, {}
    for split in eval_names:
        labels = data[split]["label"]
        majority.update(majority_scores(train["label"], labels, task.metrics, task.num_labels, split))
        tfidf.update(_scores(predict(data[split]["text"]), labels, task.metrics, task.num_labels, split))
    return {"majority": majority, "tfidf": tfidf}


def task_references(task_name: str, splits: dict[str, Any], max_train_examples: int | None,
                    max_eval_examples: int | None, cache_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The task's references on its splits as given (``train`` and every evaluation split present):
    ``{"majority": ..., "tfidf": ...}`` or, for generation, ``{"lead_n": ...}``. The two ints only enter the
    cache key; the result is cached in ``<cache>/downstream/references/<task>-<sha256[:16]>.json``."""
    from datamodules.corpora import default_cache_dir
    from datamodules.downstream import TASKS

    if task_name not in TASKS:
        raise UserError(f"unknown task {task_name!r}; choose from {', '.join(TASKS)}")
    task = TASKS[task_name]
    eval_names = [split for split in task.eval_splits if split in splits]
    if "train" not in splits or not eval_names:
        raise UserError(f"task {task_name}: references need train and one of {', '.join(task.eval_splits)} "
                        f"(got {', '.join(splits)})")
    if task.kind == "generation":
        data = {s: {"source": column_of(splits[s], "source"), "target": column_of(splits[s], "target")}
                for s in ["train", *eval_names]}
    else:
        data = {s: {"text": texts_of(splits[s]), "label": column_of(splits[s], "label")} for s in ["train", *eval_names]}
    versions = _versions(task.kind)
    key = json_sha256({"task": task_name, "data": data, "versions": versions,
                       "max_train_examples": max_train_examples, "max_eval_examples": max_eval_examples})
    path = Path(cache_dir or default_cache_dir()) / "downstream" / "references" / f"{task_name}-{key[:16]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):  # absent or damaged: (re)compute
        record = json.loads(path.read_text())
        if record["key"] == key:
            return record["references"]
    start = time.perf_counter()
    references = _compute(task, data, eval_names)
    record = {"task": task_name, "key": key, "versions": versions, "max_train_examples": max_train_examples,
              "max_eval_examples": max_eval_examples, "examples": {s: len(d[next(iter(d))]) for s, d in data.items()},
              "seconds": round(time.perf_counter() - start, 3), "references": references}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8") as handle:
        handle.write(json.dumps(record, indent=2) + "\n")
    os.replace(handle.name, path)
    return references
