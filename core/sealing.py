"""Seals on the project's JSON files: a SHA-256 of the content, stored in the file, checked on reading.

A cost table prices every step of a run and an irreducible-loss sidecar says which examples a loss file
scores; a hand edit or a swapped file would silently change a run's budget or its selection. Each such
file carries ``"sha256"``: the hash of its other fields as canonical JSON (sorted keys, no spaces).
Reading a file whose seal is missing or does not match fails with a message saying how to remake it.
The seal catches edits and damage, not a forger who recomputes it: it is an integrity check, not a
signature. ``file_sha256`` is the project's one streamed file hash (corpus wheels, tokenizers, loss files).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from core.errors import UserError

__all__ = ["SEAL_KEY", "file_sha256", "json_sha256", "seal", "verify_seal"]

SEAL_KEY = "sha256"


def json_sha256(data: Any) -> str:
    """SHA-256 of ``data`` as canonical JSON (sorted keys, no spaces; paths and other objects as ``str``): equal
    exactly when the data are. The one such hash: seals, run configurations, fit fingerprints."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _digest(data: dict[str, Any]) -> str:
    return json_sha256({key: value for key, value in data.items() if key != SEAL_KEY})


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its seal (replacing an old one)."""
    return {**{key: value for key, value in data.items() if key != SEAL_KEY}, SEAL_KEY: _digest(data)}


def verify_seal(data: dict[str, Any], where: str, remedy: str) -> None:
    """Raise ``UserError`` unless ``data`` carries a seal that matches its content."""
    if SEAL_KEY not in data:
        raise UserError(f"{where} has no {SEAL_KEY} seal, so edits to it cannot be detected: {remedy}")
    if data[SEAL_KEY] != _digest(data):
        raise UserError(f"{where} was changed after it was written (its {SEAL_KEY} seal does not match its content): "
                        f"{remedy}")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
