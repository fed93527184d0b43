"""Where a run lives: ``<save_dir>/<name>/version_N`` of its logger.

``resolve_checkpoint`` turns ``--ckpt_path last|last-good`` into a checkpoint file of earlier runs (and checks
the integrity of any checkpoint about to be loaded); ``claim_log_version`` gives a new fit a fresh version
folder made atomically; ``remove_claimed_folders`` takes that folder away again when the run fails on bad input
before it wrote anything worth keeping.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from typing import Any

from core.checkpoints import (
    RESUME_KEYWORDS,
    check_checkpoint,
    claim_version,
    resume_target,
    run_checkpoints,
    write_fingerprint,
)
from core.errors import UserError
from core.sealing import json_sha256

__all__ = ["claim_log_version", "config_fingerprint", "forget_claimed_folders", "is_first_process", "logger_root",
           "record_fingerprint", "remove_claimed_folders", "resolve_checkpoint"]

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "GROUP_RANK")
LAUNCHED_VERSION = "NTNG_LOG_VERSION"  # the version the launching process claimed, for the ranks it starts
_claimed_folders: list[str] = []  # folders made for a new run: removed if it fails before writing into them


def is_first_process() -> bool:
    """This is the process a user started (not a rank that Lightning's launcher or SLURM started)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def logger_root(config) -> tuple[str | None, Any]:
    """``<save_dir>/<name>`` of the configured logger (TensorBoard, CSV), and its init_args."""
    init_args = getattr(config.trainer.get("logger"), "init_args", None)
    if init_args is not None and init_args.get("save_dir") is not None and "name" in init_args:
        return os.path.join(str(init_args.save_dir), str(init_args.name or "")), init_args
    return None, init_args


NOT_IN_FINGERPRINT = ("config", "ckpt_path", "weights_only")  # how a run was started, not what it runs


def config_fingerprint(config) -> str:
    """SHA-256 of a fit's resolved configuration: everything but the config file names, the checkpoint to resume
    and the log version. Two runs with the same fingerprint train the same way (budget and seed included)."""
    resolved = {k: v for k, v in config.as_dict().items() if k not in NOT_IN_FINGERPRINT}
    logger = (resolved.get("trainer") or {}).get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        logger["init_args"].pop("version", None)
    return json_sha256(resolved)


def record_fingerprint(config) -> None:
    """Write the fit's fingerprint into its version directory (what ``--ckpt_path last`` matches later)."""
    root, init_args = logger_root(config)
    if root is not None and init_args.get("version") is not None and is_first_process():
        write_fingerprint(os.path.join(root, str(init_args.version)), config_fingerprint(config))


def resolve_checkpoint(config, subcommand: str) -> None:
    """Resolve ``--ckpt_path last|last-good`` to a checkpoint of an earlier run of the same configuration (same
    fingerprint; a resumed fit logs into that run's version directory again); check the integrity of the
    checkpoint to be loaded. A checkpoint of another configuration is never picked: with none of this one, the
    fit starts afresh and says so.

    Lightning's own ``last`` looks only in the new run's folder, and each start opens a new version.
    """
    ckpt_path = config.get("ckpt_path")
    if "weights_only" in config and config.weights_only is None:
        config.weights_only = True  # whatever torch's default: a checkpoint never runs code unless the user says so
    root, init_args = logger_root(config)
    if ckpt_path in RESUME_KEYWORDS:
        if root is None:
            raise UserError(f"--ckpt_path {ckpt_path} finds checkpoints through the logger's save_dir and name: "
                            "configure trainer.logger (e.g. TensorBoardLogger), or give the checkpoint file")
        fingerprint = config_fingerprint(config)
        target = resume_target(root, ckpt_path, fingerprint)
        if target is None:
            others = len(run_checkpoints(root))
            ignored = (f"; {others} checkpoint(s) there are of other configurations (another override, budget or "
                       "seed) and are not resumed" if others else "")
            print(f"warning: --ckpt_path {ckpt_path}: no checkpoint of this configuration under "
                  f"{root}/version_*/checkpoints yet{ignored}; starting a new run", file=sys.stderr, flush=True)
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
    root, init_args = logger_root(config)
    if root is None or init_args.get("version") is not None:
        return
    if is_first_process():
        created, parent = [], os.path.abspath(root)
        while not os.path.exists(parent):  # the folders this claim creates, removed again if the run fails
            created.append(parent)
            parent = os.path.dirname(parent)
        init_args.version = claim_version(root)
        _claimed_folders.extend([os.path.join(root, init_args.version), *created])
        os.environ[LAUNCHED_VERSION] = json.dumps([root, init_args.version])
    else:
        claimed_root, version = json.loads(os.environ.get(LAUNCHED_VERSION, '["", ""]'))
        if claimed_root == root and version:
            init_args.version = version


def forget_claimed_folders() -> None:
    """Start a new command: nothing claimed yet."""
    _claimed_folders.clear()


def remove_claimed_folders() -> None:
    """Remove the version folder this process claimed for a new run (only what the run wrote: its config
    and empty logs, never a folder holding checkpoints) and the parent folders the claim created."""
    version, *parents = _claimed_folders or [None]
    if version is None or os.path.isdir(os.path.join(version, "checkpoints")):
        return
    shutil.rmtree(version, ignore_errors=True)
    for parent in parents:
        with contextlib.suppress(OSError):
            os.rmdir(parent)  # only if empty
