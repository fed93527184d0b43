"""The random-initialisation control and the pre-training gain of `train.py evaluate --control random-init`, the
recipe's pooling and its tuning split held out of the training examples."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest
import torch

import cli
from helpers import ROOT, tiny_fit_args

# ----- the gain's arithmetic --------------------------------------------------------------------------------


def test_the_gain_is_paired_by_seed_with_the_t_interval_and_p_value():
    from studies.control import pretraining_gain

    # differences 10, 9, 8: mean 9, sd 1, standard error 1/sqrt(3); t = 9 sqrt(3) = 15.588 on 2 df.
    # With 2 df the t distribution's two-sided p is 1 - t / sqrt(2 + t^2) = 1 - 15.588 / 15.652 = 0.004090;
    # the 97.5 % quantile is 4.302653, so the interval is 9 +- 4.302653 / sqrt(3) = 9 +- 2.484138.
    gain = pretraining_gain({"0": 70.0, "1": 72.0, "2": 74.0}, {"0": 60.0, "1": 63.0, "2": 66.0})
    t = 9 * math.sqrt(3)
    assert gain["gain"] == pytest.approx(9.0)
    assert gain["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)
    assert gain["low"] == pytest.approx(9 - 2.484138, abs=1e-5) and gain["high"] == pytest.approx(9 + 2.484138, abs=1e-5)
    assert gain["seeds"] == 3
    # one seed: a difference, no interval
    single = pretraining_gain({"0": 70.0}, {"0": 61.5})
    assert single["gain"] == pytest.approx(8.5) and single["p_value"] is None and "one seed" in single["note"]


def test_seed_scores_average_a_tasks_metrics_and_the_suite_every_reported_score():
    from studies.control import seed_scores, suite_seed_scores

    tasks = {
        "a": {"reported": {"validation/accuracy": {"by_seed": {"0": 60.0, "1": 70.0}},
                           "validation/f1": {"by_seed": {"0": 50.0, "1": 80.0}}}},
        "b": {"reported": {"validation/accuracy": {"by_seed": {"0": 90.0, "1": 30.0}}}},
    }
    assert seed_scores(tasks["a"]) == {"0": 55.0, "1": 75.0}
    assert suite_seed_scores(tasks) == {"0": pytest.approx(200 / 3), "1": pytest.approx(60.0)}


# ----- the control's weights ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A tiny BERT pre-trained on text whose words come in two groups, exported; the downstream task asks
    which group a sentence's words belong to, with the words of the validation split unseen in training."""
    out = tmp_path_factory.mktemp("grouped")
    rng = random.Random(0)
    suffixes = ("an", "el", "or", "ix", "um", "ep", "ot", "ag", "is", "uk")
    words = [[stem + suffix for stem in stems for suffix in suffixes] for stems in ("bd", "mt")]  # two groups of 20
    paragraphs = []
    for _ in range(600):
        group = rng.randrange(2)
        paragraphs.append(" ".join(rng.choice(words[group]) for _ in range(12)) + ".")
    corpus = out / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n")
    args = tiny_fit_args(corpus, out, "--data.cache_dir", str(out / "cache"))
    args[args.index("--trainer.max_steps") + 1] = "300"
    args[args.index("--data.vocab_size") + 1] = "120"
    cli.main(args)
    checkpoint = out / "bert-demo/version_0/checkpoints/last.ckpt"
    cli.main(["export", "--ckpt_path", str(checkpoint), "--output", str(out / "hf")])
    task = out / "glue" / "sst2"
    task.mkdir(parents=True)
    for split, vocabulary, count in (("train", slice(0, 4), 64), ("validation", slice(4, 20), 200)):
        with open(task / f"{split}.tsv", "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(["sentence", "label", "idx"])
            for idx in range(count):
                label = idx % 2
                writer.writerow([" ".join(rng.choice(words[label][vocabulary]) for _ in range(8)), label, idx])
    return {"checkpoint": checkpoint, "export": out / "hf", "glue": out / "glue"}


@pytest.mark.slow
def test_the_control_has_the_exports_config_and_tokenizer_and_fresh_seeded_weights(grouped, tmp_path):
    from transformers import AutoConfig, AutoModelForMaskedLM

    from studies.control import random_init_copy

    first = random_init_copy(grouped["export"], tmp_path / "c0", seed=0)
    again = random_init_copy(grouped["export"], tmp_path / "c0-again", seed=0)
    other = random_init_copy(grouped["export"], tmp_path / "c1", seed=1)
    def config(path):  # where it was loaded from aside
        return {k: v for k, v in AutoConfig.from_pretrained(path).to_dict().items() if k != "_name_or_path"}

    assert config(first) == config(grouped["export"])
    assert (first / "tokenizer.json").read_bytes() == (grouped["export"] / "tokenizer.json").read_bytes()
    pretrained = AutoModelForMaskedLM.from_pretrained(grouped["export"]).state_dict()
    states = [AutoModelForMaskedLM.from_pretrained(p).state_dict() for p in (first, again, other)]
    assert pretrained.keys() == states[0].keys()
    weights = [k for k, v in pretrained.items() if v.dim() == 2]
    for key in weights:
        assert not torch.equal(pretrained[key], states[0][key]), key  # fresh weights
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)  # seeded
    assert any(not torch.equal(states[0][k], states[2][k]) for k in weights)  # another seed, other weights


@pytest.mark.slow
def test_pretraining_beats_its_random_init_control_on_a_task_it_makes_learnable(grouped, tmp_path, capsys):
    output = tmp_path / "gain.json"
    cli.main(["evaluate", "--ckpt_path", str(grouped["checkpoint"]), "--suite", "glue", "--tasks", "sst2",
              "--data_dir", str(grouped["glue"]), "--output", str(output), "--seeds", "0,1,2", "--epochs", "6",
              "--learning_rate", "1e-3", "--batch_size", "16", "--pooling", "mean", "--control", "random-init",
              "--no_progress"])
    result = json.loads(output.read_text())
    pretrained = result["tasks"]["sst2"]["reported"]["validation/accuracy"]
    control = result["control"]["tasks"]["sst2"]["reported"]["validation/accuracy"]
    gain = result["pretraining_gain"]["sst2"]
    # validation sentences use only words the fine-tuning never saw: the control guesses, the pre-trained model
    # knows from pre-training which words go together
    assert pretrained["median"] >= 75.0 and control["median"] <= 65.0, (pretrained, control)
    assert gain["gain"] == pytest.approx(sum(pretrained["by_seed"][s] - control["by_seed"][s] for s in "012") / 3)
    assert gain["gain"] > 10.0 and gain["p_value"] < 0.05
    printed = capsys.readouterr().out
    assert "control" in printed and "gain" in printed
    assert result["references"]["sst2"]["majority"]["validation/accuracy"] == pytest.approx(50.0)


# ----- the recipe's pieces ---------------------------------------------------------------------------------------
def test_mean_pooling_ignores_padding(tmp_path):
    from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM

    from lightning_modules.finetuning import SequenceClassifier

    config = RobertaPreLayerNormConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=40, pad_token_id=0)
    RobertaPreLayerNormForMaskedLM(config).save_pretrained(tmp_path)
    module = SequenceClassifier(str(tmp_path), num_labels=3, pooling="mean", dropout=0.0).eval()
    ids = torch.tensor([[5, 6, 7]])
    padded = {"input_ids": torch.tensor([[5, 6, 7, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    with torch.no_grad():
        short = module.logits({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        long = module.logits(padded)
        first = SequenceClassifier(str(tmp_path), num_labels=3, pooling="first", dropout=0.0).eval()
    assert short.shape == (1, 3)
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="use first or mean"):
        SequenceClassifier(str(tmp_path), num_labels=3, pooling="max")
    assert first.pooling == "first"


@pytest.mark.slow
def test_the_tuning_split_is_carved_from_the_training_examples(private_cache):
    from datamodules.finetuning import DownstreamDataModule

    tuning = DownstreamDataModule("news-topic", str(ROOT), max_train_examples=2000, max_eval_examples=1000,
                                  tuning_holdout=True)
    tuning.load()
    reported = DownstreamDataModule("news-topic", str(ROOT))
    reported.load()
    train, held = list(tuning.raw["train"]["text_a"]), list(tuning.raw["validation"]["text_a"])
    assert (len(train), len(held)) == (1643 - 1643 // 5, 1643 // 5)
    assert train + held == list(reported.raw["train"]["text_a"])  # the training split, cut in two
    assert not set(held) & set(reported.raw["validation"]["text_a"])  # never the reported validation split



# ----- layer-wise learning rates ------------------------------------------------------------------------------


def test_layerwise_rates_decay_from_the_head_to_the_embeddings_and_cover_every_parameter_once():
    from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormForSequenceClassification

    from lightning_modules.finetuning import layer_depth, layerwise_parameter_groups

    config = RobertaPreLayerNormConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=40, num_labels=2)
    model = RobertaPreLayerNormForSequenceClassification(config)
    named = list(model.named_parameters())
    assert layer_depth("roberta_prelayernorm.embeddings.word_embeddings.weight", 3) == 0
    assert layer_depth("roberta_prelayernorm.encoder.layer.2.output.dense.weight", 3) == 3
    assert layer_depth("classifier.out_proj.weight", 3) == 4 and layer_depth("roberta_prelayernorm.LayerNorm.bias", 3) == 4

    groups = layerwise_parameter_groups(named, 3, 1e-3, 0.5)
    # the head at 1e-3, layers 2, 1, 0 at 5e-4, 2.5e-4, 1.25e-4, the embeddings at 1e-3 / 16
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 / 16, 1.25e-4, 2.5e-4, 5e-4, 1e-3])
    grouped_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped_ids) == sorted(id(p) for _, p in named)  # every parameter, once
    assert id(model.classifier.out_proj.weight) in {id(p) for p in groups[-1]["params"]}
    assert id(model.roberta_prelayernorm.embeddings.word_embeddings.weight) in {id(p) for p in groups[0]["params"]}

    uniform = layerwise_parameter_groups(named, 3, 1e-3, 1.0)
    assert {g["lr"] for g in uniform} == {1e-3}
    with pytest.raises(Exception, match="layer_decay"):
        layerwise_parameter_groups(named, 3, 1e-3, 0.0)
