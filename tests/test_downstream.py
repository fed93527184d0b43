"""Export to Hugging Face, downstream data, metrics, fine-tuning and `train.py evaluate` (tiny models)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

import cli
from helpers import ROOT, make_corpus, tiny_fit_args

TINY_T5 = [
    "--data.vocab_size", "300", "--data.seq_len", "32", "--data.batch_size", "16",
    "--data.validation_fraction", "0.05", "--data.max_validation_sequences", "64",
    "--model.num_layers", "2", "--model.d_model", "32", "--model.d_ff", "64", "--model.num_heads", "2",
    "--model.d_kv", "16", "--trainer.max_steps", "20", "--trainer.val_check_interval", "20",
    "--trainer.enable_progress_bar", "false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny BERT and a tiny T5 pre-trained for a few steps: their last checkpoints."""
    out = tmp_path_factory.mktemp("pretrained")
    corpus = make_corpus(out / "corpus.txt", documents=400)
    cache = ["--data.cache_dir", str(out / "cache")]
    args = tiny_fit_args(corpus, out, *cache)
    args[args.index("--trainer.max_steps") + 1] = "20"
    cli.main(args)
    cli.main(["fit", "--config", str(ROOT / "configs/t5/demo.yaml"), "--config", str(ROOT / "tests/configs/step-budget.yaml"),
                "--data.corpus.source", "files", "--data.corpus.data_files", str(corpus), *TINY_T5, *cache,
                "--trainer.logger.init_args.save_dir", str(out)])
    return {"bert": out / "bert-demo/version_0/checkpoints/last.ckpt", "t5": out / "t5-demo/version_0/checkpoints/last.ckpt"}


# ----- export -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bert_export_loads_with_auto_classes_and_gives_the_modules_logits(runs, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from lightning_modules.export import load_checkpoint

    cli.main(["export", "--ckpt_path", str(runs["bert"]), "--output", str(tmp_path / "hf")])
    assert "AutoModelForMaskedLM.from_pretrained" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    loaded = load_checkpoint(runs["bert"])
    text = ["the cat sees a red ball again.", "my sister reads the letter every day."]
    assert tokenizer(text)["input_ids"] == loaded.tokenizer(text)["input_ids"]  # tokenizer round trip
    assert tokenizer.decode(tokenizer("the cat sees a red ball")["input_ids"], skip_special_tokens=True) == "the cat sees a red ball"
    batch = tokenizer(text, padding=True, return_tensors="pt")
    with torch.no_grad():
        exported = model(**batch).logits
        module = loaded.module(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(exported, module, rtol=1e-5, atol=1e-5)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| optimizer steps | 20 |" in card and "| sequences trained | 320 |" in card and "| tokens trained | 10,240 |" in card


def test_t5_export_keeps_the_untied_head_and_gives_the_modules_logits(runs, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from lightning_modules.export import export_checkpoint

    loaded = export_checkpoint(runs["t5"], tmp_path / "hf")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    torch.testing.assert_close(model.lm_head.weight, loaded.module.model.lm_head.weight)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    inputs = tokenizer(["the cat sees a red ball"], return_tensors="pt")
    labels = tokenizer(text_target=["the cat"], return_tensors="pt")["input_ids"]
    assert inputs["input_ids"][0].tolist() == loaded.tokenizer(["the cat sees a red ball"])["input_ids"][0]
    with torch.no_grad():
        exported = model(**inputs, labels=labels).logits
        module = loaded.module.model(**inputs, labels=labels).logits
    torch.testing.assert_close(exported, module, rtol=1e-5, atol=1e-5)


def test_export_errors_are_one_line(runs, tmp_path, capsys):
    for args, message in [
        (["--ckpt_path", str(tmp_path / "missing.ckpt")], "no such checkpoint"),
        (["--ckpt_path", str(ROOT / "README.md")], "not a Lightning checkpoint"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            cli.main(["export", *args, "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(err) == 1 and message in err[0], err


# ----- metrics ------------------------------------------------------------------------------------------
def test_metrics_on_hand_made_predictions():
    from torchmetrics.text.rouge import ROUGEScore

    from lightning_modules.finetuning import build_metrics

    predictions, labels = torch.tensor([1, 1, 0, 0, 1, 0]), torch.tensor([1, 0, 0, 0, 1, 1])
    scores = build_metrics(["accuracy", "f1", "mcc"], 2)(predictions, labels)
    # tp 2, fp 1, fn 1, tn 2: accuracy 4/6, F1 2/3, MCC (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    assert float(scores["accuracy"]) == pytest.approx(4 / 6)
    assert float(scores["f1"]) == pytest.approx(2 / 3)
    assert float(scores["mcc"]) == pytest.approx(1 / 3)
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 5.0])
    regression = build_metrics(["pearson", "spearman"], 1)(x, y)
    # deviations (-1.5, -.5, .5, 1.5) and (-1.75, .25, -.75, 2.25): 5.5 / sqrt(5 * 8.75) = 0.83152
    assert float(regression["pearson"]) == pytest.approx(5.5 / (5 * 8.75) ** 0.5, abs=1e-6)
    assert float(regression["spearman"]) == pytest.approx(0.8)  # ranks 1 2 3 4 vs 1 3 2 4: 1 - 6*2/(4*15)
    rouge = ROUGEScore(rouge_keys="rougeL", use_stemmer=False)
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat (4): P = R = 4/6
    assert float(rouge(["the cat sat on the mat"], ["the cat lay on a mat"])["rougeL_fmeasure"]) == pytest.approx(4 / 6)


def test_the_last_epoch_is_reported_unless_best_is_asked():
    from lightning_modules.finetuning import select_scores

    epochs = [{"validation/accuracy": 70.0, "validation/f1": 60.0}, {"validation/accuracy": 80.0, "validation/f1": 55.0},
              {"validation/accuracy": 75.0, "validation/f1": 58.0}]
    assert select_scores(epochs, "last") == {"validation/accuracy": 75.0, "validation/f1": 58.0}
    assert select_scores(epochs, "best") == {"validation/accuracy": 80.0, "validation/f1": 60.0}


# ----- GLUE-schema local files and an easy task -----------------------------------------------------------
_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the committee", "a small bird"]


def _easy_task(directory: Path, examples: int = 480, label_for=None) -> Path:
    """An SST-2-shaped task in GLUE's schema (sentence, label, idx as TSV): is the subject an animal?"""
    rng = random.Random(1)
    task = directory / "sst2"
    task.mkdir(parents=True)
    for split, count in (("train", examples), ("validation", 120)):
        with open(task / f"{split}.tsv", "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(["sentence", "label", "idx"])
            for idx in range(count):
                subject = rng.choice(_SUBJECTS)
                label = int(subject in ("the cat", "a dog", "a small bird"))
                writer.writerow([f"{subject} sees the house every day", label if label_for is None else label_for(idx), idx])
    return directory


def test_glue_local_files_are_read_in_the_hubs_schema(tmp_path):
    import datasets

    from datamodules.downstream import load_task

    splits = load_task("sst2", data_dir=_easy_task(tmp_path, examples=40))
    assert len(splits["train"]) == 40 and len(splits["validation"]) == 120
    assert set(splits["train"].column_names) == {"text_a", "label"}
    assert splits["train"][0]["text_a"].endswith("sees the house every day")
    rows = [{"sentence1": "a b", "sentence2": "c d", "label": 1, "idx": 0}, {"sentence1": "e", "sentence2": "f", "label": 0, "idx": 1}]
    (tmp_path / "mrpc").mkdir()
    for split in ("train", "validation"):
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "mrpc" / f"{split}-00000-of-00001.parquet"))
    pairs = load_task("mrpc", data_dir=tmp_path)
    assert pairs["validation"][0] == {"text_a": "a b", "text_b": "c d", "label": 1}


@pytest.mark.slow
def test_a_tiny_fine_tune_beats_chance_and_reports_the_last_epoch(runs, tmp_path, capsys):
    data = _easy_task(tmp_path / "glue")
    output = tmp_path / "glue.json"
    cli.main(["evaluate", "--ckpt_path", str(runs["bert"]), "--suite", "glue", "--tasks", "sst2", "--data_dir", str(data),
                "--output", str(output), "--seeds", "0,1", "--epochs", "4", "--learning_rate", "2e-3",
                "--batch_size", "16", "--no_progress"])
    result = json.loads(output.read_text())
    sst2 = result["tasks"]["sst2"]["reported"]["validation/accuracy"]
    assert sst2["median"] >= 85.0, sst2  # half the subjects are animals: chance is about 50
    for seed, run in result["tasks"]["sst2"]["runs"].items():
        assert len(run["epochs"]) == 4 and run["last"] == run["epochs"][-1]
        assert sst2["by_seed"][seed] == run["epochs"][-1]["validation/accuracy"]
    assert result["average"] == sst2["median"] and result["select"] == "last"
    assert "sst2" in capsys.readouterr().out
    from helpers import scalars

    summary = scalars(runs["bert"].parent.parent / "downstream" / "glue")
    assert summary["downstream/glue/sst2/validation/accuracy"] == [(20, pytest.approx(sst2["median"]))]


def test_t5_text_to_text_scores_rouge_l(runs, tmp_path):
    import datasets

    rows = [{"definition": "Repeat the subject.", "inputs": f"{s} sees the house", "targets": s} for s in _SUBJECTS * 4]
    (tmp_path / "sni").mkdir()
    for split in ("train", "test"):
        datasets.Dataset.from_list(rows).to_json(str(tmp_path / "sni" / f"{split}.jsonl"))
    output = tmp_path / "sni.json"
    cli.main(["evaluate", "--ckpt_path", str(runs["t5"]), "--suite", "sni", "--data_dir", str(tmp_path),
                "--output", str(output), "--epochs", "1", "--max_length", "32", "--max_target_length", "8", "--no_progress"])
    result = json.loads(output.read_text())
    entry = result["tasks"]["sni"]["reported"]["test/rougeL"]
    assert 0.0 <= entry["median"] <= 100.0 and result["family"] == "t5"
    assert result["tasks"]["sni"]["runs"]["0"]["eval_examples"] == {"test": 24}


# ----- bad input: one line, before any work -------------------------------------------------------------
def _error(args, capsys) -> str:
    """The one error line (progress bars of reading the data may precede it)."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(args)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and "examples/s]" not in line]
    assert stopped.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_evaluate_bad_input_is_one_line(runs, tmp_path, capsys):
    base = ["evaluate", "--output", str(tmp_path / "x.json"), "--no_progress"]
    assert "unknown suite 'nope'" in _error([*base, "--ckpt_path", str(runs["bert"]), "--suite", "nope"], capsys)
    assert "not in suite glue" in _error([*base, "--ckpt_path", str(runs["bert"]), "--suite", "glue", "--tasks", "sst3"], capsys)
    assert "this checkpoint is T5" in _error([*base, "--ckpt_path", str(runs["t5"]), "--suite", "glue"], capsys)
    assert "this checkpoint is BERT" in _error([*base, "--ckpt_path", str(runs["bert"]), "--suite", "sni"], capsys)
    bad_labels = _easy_task(tmp_path / "bad", examples=20, label_for=lambda idx: 5 if idx == 3 else 0)
    message = _error([*base, "--ckpt_path", str(runs["bert"]), "--suite", "glue", "--tasks", "sst2", "--data_dir",
                      str(bad_labels)], capsys)
    assert "label 5 outside 0..1" in message
    (tmp_path / "cols" / "sst2").mkdir(parents=True)
    for split in ("train", "validation"):
        (tmp_path / "cols" / "sst2" / f"{split}.tsv").write_text("text\tlabel\nhello\t1\n")
    message = _error([*base, "--ckpt_path", str(runs["bert"]), "--suite", "glue", "--tasks", "sst2", "--data_dir",
                      str(tmp_path / "cols")], capsys)
    assert "no column sentence" in message
    assert not (tmp_path / "x.json").exists()


# ----- the offline tasks' data ------------------------------------------------------------------------------
# the recorded splits: seed 0 over the de-duplicated texts of each pinned wheel (docs/evaluation.md lists them)
RECORDED = {
    "reviews": {"train": 10751, "validation": 2000, "sha256": "48b99f9e8fc9829d7394ee5aa6618f482732646611ebdd8441316e25a4a63a1b"},
    "news-topic": {"train": 1643, "validation": 445, "sha256": "3f40e31682dafca78025e9ff5b18057d8a66666538ee2b2d4427df0b994d2daa"},
    "tweets": {"train": 34154, "validation": 3000, "sha256": "985effbc32502d8e32f7a5c4c3851d08199aaf28b5f836e9635bc33082ea07c0"},
}


@pytest.mark.slow
def test_offline_splits_are_the_recorded_ones_disjoint_and_not_in_the_pretraining_corpora(private_cache):
    import re

    from datamodules.corpora import _read_embedded
    from datamodules.downstream import load_task, offline_split_digests

    words = re.compile(r"[a-z0-9']+")
    pretraining = _read_embedded("news-plus", private_cache)  # the mini's corpus; it holds the default's news
    tokenized = [words.findall(text.lower()) for text in pretraining]
    grams = {hash(tuple(t[i:i + 8])) for t in tokenized for i in range(len(t) - 7)}
    long_grams = {hash(tuple(t[i:i + 13])) for t in tokenized for i in range(len(t) - 12)}
    task_long_grams = set()
    for task, recorded in RECORDED.items():
        record = offline_split_digests(task)
        assert record["examples"] == {"train": recorded["train"], "validation": recorded["validation"]}
        assert record["sha256"]["validation"] == recorded["sha256"] and record["seed"] == 0
        splits = load_task(task)
        texts = {split: {" ".join(t.lower().split()) for t in d["text_a"]} for split, d in splits.items()}
        assert len(texts["train"]) == recorded["train"] and not texts["train"] & texts["validation"]
        for split in texts:
            for text in texts[split]:
                tokens = words.findall(text)
                windows = [hash(tuple(tokens[i:i + 8])) for i in range(len(tokens) - 7)]
                assert not windows or sum(w in grams for w in windows) <= len(windows) // 2, (task, text[:80])
                task_long_grams.update(hash(tuple(tokens[i:i + 13])) for i in range(len(tokens) - 12))
    assert not long_grams & task_long_grams  # no pre-training document shares 13 words in a row with any task text
    headlines = load_task("headlines")
    assert len(headlines["validation"]) == 445 and headlines["validation"][0]["target"]
    assert {len(labels) for labels in [set(load_task("news-topic")["train"]["label"])]} == {5}
