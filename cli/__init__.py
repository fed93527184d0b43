"""The command line of the toolkit: ``python train.py SUBCOMMAND ...`` (or ``python -m cli SUBCOMMAND ...``).

``cli/__main__.py`` holds the command table; ``training.lightning_cli`` the LightningCLI subclass behind ``fit``,
``validate`` and ``test``; ``training.run_folder`` where a run's logs and checkpoints live; ``training.summary`` the
result a fit writes (``summary.json``); ``cli.commands`` one module per project subcommand.
"""

from __future__ import annotations

import os

# Quiet, offline-friendly defaults, set before any library reads them; a user's environment wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__all__ = ["main"]


def main(args: list[str] | None = None) -> None:
    """Run the command line (``sys.argv[1:]`` by default); the command table is in ``cli/__main__.py``."""
    from cli.__main__ import main as run

    run(args)
