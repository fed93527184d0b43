"""Bad input stops before training with one line naming the problem and the fix, and exit status 2."""

import re
import subprocess
import sys

import pytest

from helpers import ROOT, run_until_exit, tiny_fit_args


def _assert_clean_cache(cache):
    packed = cache / "packed"
    assert not packed.exists() or not any(packed.iterdir()), list(packed.iterdir())


@pytest.mark.parametrize(
    "override, message",
    [
        (["--data.seq_len", "0"], "data.seq_len=0 must be a positive number of tokens"),
        (["--data.vocab_size", "0"], "data.vocab_size=0 is too small"),
        (["--data.corpus.source", "wikipedia"], "unknown data.corpus.source 'wikipedia': use one of news, news-plus, news-tiny, files, hub"),
        (["--data.corpus.data_files", "/nonexistent/corpus-*.txt"], "no file matches data.corpus.data_files='/nonexistent/corpus-*.txt'"),
    ],
)
def test_a_setting_that_cannot_work_stops_with_one_line_and_leaves_no_cache(override, message, corpus_file, tmp_path, capsys, private_cache):
    code, err = run_until_exit(tiny_fit_args(corpus_file, tmp_path, *override), capsys)
    assert code == 2
    assert err[-1].startswith(f"error: {message}"), err
    _assert_clean_cache(private_cache)


def test_an_empty_or_blank_corpus_stops_with_one_line(tmp_path, capsys, private_cache):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = run_until_exit(tiny_fit_args(empty, tmp_path), capsys)
    assert code == 2 and "is empty" in err[-1] and err[-1].startswith("error: ")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    code, err = run_until_exit(tiny_fit_args(blank, tmp_path), capsys)
    assert code == 2 and "has no text" in err[-1]
    _assert_clean_cache(private_cache)


def test_corpus_smaller_than_one_batch(tmp_path, capsys, private_cache):
    small = tmp_path / "small.txt"
    small.write_text("the cat sees the house in the morning.\n\n" * 30)
    code, err = run_until_exit(tiny_fit_args(small, tmp_path), capsys)
    assert code == 2
    assert "fewer than one optimizer step needs (data.batch_size=16 x trainer.accumulate_grad_batches=1 x 1 process(es) = 16)" in err[-1]
    assert "lower data.batch_size" in err[-1]
    _assert_clean_cache(private_cache)
    assert not (tmp_path / "bert-demo").exists()  # nothing trained, nothing logged


@pytest.mark.slow
def test_a_real_process_prints_one_line_and_exits_2(tmp_path, private_cache):
    result = subprocess.run(
        [sys.executable, "train.py", *tiny_fit_args(tmp_path / "missing.txt", tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no file matches data.corpus.data_files='{tmp_path / 'missing.txt'}': check the path (globs are allowed)"
    )
    assert "Traceback" not in result.stderr


def test_corpus_smaller_than_one_optimizer_step_of_gradient_accumulation(corpus_file, tmp_path, capsys):
    code, err = run_until_exit(tiny_fit_args(corpus_file, tmp_path, "--trainer.accumulate_grad_batches", "1000"), capsys)
    assert code == 2
    assert re.fullmatch(
        r"error: the corpus yields \d+ training sequences of 32 tokens, fewer than one optimizer step needs "
        r"\(data.batch_size=16 x trainer.accumulate_grad_batches=1000 x 1 process\(es\) = 16000\): add text, or lower "
        r"data.batch_size, trainer.accumulate_grad_batches or data.seq_len",
        err[-1],
    ), err[-1]
    assert not (tmp_path / "bert-demo").exists()
