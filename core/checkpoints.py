"""Checkpoint files on disk: integrity, finding the one to resume, and claiming a run's log version.

Lightning-free (plain files), so ``train.py`` can settle what to resume, and refuse a damaged file,
before anything expensive is built.

- ``check_checkpoint``: a Lightning checkpoint is a zip archive (``torch.save``'s format); a file cut
  short by a kill, a full disk or a bad copy has no readable central directory or fails a member's CRC.
  The check reads the whole file once (seconds for gigabytes) and loads nothing: no code runs.
- ``run_checkpoints``: every ``*.ckpt`` of a configuration's runs, ``<save_dir>/<name>/version_*/checkpoints``,
  newest first (modification time: the file written last is the furthest the run got).
- ``resume_target``: what ``--ckpt_path last`` (the newest, which must be intact) and
  ``--ckpt_path last-good`` (the newest intact one, skipping damaged ones and saying so) resolve to;
  nothing when the configuration has no checkpoint yet (a new run starts, as with Lightning's ``last``).
- ``claim_version``: a fresh ``version_N`` directory made with ``os.mkdir``, which fails if another run
  made it first, so two runs started together never share a log directory.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import UserError

__all__ = ["FINGERPRINT_FILE", "ResumeTarget", "check_checkpoint", "claim_version", "data_state", "read_fingerprint",
           "resume_target", "run_checkpoints", "write_fingerprint"]

RESUME_KEYWORDS = ("last", "last-good")
DATA_STATE_MARK = "tokenizer_files"  # what a pre-training data module's checkpoint state always holds
_VERSION = re.compile(r"^version_(\d+)$")


def check_checkpoint(path: str | Path) -> None:
    """Raise ``UserError`` naming ``path`` unless it is a complete, uncorrupted checkpoint archive."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ckpt_path {path}: no such checkpoint file")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(
            f"--ckpt_path {path}: the checkpoint is truncated or corrupt ({problem}); resume from the newest intact "
            "checkpoint of this configuration's runs with --ckpt_path last-good, or delete the file"
        )


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the archive at ``path``, or ``None`` when every member reads back with its CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as error:
        return str(error).rstrip(".").lower()
    except (OSError, EOFError, ValueError, RuntimeError) as error:  # zlib/zipfile surface damage in several ways
        return f"{type(error).__name__}: {error}"
    if bad is not None:
        return f"member {bad} fails its CRC check"
    return None


FINGERPRINT_FILE = "config.sha256"  # in a version directory: the fingerprint of the configuration that ran there


def run_checkpoints(root: str | Path, fingerprint: str | None = None) -> list[Path]:
    """Every ``*.ckpt`` under ``root/version_*/checkpoints``, newest first; with ``fingerprint``, only those of
    versions whose configuration had that fingerprint."""
    found = [p for p in Path(root).glob("version_*/checkpoints/*.ckpt") if p.is_file()
             and (fingerprint is None or read_fingerprint(p.parent.parent) == fingerprint)]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)


@dataclass(frozen=True)
class ResumeTarget:
    checkpoint: Path
    version: str  # the version directory's name, e.g. "version_3": the resumed run logs there again
    skipped: tuple[tuple[Path, str], ...] = ()  # damaged newer checkpoints passed over (last-good only)


def read_fingerprint(version_dir: Path) -> str | None:
    path = version_dir / FINGERPRINT_FILE
    return path.read_text().strip() if path.is_file() else None


def write_fingerprint(version_dir: str | Path, fingerprint: str) -> None:
    path = Path(version_dir) / FINGERPRINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(fingerprint + "\n")


def resume_target(root: str | Path, keyword: str, fingerprint: str | None = None) -> ResumeTarget | None:
    """The checkpoint ``--ckpt_path last`` or ``--ckpt_path last-good`` means for the runs under ``root`` (with
    ``fingerprint``: the runs of that configuration only); ``None`` when there is none yet (the first start of a
    job that is requeued with the same command)."""
    if keyword not in RESUME_KEYWORDS:
        raise ValueError(keyword)
    candidates = run_checkpoints(root, fingerprint)
    if not candidates:
        return None
    skipped = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return ResumeTarget(candidate, candidate.parent.parent.name, tuple(skipped))
        if keyword == "last":
            raise UserError(
                f"--ckpt_path last: the newest checkpoint {candidate} is truncated or corrupt ({problem}); resume "
                "from the newest intact one with --ckpt_path last-good, or delete the file"
            )
        skipped.append((candidate, problem))
    raise UserError(f"--ckpt_path last-good: every checkpoint under {root} is truncated or corrupt "
                    f"({len(candidates)} checked): start a new run without --ckpt_path")


def claim_version(root: str | Path) -> str:
    """Create and return the name of the next free ``version_N`` directory under ``root`` (atomic)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.match(p.name))]
    number = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{number}")
            return f"version_{number}"
        except FileExistsError:
            number += 1


def data_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The pre-training data module's saved state in a loaded checkpoint (its tokenizer's files and the tokens
    per training sequence), if any. Lightning files it under the data module's class name, whichever class that
    is, so it is found by what it holds."""
    return next((value for value in checkpoint.values() if isinstance(value, dict) and DATA_STATE_MARK in value), None)
