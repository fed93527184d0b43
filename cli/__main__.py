"""The command table of ``train.py`` (and ``python -m cli``): ``fit``/``validate``/``test`` (LightningCLI) and the project's subcommands.

Problems with the user's input (``UserError``, and arguments the parser refuses) end the program with one
``error:`` line on stderr and exit status 2, before any training; the usage text is printed only on ``--help``.
A fit that fails that way leaves no run folder behind. Lightning's start-up notes (hardware found, a logging
product's advertisement) are left out, so that what goes wrong is the first thing a user reads.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from types import ModuleType

from callbacks.checkpointing import SIGTERM_EXIT_STATUS
from cli.commands import calibrate, compare, evaluate, export, plan, score
from core.errors import TrainingStopped, UserError
from training.command_line import condense_parser_error
from training.lightning_cli import PretrainingCLI
from training.run_folder import forget_claimed_folders, remove_claimed_folders

__all__ = ["COMMANDS", "LIGHTNING_COMMANDS", "find_user_error", "main"]

LIGHTNING_COMMANDS = ("fit", "validate", "test")  # and LightningCLI's own options (--help, --print_config, ...)
COMMANDS: dict[str, ModuleType] = {
    "plan": plan,
    "calibrate": calibrate,
    "score": score,
    "export": export,
    "evaluate": evaluate,
    "compare": compare,
}


def _quiet_known_warnings() -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # the training stream shards its batches across workers itself (datamodules/streams.py)
    warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
    # ... and resumes mid-epoch from the data module's checkpoint state (the batches consumed), not the loader's
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


_CHATTER = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:",
            "Loading `train_dataloader` to estimate number of stepping batches")


class _NoChatter(logging.Filter):
    """Drops Lightning's start-up notes: which accelerators exist, and an advertisement for a logging product."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_CHATTER)


def _quiet_lightning_chatter() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoChatter) for f in logger.filters):
            logger.addFilter(_NoChatter())


class _OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors are ``UserError``s: one line naming the problem, the usage on ``--help``."""

    def error(self, message: str):
        raise UserError(f"{message} ({self.prog} --help lists the options)")


def run_command(name: str, argv: list[str]) -> None:
    """Parse ``argv`` for the project subcommand ``name`` and run it."""
    command = COMMANDS[name]
    parser = _OneLineErrors(prog=f"train.py {name}", description=command.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_arguments(parser)
    if command.TAKES_CONFIG:
        args, rest = parser.parse_known_args(argv)
        args.config_args = rest
    else:
        args = parser.parse_args(argv)
    command.run(args)


def _fit_validate_or_test(argv: list[str]) -> None:
    cli = PretrainingCLI(save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=argv)
    _close_process_group()
    if cli.preempted:
        raise SystemExit(SIGTERM_EXIT_STATUS)


def main(args: list[str] | None = None) -> None:
    """``train.py SUBCOMMAND ...`` (``sys.argv[1:]`` when ``args`` is ``None``)."""
    _quiet_known_warnings()
    _quiet_lightning_chatter()
    argv = sys.argv[1:] if args is None else list(args)
    forget_claimed_folders()
    try:
        if argv and argv[0] in COMMANDS:
            run_command(argv[0], argv[1:])
        else:
            _fit_validate_or_test(argv)
    except argparse.ArgumentError as error:  # LightningCLI's parser (training.lightning_cli): refused arguments
        remove_claimed_folders()
        where = f"train.py {argv[0]}" if argv and argv[0] in LIGHTNING_COMMANDS else "train.py"
        print(f"error: {condense_parser_error(str(error))} ({where} --help lists the options)", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is not None and not isinstance(user_error, TrainingStopped):
            remove_claimed_folders()  # bad input: no partial output from a run that never trained
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


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
