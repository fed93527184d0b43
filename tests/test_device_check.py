"""``benchmarks/device_check.py``: every part of the GPU check runs at a tiny shape (``--dry-run``) and reports each
figure; its section of BENCHMARKS.md is replaced in place, and kept when ``throughput.py`` regenerates the file."""

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.device_parts import shipped_optimizers
from benchmarks.device_report import write_markdown
from benchmarks.device_setup import gpu_slug
from benchmarks.report import DEVICE_CHECK_END, DEVICE_CHECK_START, keep_device_check
from helpers import ROOT

PARTS = ("tables", "throughput", "compile", "host_syncs", "memory")


def numbers(value: Any, where: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a JSON value, with its path (booleans are not numbers)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, f"{where}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, value


@pytest.mark.slow  # torch.compile and five short fits: about 20 s here, in a process of its own (dynamo's state)
def test_the_dry_run_runs_every_part_and_reports_every_figure(tmp_path):
    output, report = tmp_path / "check.json", tmp_path / "B.md"
    report.write_text("# Benchmarks\n\nThe throughput report.\n")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/device_check.py"), "--dry-run", "--output", str(output),
         "--markdown", str(report)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(output.read_text())
    assert {"date", "command", "device", "torch", "dry_run", "seconds", *PARTS} <= set(result)
    assert result["dry_run"] is True and set(result["seconds"]) == {"total", *PARTS} - {"memory"}
    for part in PARTS:
        assert "error" not in result[part], result[part]
    for where, value in numbers(result):
        assert math.isfinite(value), where
    for model in ("bert", "t5"):
        table = result["tables"][model]
        assert len(table["fwd_bwd_seconds"]) == result["throughput"]["shapes"][model]["layers"]
        assert set(table["optimizer_step_seconds"]) == {"AdamW" if model == "bert" else "AdamWScale", "Lion",
                                                        "MuonWithAdamW", "SOAP", "ScheduleFreeAdamW", "SophiaG"}
        assert all(seconds > 0 for seconds in table["optimizer_step_seconds"].values())
        syncs = result["host_syncs"][model]
        assert syncs["steps_counted"] > 0 and syncs["syncs_per_step"] >= 0
    # the baseline BERT runs bf16-mixed, where its default AdamW is unfused: NonFiniteCheck reads its verdict once
    # per step on the host (docs/performance.md); torch's unfused AdamW reads its step counts, CPU tensors on a GPU too
    bert = result["host_syncs"]["bert"]
    sites = {w: n for w, n in bert["where"].items() if "torch/optim/" not in w}
    assert [w.split(":")[0] for w in sites] == ["__bool__ at callbacks/numerics.py"]
    assert list(sites.values()) == [bert["steps_counted"]]
    for name in ("bert_trainer_fp32", "bert_trainer_bf16", "t5_trainer_fp32"):
        assert result["throughput"]["contenders"][name]["mfu_of_bf16_peak"] > 0
    variants = result["compile"]
    assert {variants[v]["compile_blocks"] for v in ("eager_stacking", "compiled_stacking")} == {False, True}
    assert variants["compiled_stacking"]["frames_compiled"] > 0  # the blocks did compile
    for variant in ("eager_stacking", "compiled_stacking", "compiled_dropping"):
        assert variants[variant]["recompiles_every_step"] is False and variants[variant]["steps_per_second"] > 0
    assert set(result["memory"]["peak_bytes"]) == set(PARTS) - {"memory"}
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nThe throughput report.\n\n" + DEVICE_CHECK_START)
    assert text.endswith(DEVICE_CHECK_END + "\n") and result["device"] in text


def test_the_section_is_replaced_in_place_and_the_rest_of_the_file_kept(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\nbefore\n")
    write_markdown(report, f"{DEVICE_CHECK_START}\nfirst\n{DEVICE_CHECK_END}\n")
    report.write_text(report.read_text() + "\nafter\n")
    write_markdown(report, f"{DEVICE_CHECK_START}\nsecond\n{DEVICE_CHECK_END}\n")
    assert report.read_text() == f"# Benchmarks\n\nbefore\n\n{DEVICE_CHECK_START}\nsecond\n{DEVICE_CHECK_END}\n\nafter\n"
    # throughput.py rewrites the whole file: the device check's section stays, at the end
    regenerated = keep_device_check("# Benchmarks\n\nnew figures\n", report)
    assert regenerated == f"# Benchmarks\n\nnew figures\n\n{DEVICE_CHECK_START}\nsecond\n{DEVICE_CHECK_END}\n"
    assert keep_device_check("# Benchmarks\n", tmp_path / "missing.md") == "# Benchmarks\n"


def test_tables_are_named_by_the_gpu_model_and_price_every_shipped_optimizer():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_slug("NVIDIA H200") == "h200"
    assert gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_slug("NVIDIA GeForce RTX 4090") == "4090"
    for model in ("bert", "t5"):
        assert set(shipped_optimizers(model)) == {
            "lightning_modules.optimizers.Lion", "lightning_modules.optimizers.MuonWithAdamW",
            "lightning_modules.optimizers.SophiaG", "pytorch_optimizer.SOAP", "pytorch_optimizer.ScheduleFreeAdamW",
        }
