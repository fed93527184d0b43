"""The run's seed: the one number that varies every random draw of a run (docs/comparing.md, "What a seed varies").

A study varies its runs by ``seed_everything`` alone. Lightning's ``seed_everything(S)`` (the config's
``seed_everything``, called by the CLI before anything is built) seeds torch, numpy and Python, which
decides the initialisation, and records ``S`` in the environment variable ``PL_GLOBAL_SEED``. Every
other draw of a run (the training order, the training masks, selective backprop's keep draws, layer
dropping's drop draws, Sophia's sampled labels) takes a seed argument whose default ``None`` means
"the run's seed": ``resolve_seed`` reads it from ``PL_GLOBAL_SEED`` when the run sets up, not when the
object is built, and the owner stores the resolved value in its checkpoints so that a resume with
another seed is refused (``check_resumed_seed``). Without ``seed_everything`` (the variable unset) the
run's seed is 0: the numbers of a run before seeds followed the run.

Under DDP every rank is a process of its own: Lightning's launcher starts the ranks with the parent's
environment (``PL_GLOBAL_SEED`` included) and each rank runs the CLI again, which calls
``seed_everything(S)`` again, so every rank resolves the same seed (and draws the same order and layers).

What stays fixed whatever the seed (the same yardstick for every run): the document split, the
tokenizer, the validation split and the validation masks; they depend on ``data.split_seed`` only.
"""

from __future__ import annotations

import os

from core.errors import UserError

__all__ = ["RUN_SEED_VARIABLE", "check_resumed_seed", "resolve_seed", "run_seed"]

RUN_SEED_VARIABLE = "PL_GLOBAL_SEED"  # where lightning.fabric.utilities.seed.seed_everything records the seed


def run_seed() -> int:
    """The seed ``seed_everything`` set for this run (``PL_GLOBAL_SEED``); 0 if none was set."""
    value = os.environ.get(RUN_SEED_VARIABLE)
    if value is None or not value.strip():
        return 0
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{RUN_SEED_VARIABLE}={value!r} is not an integer seed: set seed_everything to an integer") from None


def resolve_seed(seed: int | None) -> int:
    """``seed`` if given, else the run's seed (``run_seed``)."""
    return run_seed() if seed is None else int(seed)


def check_resumed_seed(what: str, ours: int, saved: object) -> None:
    """Refuse to resume a checkpoint whose draws came from another seed (``saved``; ``None``: not recorded).

    ``what`` names the setting, e.g. ``data.mask_seed``; the message says how to resume consistently.
    """
    if saved is None or int(saved) == ours:
        return
    raise UserError(
        f"{what}={ours}, but the checkpoint was trained with {what}={int(saved)}: resume with the same seed "
        f"(seed_everything: {int(saved)}, or set {what} explicitly); a new seed is a new run"
    )
