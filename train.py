"""Entry point: ``python train.py {fit,validate,test,plan,calibrate,score,export,evaluate,compare} ...``.

``fit``/``validate``/``test`` go through LightningCLI; ``plan`` and ``calibrate`` are this project's
commands for the RST budget (``core/planning.py``, ``core/calibration.py``); ``score`` writes the
irreducible losses RHO-loss selects with (``callbacks/batch_selection.py``); ``export`` writes a checkpoint
as a Hugging Face directory (``lightning_modules/export.py``); ``evaluate`` fine-tunes and scores a
checkpoint on a downstream suite (``studies/evaluation.py``); ``compare`` runs a study of methods against
the baseline and reports whether each beat it (``studies/compare.py``).

Every option of the model, the datamodule, the trainer and the callbacks is a typed ``__init__``
argument, overridable on the command line (``--model.num_layers 4``); ``--print_config`` prints the
whole resolved configuration. The datamodule's vocabulary size and sequence length are linked into
the model. After ``fit`` the CLI evaluates the final model on the validation split and prints a
one-line summary: steps, tokens, final validation loss next to the unigram entropy of the targets
(what predicting token frequencies alone would score), where the logs and the checkpoint are.

Problems with the user's input (``UserError``) end the program with one line on stderr and exit
status 2, before any training.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import sys
import warnings

# Quiet, offline-friendly defaults; a user's environment wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from core.errors import TrainingStopped, UserError  # noqa: E402


class PretrainingCLI(LightningCLI):
    """LightningCLI with the data -> model links, resuming by keyword, fresh log versions claimed
    atomically, the non-finite check, and the end-of-fit summary."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.init_args.max_seq_len", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters here, right after parsing: resolve
        # `last`/`last-good` and refuse a damaged file first
        subcommand = self.config.get("subcommand")
        if subcommand in ("fit", "validate", "test"):
            resolve_checkpoint(self.config[subcommand], subcommand)
        try:
            super()._parse_ckpt_path()  # loads with weights_only=True
        except pickle.UnpicklingError as error:
            config = self.config[subcommand]
            if config.get("weights_only") is False:
                return  # trusted by the user: Lightning loads it in full when the run starts
            reason = str(error).split("WeightsUnpickler error: ")[-1].split(". ")[0].strip()
            raise UserError(
                f"--ckpt_path {config.ckpt_path} holds objects that loading with weights_only=True refuses ({reason}); "
                "loading it in full can run code from the file: only if you trust where it came from, add "
                "--weights_only false"
            ) from None

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            claim_log_version(self.config["fit"])

    def instantiate_trainer(self, **kwargs):
        from callbacks.numerics import NonFiniteCheck

        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, NonFiniteCheck) for c in trainer.callbacks):
            trainer.callbacks.append(NonFiniteCheck())
        return trainer

    @property
    def preempted(self) -> bool:
        """A SIGTERM stopped the fit (``RunCheckpoint`` saved it): no final validation, exit status 143."""
        from callbacks.checkpointing import RunCheckpoint

        return any(isinstance(c, RunCheckpoint) and c.preempted for c in self.trainer.callbacks)

    def after_fit(self) -> None:
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        if self.preempted:
            checkpoint = trainer.checkpoint_callback
            if trainer.is_global_zero:
                print(f"pre-empted: stopped by SIGTERM at optimizer step {trainer.global_step}, saved "
                      f"{checkpoint.last_model_path}; continue with --ckpt_path last", flush=True)
            return
        results = trainer.validate(model, datamodule=datamodule, verbose=False)
        val_loss = results[0].get("val/loss") if results else None
        summary = run_summary(trainer, model, datamodule, val_loss)  # on every rank: log_dir is a collective
        if trainer.is_global_zero:
            print(summary, flush=True)


def run_summary(trainer, model, datamodule, val_loss) -> str:
    """One line: optimizer steps, tokens trained on, final validation loss against the unigram entropy of
    the targets, log and checkpoint paths."""
    examples = model.work_done(trainer.world_size).examples("fwd_bwd")
    tokens = int(examples * datamodule.tokens_per_sequence)
    log_dir = trainer.log_dir or "(no logger)"
    checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
    loss = f"{val_loss:.4f}" if val_loss is not None else "n/a"
    entropy = datamodule.target_unigram_entropy
    if entropy is not None:
        loss += f" (unigram entropy of this corpus {entropy:.4f})"
    return (
        f"done: {trainer.global_step} steps, {tokens:,} tokens, final val/loss {loss}; "
        f"TensorBoard logs: {log_dir} (tensorboard --logdir {os.path.dirname(log_dir) or log_dir}); "
        f"checkpoint: {checkpoint or 'none saved'}"
    )


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "GROUP_RANK")
_LAUNCHED_VERSION = "NTNG_LOG_VERSION"  # the version the launching process claimed, for the ranks it starts
_CLAIMED_VERSIONS: list[str] = []  # folders made for a new run: removed if it fails before writing into them


def _is_first_process() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def _logger_root(config) -> tuple[str | None, object]:
    """``<save_dir>/<name>`` of the configured logger (TensorBoard, CSV), and its init_args."""
    init_args = getattr(config.trainer.get("logger"), "init_args", None)
    if init_args is not None and init_args.get("save_dir") is not None and "name" in init_args:
        return os.path.join(str(init_args.save_dir), str(init_args.name or "")), init_args
    return None, init_args


def resolve_checkpoint(config, subcommand: str) -> None:
    """Resolve ``--ckpt_path last|last-good`` to a file of this configuration's runs (a resumed fit logs into
    that run's version directory again); check the integrity of the checkpoint to be loaded.

    Lightning's own ``last`` looks only in the new run's folder, and each start opens a new version.
    """
    from core.checkpoints import RESUME_KEYWORDS, check_checkpoint, resume_target

    ckpt_path = config.get("ckpt_path")
    if "weights_only" in config and config.weights_only is None:
        config.weights_only = True  # whatever torch's default: a checkpoint never runs code unless the user says so
    root, init_args = _logger_root(config)
    if ckpt_path in RESUME_KEYWORDS:
        if root is None:
            raise UserError(f"--ckpt_path {ckpt_path} finds checkpoints through the logger's save_dir and name: "
                            "configure trainer.logger (e.g. TensorBoardLogger), or give the checkpoint file")
        target = resume_target(root, ckpt_path)
        if target is None:
            print(f"warning: --ckpt_path {ckpt_path}: no checkpoint under {root}/version_*/checkpoints yet; starting "
                  "a new run", file=sys.stderr, flush=True)
            config.ckpt_path = None
            return
        for damaged, problem in target.skipped:
            print(f"warning: skipping damaged checkpoint {damaged} ({problem})", file=sys.stderr, flush=True)
        config.ckpt_path = str(target.checkpoint)
        if subcommand == "fit" and init_args.get("version") is None:
            init_args.version = target.version  # the resumed run keeps logging where it left off
        print(f"resuming from {target.checkpoint}", file=sys.stderr, flush=True)
    elif ckpt_path is not None and ckpt_path not in ("best", "hpc") and not str(ckpt_path).startswith("registry"):
        check_checkpoint(ckpt_path)


def claim_log_version(config) -> None:
    """Give a new fit a fresh ``version_N`` made atomically, so two runs started together never share one.

    Processes that Lightning's DDP launcher starts use the version the launching process claimed.
    """
    from core.checkpoints import claim_version

    root, init_args = _logger_root(config)
    if root is None or init_args.get("version") is not None:
        return
    if _is_first_process():
        created, parent = [], os.path.abspath(root)
        while not os.path.exists(parent):  # the folders this claim creates, removed again if the run fails
            created.append(parent)
            parent = os.path.dirname(parent)
        init_args.version = claim_version(root)
        _CLAIMED_VERSIONS.extend([os.path.join(root, init_args.version), *created])
        os.environ[_LAUNCHED_VERSION] = json.dumps([root, init_args.version])
    else:
        claimed_root, version = json.loads(os.environ.get(_LAUNCHED_VERSION, '["", ""]'))
        if claimed_root == root and version:
            init_args.version = version


def _configured(cli_args: list[str], device: str | None = None):
    """Instantiate trainer, model and datamodule from a config without running anything.

    ``device="meta"`` builds the model's tensors without memory or initialisation (``plan`` reads
    only the model's shape and optimizer), so planning a paper-scale model takes a moment.
    """
    import torch

    with contextlib.redirect_stdout(sys.stderr), torch.device(device) if device else contextlib.nullcontext():
        cli = PretrainingCLI(auto_configure_optimizers=False, args=cli_args, run=False)
    return cli.trainer, cli.model, cli.datamodule


def _budget_callback(trainer):
    from callbacks.rst import RSTBudget

    return next((c for c in trainer.callbacks if isinstance(c, RSTBudget)), None)


def plan_command(argv: list[str]) -> None:
    """``train.py plan --config CFG [--table FILE] [--budget DURATION] [overrides]``: print the plan as JSON."""
    from core.cost_table import CostTable
    from core.durations import parse_duration
    from core.planning import plan_run

    parser = argparse.ArgumentParser(prog="train.py plan", description=plan_command.__doc__)
    parser.add_argument("--table", help="RST cost table (default: the config's RSTBudget table)")
    parser.add_argument("--budget", help="RST budget, e.g. 90s, 30m, 24h (default: the config's RSTBudget)")
    known, rest = parser.parse_known_args(argv)
    trainer, model, datamodule = _configured(rest, device="meta")
    budget = _budget_callback(trainer)
    if known.table:
        table = CostTable.load(known.table)
    elif budget is not None and budget.table is not None:
        table = budget.table
    else:
        raise UserError("plan needs a cost table: pass --table FILE or configure an RSTBudget callback with a table")
    if known.budget:
        seconds = parse_duration(known.budget)
    elif budget is not None:
        seconds = budget.budget_seconds
    else:
        raise UserError("plan needs a budget: pass --budget DURATION (e.g. 24h) or configure an RSTBudget callback")
    print(json.dumps(plan_run(trainer, model, datamodule, table, seconds), indent=2))


def _optimizer_builders(model, class_paths: str | None) -> list:
    """Functions that build each optimizer class named in ``class_paths`` (comma-separated) over ``model``
    with the class's defaults, grouped as the module groups its parameters (``build_optimizer``)."""
    import importlib

    builders = []
    for path in filter(None, (class_paths or "").split(",")):
        module_name, _, class_name = path.strip().rpartition(".")
        try:
            optimizer_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError):
            raise UserError(f"--optimizers: cannot import {path!r}; give class paths, e.g. "
                            "lightning_modules.optimizers.Lion,pytorch_optimizer.SOAP") from None

        def build(optimizer_class=optimizer_class):
            saved, model.optimizer_factory = model.optimizer_factory, optimizer_class
            try:
                return model.build_optimizer()
            finally:
                model.optimizer_factory = saved

        builders.append(build)
    return builders


def calibrate_command(argv: list[str]) -> None:
    """``train.py calibrate --config CFG --output FILE [--optimizers A,B] [--update]``: measure a cost table."""
    from core.calibration import calibrate, time_optimizer_steps
    from core.cost_table import CostTable

    parser = argparse.ArgumentParser(prog="train.py calibrate", description=calibrate_command.__doc__)
    parser.add_argument("--output", required=True, help="where to write the table (JSON, written atomically)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before each measurement")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations; their median is one round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all depths; the fastest is kept")
    parser.add_argument("--optimizers", help="more optimizers to time besides the config's, as class paths, "
                        "e.g. lightning_modules.optimizers.Lion,lightning_modules.optimizers.SophiaG")
    parser.add_argument("--update", action="store_true", help="time only the optimizers' steps and add them to "
                        "the existing table at --output (its other prices are kept)")
    known, rest = parser.parse_known_args(argv)
    if known.warmup < 0 or known.iterations < 1 or known.rounds < 1:
        raise UserError("--warmup must be >= 0, --iterations and --rounds >= 1")
    trainer, model, datamodule = _configured(rest)
    builders = _optimizer_builders(model, known.optimizers)
    device = trainer.strategy.root_device
    if known.update:
        if not builders:
            raise UserError("--update times the optimizers named by --optimizers: name at least one")
        table = CostTable.load(known.output)
        table.check_run(micro_batch_size=datamodule.batch_size, seq_len=datamodule.seq_len, num_layers=model.num_layers)
        batch = {k: v.to(device) for k, v in datamodule.synthetic_batch(datamodule.batch_size).items()}
        model.to(device).train()

        def make_gradients() -> None:
            model.zero_grad(set_to_none=True)
            loss, _ = model.compute_loss(batch)
            loss.backward()

        measured = time_optimizer_steps(model, make_gradients, builders, device, known.warmup, known.iterations,
                                        known.rounds)
        table.optimizer_step_seconds.update(measured)
        table.save(known.output)
        for name, seconds in measured.items():
            print(f"  optimizer step ({name}): {seconds * 1e3:.3f} ms")
        print(f"updated {known.output}: optimizer step prices for {', '.join(measured)}")
        return
    print(f"Calibrating {type(model).__name__} ({model.num_layers} layers), micro-batch {datamodule.batch_size} "
          f"x {datamodule.seq_len} tokens, precision {trainer.precision}, on {device}:")
    table = calibrate(
        model,
        datamodule.synthetic_batch(datamodule.batch_size),
        device=device,
        precision=str(trainer.precision),
        seq_len=datamodule.seq_len,
        warmup=known.warmup,
        iterations=known.iterations,
        rounds=known.rounds,
        extra_optimizers=builders,
    )
    table.save(known.output)
    full = table.fwd_bwd_seconds[-1]
    print(f"wrote {known.output}: {full * 1e3:.3f} ms per forward+backward micro-batch at {model.num_layers} layers "
          f"({datamodule.batch_size * datamodule.seq_len / full:,.0f} tokens/s)")


def score_command(argv: list[str]) -> None:
    """``train.py score --config CFG [--config OVERLAY] --ckpt_path PATH|last --output FILE.npy [--passes N]``:
    write the irreducible loss of every training example (RHO-loss) and its JSON sidecar."""
    from callbacks.batch_selection import score_training_examples
    from core.checkpoints import check_checkpoint, resume_target

    parser = argparse.ArgumentParser(prog="train.py score", description=score_command.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="the irreducible-loss model's checkpoint, or 'last' "
                        "(the newest last.ckpt of this config's runs)")
    parser.add_argument("--output", required=True, help="where to write the losses (.npy; the sidecar goes beside it, .json)")
    parser.add_argument("--passes", type=int, default=1, help="passes of training masks to score (default 1); RhoLoss "
                        "masks pass p like pass p mod PASSES")
    parser.add_argument("--batch_size", type=int, default=None, help="examples per forward (default: data.eval_batch_size)")
    known, rest = parser.parse_known_args(argv)
    if not known.output.endswith(".npy"):
        raise UserError(f"--output {known.output}: name the file .npy (numpy, no pickle)")
    trainer, model, datamodule = _configured(rest)
    checkpoint = known.ckpt_path
    if checkpoint == "last":  # the newest intact checkpoint of this config's runs, as `fit --ckpt_path last`
        root = os.path.join(trainer.logger.save_dir, trainer.logger.name)
        target = resume_target(root, "last")
        if target is None:
            raise UserError(f"--ckpt_path last: no checkpoint under {root}/version_*/checkpoints: train that model first")
        checkpoint = str(target.checkpoint)
    else:
        check_checkpoint(checkpoint)
    sidecar = score_training_examples(trainer, model, datamodule, checkpoint, known.output, known.passes, known.batch_size)
    costs = sidecar["costs"]
    priced = f"{costs['scoring_rst_seconds']:.1f} RST-seconds" if costs["scoring_rst_seconds"] is not None else "unpriced"
    print(f"wrote {known.output}: {sidecar['examples']['num_examples']:,} training examples x {known.passes} pass(es), "
          f"mean irreducible loss {sidecar['mean_loss']:.4f}, scored by {checkpoint} in {costs['scoring_wall_seconds']:.1f} s "
          f"({priced}); sidecar {known.output[:-4]}.json")


def export_command(argv: list[str]) -> None:
    """``train.py export --ckpt_path CKPT --output DIR [--tokenizer DIR]``: write a pre-training checkpoint as a
    Hugging Face directory (config, safetensors weights, tokenizer, model card) that ``AutoModelForMaskedLM`` /
    ``AutoModelForSeq2SeqLM`` and ``AutoTokenizer`` load."""
    from lightning_modules.export import export_checkpoint

    parser = argparse.ArgumentParser(prog="train.py export", description=export_command.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of BertMLM or T5SpanCorruption (e.g. .../last.ckpt)")
    parser.add_argument("--output", required=True, help="the directory to write")
    parser.add_argument("--tokenizer", help="the tokenizer directory, for checkpoints that hold none (older versions)")
    known = parser.parse_args(argv)
    loaded = export_checkpoint(known.ckpt_path, known.output, known.tokenizer)
    auto = "AutoModelForMaskedLM" if loaded.family == "bert" else "AutoModelForSeq2SeqLM"
    print(f"wrote {known.output}: {type(loaded.module.model).__name__} ({loaded.module.num_layers} layers, "
          f"{sum(p.numel() for p in loaded.module.model.parameters()):,} parameters) and its tokenizer; load it with "
          f"{auto}.from_pretrained({known.output!r}) and AutoTokenizer.from_pretrained({known.output!r})")


def evaluate_command(argv: list[str]) -> None:
    """``train.py evaluate --ckpt_path CKPT|DIR --suite {glue,superglue,sni,offline} --output FILE.json [--seeds 0,1,2]``:
    fine-tune and score the checkpoint on every task of the suite (the last epoch's scores, the median over seeds)."""
    from studies.evaluation import SUITES, Recipe, evaluate_checkpoint

    parser = argparse.ArgumentParser(prog="train.py evaluate", description=evaluate_command.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a pre-training checkpoint (.ckpt) or a train.py export directory")
    parser.add_argument("--suite", required=True, help=f"one of {', '.join(SUITES)}")
    parser.add_argument("--output", required=True, help="the JSON file to write")
    parser.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds (default 0; the paper: several)")
    parser.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
    parser.add_argument("--select", default="last", choices=["last", "best"],
                        help="score of the last epoch (default) or the best epoch per metric (the paper's code; optimistic)")
    parser.add_argument("--data_dir", help="local files in the hub's schema for glue/superglue/sni (no hub access)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision of the fine-tuning (default 32-true)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    for name, field in Recipe.__dataclass_fields__.items():
        kind = {"float": float, "int": int, "str": str}.get(str(field.type).split(" ")[0], int)
        parser.add_argument(f"--{name}", type=kind, help=f"override the suite's {name}")
    known = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in known.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {known.seeds}: give comma-separated integers, e.g. 0,1,2") from None
    overrides = {name: getattr(known, name) for name in Recipe.__dataclass_fields__}
    evaluate_checkpoint(known.ckpt_path, known.suite, known.output, seeds=seeds,
                        tasks=[t.strip() for t in known.tasks.split(",")] if known.tasks else None, overrides=overrides,
                        select=known.select, data_dir=known.data_dir, precision=known.precision,
                        progress=not known.no_progress and sys.stderr.isatty(),
                        log=lambda text: print(text, flush=True))
    print(f"wrote {known.output}")


def compare_command(argv: list[str]) -> None:
    """``train.py compare --study FILE [--output DIR] [--launcher local|print|slurm] [--report] [--run ID]``: run the
    study's methods, budgets and seeds (skipping finished runs, continuing interrupted ones) and write its report."""
    from studies.compare import load_study, run_study, write_report

    parser = argparse.ArgumentParser(prog="train.py compare", description=compare_command.__doc__)
    parser.add_argument("--study", required=True, help="the study file (YAML), e.g. configs/studies/smoke.yaml")
    parser.add_argument("--output", help="the study directory (default runs/studies/<name>)")
    parser.add_argument("--launcher", default="local", choices=["local", "print", "slurm"],
                        help="local: one run after another here (default); print: the runs' commands, one per line; "
                             "slurm: a job-array script")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the runs on disk")
    parser.add_argument("--run", help="run only this run (its id, e.g. baseline/60s/seed0; what print and slurm launch)")
    known = parser.parse_args(argv)
    study = load_study(known.study, known.output)
    log = lambda text: print(text, flush=True)  # noqa: E731
    if known.report:
        write_report(study, log)
    else:
        run_study(study, known.launcher, known.run, log)


PROJECT_COMMANDS = {"plan": plan_command, "calibrate": calibrate_command, "score": score_command, "export": export_command,
                    "evaluate": evaluate_command, "compare": compare_command}


def main(args: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # the training stream shards its batches across workers itself (datamodules/streams.py)
    warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
    # ... and resumes mid-epoch from the data module's checkpoint state (the batches consumed), not the loader's
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    argv = sys.argv[1:] if args is None else list(args)
    _CLAIMED_VERSIONS.clear()
    try:
        if argv and argv[0] in PROJECT_COMMANDS:
            PROJECT_COMMANDS[argv[0]](argv[1:])
        else:
            cli = PretrainingCLI(save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=argv)
            _close_process_group()
            if cli.preempted:
                from callbacks.checkpointing import SIGTERM_EXIT_STATUS

                raise SystemExit(SIGTERM_EXIT_STATUS)
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is not None and not isinstance(user_error, TrainingStopped):
            _remove_claimed_folders()  # bad input: no partial output from a run that never trained
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def _remove_claimed_folders() -> None:
    """Remove the version folder this process claimed for a new run (only what the run wrote: its config
    and empty logs, never a folder holding checkpoints) and the parent folders the claim created."""
    import shutil

    version, *parents = _CLAIMED_VERSIONS or [None]
    if version is None or os.path.isdir(os.path.join(version, "checkpoints")):
        return
    shutil.rmtree(version, ignore_errors=True)
    for parent in parents:
        with contextlib.suppress(OSError):
            os.rmdir(parent)  # only if empty


def _close_process_group() -> None:
    """Shut a DDP process group down before the interpreter exits: gloo aborts the process otherwise, now and then."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def find_user_error(error: BaseException | None) -> UserError | None:
    """The ``UserError`` behind ``error``: jsonargparse and Lightning wrap exceptions raised in ``__init__``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    main()
