"""The worked example of docs/adding-a-method.md: a user's selection rule in a package outside the toolkit
(``examples/my_methods``), its overlay and its two-method study, run as the guide says (``PYTHONPATH=examples``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from core.sealing import seal
from helpers import ROOT, doc

EXAMPLES = ROOT / "examples"


def test_the_example_rule_keeps_the_losses_at_most_the_median():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from my_methods.easiest_half import easiest_half
    finally:
        sys.path.remove(str(EXAMPLES))
    assert easiest_half(np.array([0.9, 0.1, 0.5, 0.3, 0.7])).tolist() == [False, True, True, True, False]


def test_the_guide_runs_the_example_with_the_commands_it_shows():
    guide = doc("adding-a-method.md")
    assert "PYTHONPATH=examples python train.py compare --study examples/easiest-half-study.yaml" in guide
    assert "PYTHONPATH=examples python train.py fit --config configs/bert/demo.yaml --config examples/easiest-half.yaml" in guide
    assert (EXAMPLES / "easiest-half-study.yaml").is_file() and (EXAMPLES / "easiest-half.yaml").is_file()
    assert "PYTHONPATH=examples python train.py compare --study examples/tail-average-study.yaml" in guide
    assert (EXAMPLES / "tail-average-study.yaml").is_file() and (EXAMPLES / "tail-average.yaml").is_file()


def _example(module: str):
    sys.path.insert(0, str(EXAMPLES))
    try:
        return __import__(f"my_methods.{module}", fromlist=["_"])
    finally:
        sys.path.remove(str(EXAMPLES))


def test_the_example_running_mean_is_the_mean_of_the_weights_it_saw():
    running_mean = _example("tail_average").running_mean
    seen = [torch.tensor([1.0, 4.0]), torch.tensor([3.0, 0.0]), torch.tensor([8.0, 2.0])]
    mean = {"w": seen[0].clone()}
    for count, weights in enumerate(seen[1:], start=2):
        running_mean(mean, {"w": weights}, count)
    assert mean["w"].tolist() == [4.0, 2.0]


def _run_tiny(study_file: str, run_id: str, corpus_file, tmp_path, **table_extra):
    """The example's study at a tiny scale (its methods and configs as written; a tiny model, table and budget),
    one run of it launched as the guide says: ``PYTHONPATH=examples``, from the repository's root."""
    study = yaml.safe_load((EXAMPLES / study_file).read_text())
    overlay = {"data": {"init_args": {"corpus": {"source": "files", "data_files": str(corpus_file)}, "vocab_size": 200,
                                      "seq_len": 32, "batch_size": 16, "validation_fraction": 0.05,
                                      "max_validation_sequences": 64}},
               "model": {"init_args": {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(overlay))
    (tmp_path / "table.json").write_text(json.dumps(seal({
        "format": "rst-table/1", "seq_len": 32, "micro_batch_size": 16, "fwd_bwd_seconds": [1.0, 1.0],
        "fwd_seconds": [0.25, 0.25], "optimizer_step_seconds": {"AdamW": 0.0}, **table_extra})))
    study.update(base=[*study["base"], str(tmp_path / "tiny.yaml")], table=str(tmp_path / "table.json"),
                 budgets=["6s"], seeds=[0])
    for method in study["methods"]:
        method["configs"] = [str(EXAMPLES / c) for c in method.get("configs", [])]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": "examples"}
    result = subprocess.run([sys.executable, "train.py", "compare", "--study", str(tmp_path / "study.yaml"),
                             "--output", str(out), "--run", run_id],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run = out / "runs" / run_id
    assert json.loads((run / "result.json").read_text())["status"] == "done"
    return torch.load(run / "tb" / "run" / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.slow
def test_the_example_study_runs_at_a_tiny_scale_from_its_own_package(corpus_file, tmp_path):
    # the user's method's run (the baseline's runs are the toolkit's own, tested in test_compare.py)
    checkpoint = _run_tiny("easiest-half-study.yaml", "easiest-half/6s/seed0", corpus_file, tmp_path)
    state = checkpoint["callbacks"]["EasiestHalf"]
    scored = sum(rank["candidate_batches"] for rank in state["ranks"]) * 16
    assert checkpoint["work_ledger"]["fwd/2"] == scored > 0  # its scoring was charged, by the toolkit's base class


@pytest.mark.slow
def test_the_weight_averaging_example_study_runs_and_charges_its_updates(corpus_file, tmp_path):
    # 1 RST-second per step, 0.5 per update (one after every step once tau >= 0.5): the run stops at the first
    # step whose work, updates included, reaches the 6 s budget
    checkpoint = _run_tiny("tail-average-study.yaml", "tail-average/6s/seed0", corpus_file, tmp_path,
                           work_seconds={"tail_average": 0.5})
    state = checkpoint["callbacks"]["TailAverage"]
    updates = checkpoint["work_ledger"]["tail_average/events"]
    assert state["count"] == updates > 0
    steps = checkpoint["global_step"]
    assert steps * 1.0 + updates * 0.5 >= 6.0 > (steps - 1) * 1.0 + (updates - 1) * 0.5
    raw, saved = checkpoint["raw_state_dict"], checkpoint["state_dict"]
    assert all(torch.equal(saved[name], mean) for name, mean in state["mean"].items())
    assert not all(torch.equal(raw[k], saved[k]) for k in saved)  # the averaged weights are the checkpoint's
