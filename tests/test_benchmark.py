"""``benchmarks/throughput.py`` runs end to end at a tiny shape and writes every figure (correctness, not speed)."""

import json
import math
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow  # the whole module runs real fits / the benchmark


def test_the_benchmark_runs_at_a_tiny_shape_and_writes_every_field(corpus_file, tmp_path):
    output, report = tmp_path / "result.json", tmp_path / "BENCHMARKS.md"
    fit_args = (
        f"--config {ROOT / 'configs/bert/demo.yaml'} --data.corpus.source files --data.corpus.data_files {corpus_file} "
        "--data.vocab_size 200 --data.seq_len 32 --data.batch_size 8 --data.validation_fraction 0.05 "
        "--data.max_validation_sequences 32 --model.num_layers 2 --model.hidden_size 32 --model.num_heads 2 "
        "--model.intermediate_size 64 --trainer.val_check_interval 10 --trainer.log_every_n_steps 5"
    )
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/throughput.py"), "--tiny", "--output", str(output),
         "--markdown", str(report), "--fit-args", fit_args, "--fit-budget", "1.5s"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text())
    assert set(result["ratios"]) == {
        "bert_fp32_vs_stock", "bert_bf16_vs_fp32", "bert_trainer_vs_hand", "bert_mfu_fp32",
        "t5_fp32_vs_stock", "t5_trainer_vs_hand", "fit_wall_vs_calibrated", "fit_wall_vs_step",
    }
    for key, value in result["ratios"].items():
        if key == "bert_bf16_vs_fp32" and not result["machine"]["native_bf16"]:
            assert value is None  # no target without native bf16; the emulated figure is reported apart
            assert result["bert_bf16_vs_fp32_emulated"] > 0
        else:
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    names = {"bert_hand_fp32", "bert_stock_fp32", "bert_trainer_fp32", "bert_trainer_bf16",
             "t5_hand_fp32", "t5_stock_fp32", "t5_trainer_fp32"}
    assert set(result["contenders"]) == names
    for name, row in result["contenders"].items():
        assert row["timed_steps"] >= 1 and row["median_step_seconds"] > 0, name
        assert row["matmul_flops_per_step"] > 0 and 0 < row["mfu_of_fp32_peak"], name
    # the sparse head: the module's step does fewer matrix FLOPs than the stock full-vocabulary head
    contenders = result["contenders"]
    assert contenders["bert_hand_fp32"]["matmul_flops_per_step"] < contenders["bert_stock_fp32"]["matmul_flops_per_step"]
    fit = result["end_to_end"]
    assert fit["optimizer_steps"] > 1 and 0 <= fit["dataloader_wait_share"] < 1
    assert fit["fit_start_to_first_step_seconds"] > 0 and result["data"]["cold_cache_seconds"] > 0
    parts = fit["wall_per_step_breakdown_ms"]  # where the wall time per step goes: the parts add up to it
    assert set(parts) == {"training_step", "dataloader_wait", "validation", "checkpoint_saves", "batch_hooks",
                          "loop_logging_and_rest"}
    assert parts["training_step"] > 0 and all(v >= 0 for k, v in parts.items() if k != "loop_logging_and_rest")
    assert sum(parts.values()) == pytest.approx(fit["fit_wall_seconds_per_step"] * 1e3)
    text = report.read_text()
    assert text.startswith("# Benchmarks") and "| `fit_wall_vs_calibrated` |" in text


def test_ratios_pair_each_rounds_medians_so_drift_between_rounds_cancels(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks/throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "throughput", throughput)  # its dataclasses look themselves up there
    spec.loader.exec_module(throughput)
    # the machine runs twice as slow in round 2; b takes 3x as long as a in every round
    times = {"a": [[1.0, 1.2, 0.9], [2.0, 2.2, 1.8]], "b": [[3.0, 3.3, 2.7], [6.0, 6.6, 5.4]], "slow": [[10.0], []]}
    assert throughput.paired_ratio(times, "a", "b") == 3.0
    assert throughput.paired_ratio(times, "b", "a") == 1 / 3
    assert throughput.paired_ratio(times, "slow", "a") == 0.1  # only the round both ran
    assert throughput.paired_ratio(times, "a", "missing") is None
