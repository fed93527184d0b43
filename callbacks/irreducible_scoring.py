"""``train.py score``: the irreducible loss of every training example, for RHO-loss (paper section 5.2).

The model of a checkpoint (trained on the holdout split) scores the training split, forward only, with
exactly the training masks, and the losses go to the file ``core/irreducible_losses.py`` describes.

Why here: the loop drives Lightning objects (the trainer's device and precision, the model, the data
module) but no command line, so it sits below the CLI; it is not a model, so not in
``lightning_modules/``; and it needs the run's budget clock (found by type, ``core.contracts.BudgetClock``)
to price its forwards, which only this layer knows about. It is the offline half of what
``callbacks.rho_loss.RhoLoss`` does online with ``irreducible_model``, and like every callbacks module it
imports only ``core``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.batch import EXAMPLE_ID, PASS_INDEX
from core.budget import saved_budget_state
from core.contracts import BudgetClock
from core.errors import UserError
from core.irreducible_losses import write_irreducible_losses
from core.ledger import WorkLedger
from core.selection import PassIndexedCollator

__all__ = ["score_training_examples"]


def score_training_examples(trainer, model, datamodule, checkpoint: str | Path, output: str | Path,
                            passes: int = 1, batch_size: int | None = None) -> dict[str, Any]:
    """Write the irreducible loss of every training example (``output``, float32) and its JSON sidecar.

    The model of ``checkpoint`` scores the *training* split (``example_id`` order) with exactly the
    training masks of passes ``0 .. passes-1`` (the run's mask seed: ``data.mask_seed``, by default the
    ``seed_everything`` the command sets; RhoLoss refuses a run that reads more passes), forward only, under the trainer's precision. The array is ``(examples,)`` for one
    pass, ``(passes, examples)`` otherwise. The sidecar identifies the examples (corpus fingerprint,
    split seed and fractions, tokenizer hash, masking, count, input-id hash) and reports the RST of the
    irreducible model: its training (from the checkpoint's budget) and this scoring (priced with the
    cost table of the config's budget clock, if it has one). Returns the sidecar.
    """
    from tqdm.auto import tqdm

    if passes < 1:
        raise UserError(f"--passes {passes}: score at least one pass")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    model.on_load_checkpoint(state)
    datamodule.prepare_data()
    datamodule.setup("fit")
    split = datamodule.splits["train"]
    count = len(split)
    batch_size = batch_size or datamodule.eval_batch_size
    collate = PassIndexedCollator(datamodule.make_collator(fixed=False))
    device = trainer.strategy.root_device
    model.to(device).eval()
    losses = np.zeros((passes, count), dtype=np.float32)
    start = time.perf_counter()
    with tqdm(total=passes * count, desc="Scoring training examples", unit="ex") as progress:
        for pass_index in range(passes):
            for first in range(0, count, batch_size):
                rows = split[first : first + batch_size]
                n = len(rows[EXAMPLE_ID])
                batch = collate([{**{k: v[i] for k, v in rows.items()}, PASS_INDEX: pass_index} for i in range(n)])
                on_device = {key: value.to(device) for key, value in batch.items()}
                with torch.no_grad(), trainer.precision_plugin.forward_context():
                    values = model.per_example_loss(on_device).float().cpu().numpy()
                losses[pass_index, batch[EXAMPLE_ID].numpy()] = values
                progress.update(n)
    wall = time.perf_counter() - start
    budget = saved_budget_state(state)
    clock = next((c for c in trainer.callbacks if isinstance(c, BudgetClock)), None)
    table = clock.table if clock is not None else None
    scoring = WorkLedger()
    scoring.charge_fwd(model.num_active_layers, passes * count)
    fields = {
        "examples": datamodule.examples_fingerprint("train"),
        "passes": passes,
        "checkpoint": str(checkpoint),
        "model": type(model).__name__,
        "active_layers": model.num_active_layers,
        "costs": {
            "training_rst_seconds": float(budget["spent_seconds"]) if budget is not None else None,
            "scoring_rst_seconds": _price(table, scoring),
            "scoring_wall_seconds": wall,
            "cost_table": table.path if table is not None else None,
        },
        "mean_loss": float(losses.mean()),
    }
    return write_irreducible_losses(output, losses, fields)


def _price(table, ledger) -> float | None:
    """RST of ``ledger`` by ``table``; ``None`` without a table or a forward-only price."""
    if table is None:
        return None
    try:
        return table.seconds(ledger)
    except UserError:
        return None
