"""``train.py evaluate``: fine-tune a pre-trained checkpoint on every task of a suite and score it.

Suites (the paper's section 3; the recipes its code used, docs/paper.md "Downstream"):

- ``glue``: CoLA (MCC), SST-2, MRPC (F1), QQP (F1), STS-B (Pearson), MNLI matched and mismatched, QNLI,
  RTE; the average takes the 9 numbers the paper averages (MNLI counted twice). AdamW 4e-5, batch 16,
  5 epochs, cosine with 10 % warm-up, length 128.
- ``superglue``: BoolQ, CB (macro F1), COPA, RTE, WiC, WSC (the paper's average). 5e-5, batch 16, 10 epochs.
- ``sni``: Super-Natural-Instructions, Rouge-L (T5). 5e-5 constant, batch 8, 2 epochs, 1024/128 tokens.
- ``offline``: the tasks that need no hub, at demo scale (minutes on a 2-core CPU): for BERT review
  sentiment, news topic and tweet sentiment; for T5 headline generation.

Each task is fine-tuned from a fresh copy of the pre-trained weights once per seed; the scores of the
**last** epoch are reported (``--select best``: the paper's optimistic best epoch, labelled), the
median over seeds as the paper did, with the spread (min, max). One JSON, TensorBoard scalars next to
the pre-training run (``<run>/downstream/<suite>/``), and a printed table.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from core.errors import UserError

__all__ = ["POOLINGS", "SUITES", "Recipe", "architecture_of", "evaluate_checkpoint", "suite_tasks"]

POOLINGS = ("first", "mean")


@dataclass(frozen=True)
class Recipe:
    """The fine-tuning settings of a suite (every field overridable from the command line)."""

    learning_rate: float
    batch_size: int
    epochs: int
    max_length: int = 128
    max_target_length: int = 64
    lr_schedule: str = "cosine"
    warmup_fraction: float = 0.1
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    eval_batch_size: int = 64
    pooling: str = "first"
    dropout: float = 0.1
    layer_decay: float = 1.0


# suite -> family -> (tasks, recipe)
SUITES: dict[str, dict[str, tuple[tuple[str, ...], Recipe]]] = {
    "glue": {"bert": (("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"), Recipe(4e-5, 16, 5))},
    "superglue": {"bert": (("boolq", "cb", "copa", "superglue-rte", "wic", "wsc"), Recipe(5e-5, 16, 10))},
    "sni": {"t5": (("sni",), Recipe(5e-5, 8, 2, max_length=1024, max_target_length=128, lr_schedule="constant",
                                    warmup_fraction=0.0, eval_batch_size=32))},
    "offline": {
        "bert": (("reviews", "news-topic", "tweets"),
                 Recipe(1e-3, 32, 6, max_length=128, max_train_examples=2000, max_eval_examples=1000, pooling="mean")),
        "t5": (("headlines",), Recipe(3e-3, 16, 3, max_length=192, max_target_length=24, lr_schedule="constant",
                                     warmup_fraction=0.0, max_eval_examples=200)),
    },
}


def suite_tasks(suite: str, family: str, only: list[str] | None = None) -> tuple[tuple[str, ...], Recipe]:
    if suite not in SUITES:
        raise UserError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if family not in SUITES[suite]:
        wanted = " or ".join(f.upper() for f in SUITES[suite])
        raise UserError(f"suite {suite} fine-tunes {wanted} checkpoints; this checkpoint is {family.upper()}")
    tasks, recipe = SUITES[suite][family]
    if only:
        unknown = [t for t in only if t not in tasks]
        if unknown:
            raise UserError(f"task {unknown[0]!r} is not in suite {suite} for {family.upper()}; its tasks: {', '.join(tasks)}")
        tasks = tuple(only)
    return tasks, recipe


def _family_of_directory(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"--ckpt_path {path}: a directory without config.json (give a .ckpt or a train.py export directory)")
    model_type = json.loads(config.read_text()).get("model_type")
    families = {"roberta-prelayernorm": "bert", "t5": "t5"}
    if model_type not in families:
        raise UserError(f"--ckpt_path {path}: model_type {model_type!r} is not one this project exports")
    return families[model_type]


def _pretrained_directory(ckpt_path: Path, workdir: Path, suite: str, tasks: list[str] | None) -> tuple[str, Path, dict[str, Any]]:
    """(family, exported directory, pre-training facts) of a checkpoint or an exported directory; the suite and
    tasks are checked against the family before anything is written."""
    if ckpt_path.is_dir():
        family = _family_of_directory(ckpt_path)
        suite_tasks(suite, family, tasks)
        facts_file = ckpt_path / "training_facts.json"
        return family, ckpt_path, json.loads(facts_file.read_text()) if facts_file.is_file() else {}
    from transformers.utils import logging as hf_logging

    from lightning_modules.export import export_checkpoint, load_checkpoint

    loaded = load_checkpoint(ckpt_path)
    suite_tasks(suite, loaded.family, tasks)
    hf_logging.disable_progress_bar()
    try:
        export_checkpoint(ckpt_path, workdir / "pretrained", loaded=loaded)
    finally:
        hf_logging.enable_progress_bar()
    return loaded.family, workdir / "pretrained", {k: v for k, v in loaded.facts.items() if k != "config"}


_NOT_ARCHITECTURE = ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype")


def architecture_of(pretrained: Path) -> str:
    """A hash of the export's ``config.json`` without the fields that do not shape the network: exports of one
    architecture share it, whatever method or budget trained them (``train.py compare`` runs one control each)."""
    from core.sealing import json_sha256

    config = json.loads((pretrained / "config.json").read_text())
    return json_sha256({k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE})[:16]


def _max_positions(pretrained: Path) -> int | None:
    """Longest input a BERT export takes (RoBERTa's positions start after the padding id); T5's are relative."""
    config = json.loads((pretrained / "config.json").read_text())
    if "max_position_embeddings" not in config:
        return None
    return int(config["max_position_embeddings"]) - int(config.get("pad_token_id") or 0) - 1


def _log_root(ckpt_path: Path, output: Path) -> Path:
    """The pre-training run's log directory (``<run>/checkpoints/x.ckpt`` -> ``<run>``), else beside the output."""
    run = ckpt_path.parent.parent if ckpt_path.suffix == ".ckpt" else ckpt_path
    return run if (run / "hparams.yaml").is_file() or (run / "config.yaml").is_file() else output.parent


def _finetune(task_name: str, family: str, pretrained: Path, recipe: Recipe, seed: int, datamodule, log_dir: Path,
              suite: str, precision: str, progress: bool, version: str = "") -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from datamodules.downstream import TASKS
    from lightning_modules.finetuning import SequenceClassifier, TextToText

    task = TASKS[task_name]
    L.seed_everything(seed, verbose=False)
    datamodule.setup("fit")
    common = dict(learning_rate=recipe.learning_rate, lr_schedule=recipe.lr_schedule,
                  warmup_fraction=recipe.warmup_fraction, eval_splits=task.eval_splits)
    if family == "bert":
        module = SequenceClassifier(str(pretrained), num_labels=task.num_labels, metrics=task.metrics,
                                    pooling=recipe.pooling, dropout=recipe.dropout, layer_decay=recipe.layer_decay,
                                    **common)
    else:
        module = TextToText(str(pretrained), references={s: datamodule.references(s) for s in task.eval_splits},
                            max_new_tokens=recipe.max_target_length, dropout=recipe.dropout, **common)
    trainer = L.Trainer(
        max_epochs=recipe.epochs, accelerator="auto", devices=1, precision=precision, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress, log_every_n_steps=10,
        logger=TensorBoardLogger(log_dir, name=suite, version=f"{task_name}-seed{seed}{version}", default_hp_metric=False),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return {"epochs": module.epoch_scores, "last": module.reported_scores("last"), "best": module.reported_scores("best"),
            "wall_seconds": time.perf_counter() - start, "train_examples": len(datamodule.raw["train"]),
            "eval_examples": {s: len(datamodule.raw[s]) for s in task.eval_splits}, "steps": trainer.global_step}


def evaluate_checkpoint(ckpt_path: str, suite: str, output: str, seeds: list[int] | None = None,
                        tasks: list[str] | None = None, overrides: dict[str, Any] | None = None, select: str = "last",
                        data_dir: str | None = None, precision: str = "32-true", progress: bool = True,
                        control: str | None = None, control_only: bool = False, tuning: bool = False,
                        references: bool = True, log=print) -> dict[str, Any]:
    """Fine-tune and score every task of ``suite`` from ``ckpt_path``; write ``output`` (JSON); return the result.

    ``control="random-init"``: also fine-tune a randomly initialised copy of the architecture per seed
    (``studies.control``) and report the pre-training gain; ``control_only``: only the control (``train.py
    compare`` runs it once per architecture). ``tuning``: score on a held-out part of the training split
    instead of the validation split, for choosing a recipe (``DownstreamDataModule``). ``references``: print the
    majority-class and TF-IDF (or lead-N) scores beside the model's (``studies.references``).
    """
    from datamodules.downstream import TASKS
    from datamodules.finetuning import DownstreamDataModule
    from studies.control import CONTROLS, pretraining_gain, random_init_copy, seed_scores, suite_seed_scores

    if select not in ("last", "best"):
        raise UserError(f"--select {select}: use last (what is reported by default) or best (the paper's choice)")
    if suite not in SUITES:
        raise UserError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if control is not None and control not in CONTROLS:
        raise UserError(f"--control {control}: choose from {', '.join(CONTROLS)}")
    if control_only and control is None:
        raise UserError("--control_only needs --control random-init")
    seeds = seeds or [0]
    path, out = Path(ckpt_path), Path(output)
    if not path.exists():
        raise UserError(f"--ckpt_path {path}: no such checkpoint or directory")
    with tempfile.TemporaryDirectory(prefix="ntng-evaluate-") as tmp:
        family, pretrained, facts = _pretrained_directory(path, Path(tmp), suite, tasks)
        names, recipe = suite_tasks(suite, family, tasks)
        unknown = set(overrides or {}) - set(Recipe.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown fine-tuning setting {sorted(unknown)[0]!r}")
        recipe = replace(recipe, **{k: v for k, v in (overrides or {}).items() if v is not None})
        if recipe.pooling not in POOLINGS:
            raise UserError(f"--pooling {recipe.pooling}: choose from {', '.join(POOLINGS)}")
        if family == "t5" and recipe.layer_decay != 1.0:
            raise UserError(f"--layer_decay {recipe.layer_decay}: layer-wise rates are for BERT; T5 fine-tunes at one rate")
        architecture = architecture_of(pretrained)
        positions = _max_positions(pretrained)
        if positions is not None and recipe.max_length > positions:
            log(f"max_length {recipe.max_length} -> {positions}: the pre-trained model has {positions} positions")
            recipe = replace(recipe, max_length=positions)
        datamodules = {}
        for name in names:  # read and check every task's data before any fine-tuning
            datamodules[name] = DownstreamDataModule(
                name, str(pretrained), max_length=recipe.max_length, max_target_length=recipe.max_target_length,
                batch_size=recipe.batch_size, eval_batch_size=recipe.eval_batch_size,
                max_train_examples=recipe.max_train_examples, max_eval_examples=recipe.max_eval_examples,
                data_dir=data_dir, tuning_holdout=tuning)
            datamodules[name].load()
        controls = {seed: random_init_copy(pretrained, Path(tmp) / f"control-seed{seed}", seed)
                    for seed in seeds} if control else {}
        log_dir = _log_root(path, out) / "downstream"
        results: dict[str, Any] = {}
        control_results: dict[str, Any] = {}
        for name in names:
            runs, control_runs = {}, {}
            for seed in seeds:
                if not control_only:
                    log(f"fine-tuning {name} (seed {seed}) ...")
                    runs[seed] = _finetune(name, family, pretrained, recipe, seed, datamodules[name], log_dir, suite,
                                           precision, progress)
                if control:
                    log(f"fine-tuning {name} (seed {seed}), {control} control ...")
                    control_runs[seed] = _finetune(name, family, controls[seed], recipe, seed, datamodules[name],
                                                   log_dir, suite, precision, progress, version=f"-{control}")
            if runs:
                results[name] = _summarize_task(TASKS[name], runs, select)
            if control_runs:
                control_results[name] = _summarize_task(TASKS[name], control_runs, select)
        reference_scores = _references(datamodules, recipe, log) if references else {}
    if control_only:
        results, control_results = control_results, {}
    result = {
        "suite": suite, "family": family, "checkpoint": str(path), "select": select, "seeds": seeds,
        "weights": f"{control} control" if control_only else "pre-trained",
        "scored_on": "a held-out part of the training split (tuning)" if tuning else "the evaluation splits",
        "recipe": asdict(recipe), "tasks": results, **_average(results), "pretraining": facts,
        "architecture": architecture,
    }
    if control_results:
        result["control"] = {"kind": control, "tasks": control_results, **_average(control_results)}
        gains = {name: pretraining_gain(seed_scores(results[name]), seed_scores(control_results[name]))
                 for name in results}
        gains["average"] = pretraining_gain(suite_seed_scores(results), suite_seed_scores(control_results))
        result["pretraining_gain"] = gains
    if reference_scores:
        result["references"] = reference_scores
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _log_summary(log_dir / suite, result)
    log(table(result))
    return result


def _average(tasks: dict[str, Any]) -> dict[str, Any]:
    reported = [entry["median"] for r in tasks.values() for entry in r["reported"].values()]
    return {"average": statistics.fmean(reported) if reported else None,
            "average_of": [f"{t}/{k}" for t, r in tasks.items() for k in r["reported"]]}


def _references(datamodules: dict[str, Any], recipe: Recipe, log) -> dict[str, Any]:
    """The reference scores of every task, on exactly the examples the model trains on and is scored on."""
    from studies.references import task_references

    scores = {}
    for name, datamodule in datamodules.items():
        log(f"reference scores of {name} (majority class, TF-IDF or lead-N) ...")
        scores[name] = task_references(name, datamodule.raw, recipe.max_train_examples, recipe.max_eval_examples,
                                       datamodule.cache_dir)
    return scores


def _summarize_task(task, runs: dict[int, dict[str, Any]], select: str) -> dict[str, Any]:
    reported = {}
    for split, metric in task.reported:
        key = f"{split}/{metric}"
        scores = [run[select][key] for run in runs.values()]
        reported[key] = {"median": statistics.median(scores), "min": min(scores), "max": max(scores),
                         "by_seed": dict(zip(map(str, runs), scores, strict=True))}
    return {"metric": list(reported), "reported": reported, "score": statistics.fmean(e["median"] for e in reported.values()),
            "runs": {str(seed): run for seed, run in runs.items()}}


def _log_summary(log_dir: Path, result: dict[str, Any]) -> None:
    """Scalars next to the pre-training run: downstream/<suite>/<task>/<metric> and the suite average, at the
    pre-training step count (so runs of a study line up in TensorBoard)."""
    from torch.utils.tensorboard import SummaryWriter

    step = int(result["pretraining"].get("global_step") or 0)
    with SummaryWriter(str(log_dir)) as writer:
        for task, summary in result["tasks"].items():
            for key, entry in summary["reported"].items():
                writer.add_scalar(f"downstream/{result['suite']}/{task}/{key}", entry["median"], step)
        if result["average"] is not None:
            writer.add_scalar(f"downstream/{result['suite']}/average", result["average"], step)


def _gain_text(gain: dict[str, Any] | None) -> str:
    if gain is None:
        return ""
    text = f"{gain['gain']:+6.2f}"
    if gain["p_value"] is not None:
        text += f" [{gain['low']:+.2f}, {gain['high']:+.2f}] p={gain['p_value']:.3f}"
    return text


def _reference_text(references: dict[str, Any] | None, key: str) -> str:
    if not references:
        return ""
    parts = []
    if key in references.get("majority", {}):
        parts.append(f"majority {references['majority'][key]:.2f}")
    if key in references.get("tfidf", {}):
        parts.append(f"TF-IDF {references['tfidf'][key]:.2f}")
    if key in references.get("lead_n", {}):
        parts.append(f"lead-{references['lead_n']['n']} {references['lead_n'][key]:.2f}")
    return ", ".join(parts)


def table(result: dict[str, Any]) -> str:
    """The printed table: the model's scores (median over seeds, min..max), and when present the control's,
    the pre-training gain (mean over seeds, 95 % interval, p) and the reference scores."""
    seeds = len(result["seeds"])
    control = result.get("control")
    gains = result.get("pretraining_gain", {})
    references = result.get("references", {})
    lines = [f"{result['suite']} ({result['family'].upper()}, {result.get('weights', 'pre-trained')} weights, "
             f"{result['select']} epoch, median of {seeds} seed(s) and min..max; scored on "
             f"{result.get('scored_on', 'the evaluation splits')}):"]
    header = f"  {'task':<12} {'metric':<22} {'score':>7} {'spread':>13}"
    if control:
        header += f" {'control':>8} {'spread':>13}  gain [95 % interval] p (mean over seeds)"
    lines.append(header + ("  references" if references else ""))
    for task, summary in result["tasks"].items():
        for index, (key, entry) in enumerate(summary["reported"].items()):
            line = f"  {task:<12} {key:<22} {entry['median']:7.2f} {entry['min']:6.2f}..{entry['max']:<6.2f}"
            if control:
                other = control["tasks"][task]["reported"][key]
                line += f" {other['median']:8.2f} {other['min']:6.2f}..{other['max']:<6.2f}"
                line += f"  {_gain_text(gains.get(task)) if index == 0 else '':<38}"
            lines.append((line + "  " + _reference_text(references.get(task), key)).rstrip())
    if result["average"] is not None:
        line = f"  {'average':<12} {'':<22} {result['average']:7.2f} {'':>13}"
        if control:
            line += f" {control['average']:8.2f} {'':>13}  {_gain_text(gains.get('average'))}"
        lines.append(line.rstrip())
    return "\n".join(lines)
