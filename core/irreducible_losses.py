"""The irreducible-loss file RHO-loss selects with (Mindermann et al. 2022; paper section 5.2).

``train.py score`` writes the loss of a model trained on the holdout split for every training
``example_id``: a float32 ``.npy`` (no pickle), ``(examples,)`` for one pass of training masks,
``(passes, examples)`` for several, and beside it a sealed JSON sidecar (``core/sealing.py``,
format ``irreducible-losses/1``) that says which examples it scores (corpus fingerprint, split seed and
fractions, tokenizer hash, masking, count, input-id hash), holds the ``.npy``'s SHA-256 and reports
what the irreducible model cost. ``RhoLoss`` loads the file only if all of that matches its run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UserError
from core.sealing import file_sha256, seal, verify_seal

__all__ = ["IRREDUCIBLE_FORMAT", "load_irreducible_losses", "sidecar_path", "write_irreducible_losses"]

IRREDUCIBLE_FORMAT = "irreducible-losses/1"

# the examples fingerprint fields a file must share with the run, and how a mismatch names each
_FINGERPRINT_FIELDS = {
    "objective": "objective",
    "source": "corpus",
    "split_seed": "split seed",
    "validation_fraction": "validation fraction",
    "holdout_fraction": "holdout fraction",
    "split": "split",
    "sequence_length": "sequence length",
    "tokenizer_sha256": "tokenizer",
    "masking": "masking (mask seed and rates; the mask seed is the run's seed by default)",
    "num_examples": "number of examples",
    "input_ids_sha256": "input ids",
}


def sidecar_path(losses_path: str | Path) -> Path:
    """The JSON beside an irreducible-loss file: ``runs/x.npy`` -> ``runs/x.json``."""
    return Path(losses_path).with_suffix(".json")


def write_irreducible_losses(output: str | Path, losses: np.ndarray, fields: dict[str, Any]) -> dict[str, Any]:
    """Write ``losses`` (float32, ``(passes, examples)``) to ``output`` and its sealed sidecar; return the sidecar.

    One pass is stored as ``(examples,)``. The sidecar is ``fields`` after the format, with the
    ``.npy``'s SHA-256 and the seal added. The array is written under a temporary name and moved into
    place, so a killed scoring leaves no half-written file at ``output``.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(output.name + ".partial.npy")
    np.save(staging, losses[0] if losses.shape[0] == 1 else losses)
    sidecar = seal({"format": IRREDUCIBLE_FORMAT, **fields, "losses_sha256": file_sha256(staging)})
    staging.replace(output)
    sidecar_path(output).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def load_irreducible_losses(path: str, expected: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Load ``path`` (float32, ``(examples,)`` or ``(passes, examples)``) after checking its sidecar
    against this run's ``expected`` examples fingerprint; one ``UserError`` line for any mismatch.

    Returns the losses as ``(passes, examples)`` and the sidecar.
    """
    remake = (
        "make it with `python train.py score --config <this run's config> --config <the irreducible overlay> "
        f"--ckpt_path last --output {path}`"
    )
    losses_file, sidecar_file = Path(path), sidecar_path(path)
    if not losses_file.exists():
        raise UserError(f"RhoLoss: no irreducible-loss file at {path}: {remake}")
    if not sidecar_file.exists():
        raise UserError(f"RhoLoss: {path} has no sidecar {sidecar_file} saying which examples it scores: {remake}")
    try:
        sidecar = json.loads(sidecar_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"RhoLoss: {sidecar_file} is not valid JSON ({error}): {remake}") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != IRREDUCIBLE_FORMAT:
        raise UserError(f"RhoLoss: {sidecar_file} is not an irreducible-loss sidecar ({IRREDUCIBLE_FORMAT}): {remake}")
    verify_seal(sidecar, f"RhoLoss: the sidecar {sidecar_file}", remake)
    if file_sha256(losses_file) != sidecar.get("losses_sha256"):
        raise UserError(f"RhoLoss: {path} is not the file its sidecar describes (its sha256 differs; changed or "
                        f"replaced after scoring): {remake}")
    theirs = sidecar.get("examples", {})
    for key, name in _FINGERPRINT_FIELDS.items():
        if theirs.get(key) != expected.get(key):
            how = "with this run's data settings"
            if key == "masking":  # the mask seed is the run's seed unless data.mask_seed sets it
                seed = (expected.get(key) or {}).get("mask_seed")
                how = f"with this run's seed and masking settings (`train.py score ... --seed_everything {seed}`)"
            raise UserError(
                f"RhoLoss: {path} was made for another {name} ({key} {theirs.get(key)!r}, this run: "
                f"{expected.get(key)!r}): rerun `train.py score` {how}"
            )
    table = np.load(losses_file, allow_pickle=False)
    if table.ndim == 1:
        table = table[None, :]
    if table.ndim != 2 or table.shape[1] != expected["num_examples"] or table.dtype != np.float32:
        raise UserError(
            f"RhoLoss: {path} holds a {table.dtype} array of shape {table.shape}, not float32 losses for "
            f"{expected['num_examples']} examples: {remake}"
        )
    if not np.isfinite(table).all():
        raise UserError(f"RhoLoss: {path} holds non-finite losses: {remake}")
    return table, sidecar
