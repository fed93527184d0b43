"""``fit``, ``validate`` and ``test``: LightningCLI with this project's additions.

Every option of the model, the data module, the trainer and the callbacks is a typed ``__init__`` argument,
overridable on the command line (``--model.num_layers 4``); ``--print_config`` prints the resolved
configuration. The data module's vocabulary size and sequence length are linked into the model. A fit adds
``NonFiniteCheck`` when the config has none, shows Lightning's progress bar with host numbers
(``callbacks.progress``: no read of the device per step), claims a fresh log version, resolves ``--ckpt_path last``, and
ends with a validation of the final model, a one-line summary and ``summary.json`` (``training.summary``).

``configured`` builds trainer, model and data module from a config without running anything (``plan``,
``calibrate``, ``score``, the benchmark); ``parsed_config`` only merges and checks configs (``compare``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pickle
import sys

from lightning.pytorch.cli import LightningCLI

from callbacks.checkpointing import RunCheckpoint
from callbacks.numerics import NonFiniteCheck, NonFiniteError
from callbacks.progress import with_host_values
from core.errors import UserError
from training.command_line import apply_overrides, condense_parser_error, split_overrides
from training.run_folder import claim_log_version, record_fingerprint, resolve_checkpoint
from training.summary import summarize_fit, write_summary

__all__ = ["PretrainingCLI", "configured", "parsed_config"]


class PretrainingCLI(LightningCLI):
    """LightningCLI with the data -> model links, resuming by keyword, fresh log versions claimed
    atomically, the non-finite check, and the end-of-fit summary; ``--budget`` and callback arguments by class
    name (``training.command_line``); parser errors raised (``argparse.ArgumentError``), not printed with the
    usage text."""

    def __init__(self, *positional, args: list[str] | None = None, parser_kwargs: dict | None = None, **kwargs) -> None:
        argv, self.overrides = split_overrides(sys.argv[1:] if args is None else list(args))
        raising = {"exit_on_error": False}
        parser_kwargs = {**raising, **{name: dict(raising) for name in ("fit", "validate", "test")}, **(parser_kwargs or {})}
        super().__init__(*positional, args=argv, parser_kwargs=parser_kwargs, **kwargs)

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
        apply_overrides(self.config[self.subcommand] if self.subcommand else self.config, self.overrides)
        if self.subcommand == "fit":
            claim_log_version(self.config["fit"])
            record_fingerprint(self.config["fit"])

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, NonFiniteCheck) for c in trainer.callbacks):
            trainer.callbacks.append(NonFiniteCheck())
        with_host_values(trainer)  # Lightning's default bar shows host numbers: no read of the device per step
        return trainer

    def fit(self, model, datamodule=None, **kwargs) -> None:
        """``trainer.fit``; a run stopped on non-finite numbers leaves a ``diverged`` summary.json before the error."""
        try:
            self.trainer.fit(model, datamodule=datamodule, **kwargs)
        except NonFiniteError as error:
            train_loss = self.trainer.callback_metrics.get("train/loss")
            summary = summarize_fit(self.trainer, model, datamodule, train_loss, None, status="diverged", error=str(error))
            if self.trainer.is_global_zero:
                write_summary(summary)
            raise

    @property
    def preempted(self) -> bool:
        """A SIGTERM stopped the fit (``RunCheckpoint`` saved it): no final validation, exit status 143."""
        return any(isinstance(c, RunCheckpoint) and c.preempted for c in self.trainer.callbacks)

    def after_fit(self) -> None:
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        train_loss = trainer.callback_metrics.get("train/loss")  # the last step's: validation resets the metrics
        if self.preempted:
            summary = summarize_fit(trainer, model, datamodule, train_loss, None, status="preempted")
            if trainer.is_global_zero:
                write_summary(summary)
                print(f"pre-empted: stopped by SIGTERM at optimizer step {trainer.global_step}, saved "
                      f"{summary.checkpoint}; continue with --ckpt_path last", flush=True)
            return
        results = trainer.validate(model, datamodule=datamodule, verbose=False)
        val_loss = results[0].get("val/loss") if results else None
        summary = summarize_fit(trainer, model, datamodule, train_loss, val_loss)  # on every rank: log_dir is a collective
        if trainer.is_global_zero:
            write_summary(summary)
            print(summary.line(), flush=True)


def configured(cli_args: list[str], device: str | None = None):
    """Trainer, model and data module of a config (``--config FILE`` and overrides), without running anything.

    ``device="meta"`` builds the model's tensors without memory or initialisation (``plan`` reads only the
    model's shape and optimizer), so planning a paper-scale model takes a moment. Lightning's messages go to
    stderr, so that a command's stdout holds only its own output.
    """
    import torch

    with contextlib.redirect_stdout(sys.stderr), torch.device(device) if device else contextlib.nullcontext():
        cli = PretrainingCLI(auto_configure_optimizers=False, args=cli_args, run=False)
    return cli.trainer, cli.model, cli.datamodule


class _ConfigOnly(PretrainingCLI):
    """Parses and checks a configuration; instantiates nothing."""

    def instantiate_classes(self) -> None:
        pass

    def _set_seed(self) -> None:
        pass


def parsed_config(configs: list[str] | tuple[str, ...]) -> str:
    """The config files merged and checked by the CLI's own parser, as YAML (every default filled in).

    Raises:
        UserError: the configs do not parse; the message is the line of the parser's report that says why
            (``condense_parser_error``: a missing module is named as such).
    """
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            cli = _ConfigOnly(args=[arg for config in configs for arg in ("--config", config)], run=False,
                              auto_configure_optimizers=False)
            return cli.parser.dump(cli.config, skip_none=False)
    except argparse.ArgumentError as error:
        raise UserError(condense_parser_error(str(error))) from None
