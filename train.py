"""Entry point: ``python train.py {fit,validate,test} --config CFG`` through LightningCLI.

Every option of the model, the datamodule, the trainer and the callbacks is a typed ``__init__``
argument, overridable on the command line (``--model.num_layers 4``); ``--print_config`` prints the
whole resolved configuration. The datamodule's vocabulary size and sequence length are linked into
the model. After ``fit`` the CLI evaluates the final model on the validation split and prints a
one-line summary: steps, tokens, final validation loss, where the logs and the checkpoint are.

Problems with the user's input (``UserError``) end the program with one line on stderr and exit
status 2, before any training.
"""

from __future__ import annotations

import os
import sys
import warnings

# Quiet, offline-friendly defaults; a user's environment wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightning_modules.errors import UserError  # noqa: E402


class PretrainingCLI(LightningCLI):
    """LightningCLI with the data -> model links and the end-of-fit summary."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.init_args.max_seq_len", apply_on="instantiate")

    def after_fit(self) -> None:
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        results = trainer.validate(model, datamodule=datamodule, verbose=False)
        val_loss = results[0].get("val/loss") if results else None
        if trainer.is_global_zero:
            print(run_summary(trainer, model, datamodule, val_loss), flush=True)


def run_summary(trainer, model, datamodule, val_loss) -> str:
    """One line: optimizer steps, tokens trained on, final validation loss, log and checkpoint paths."""
    ledger = getattr(model, "work_ledger", None)
    examples = ledger.examples("fwd_bwd") * trainer.world_size if ledger is not None else 0
    tokens = int(examples * getattr(datamodule, "tokens_per_sequence", 0))
    log_dir = trainer.log_dir or "(no logger)"
    checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
    loss = f"{val_loss:.4f}" if val_loss is not None else "n/a"
    return (
        f"done: {trainer.global_step} steps, {tokens:,} tokens, final val/loss {loss}; "
        f"TensorBoard logs: {log_dir} (tensorboard --logdir {os.path.dirname(log_dir) or log_dir}); "
        f"checkpoint: {checkpoint or 'none saved'}"
    )


def main(args: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    try:
        PretrainingCLI(save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args)
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


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
