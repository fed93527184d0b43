"""Reference System Time (RST): cost tables, the budget callback, and budget durations.

No Train No Gain (Kaddour et al. 2023, arXiv:2307.06440, section 2): a run's compute is the sum,
over the work it actually did, of what that work costs on a *reference machine*:

    RST = sum_k  n_fwd_bwd(k) * t_fb(k) + n_fwd(k) * t_f(k)  +  n_steps * t_opt

with ``n_*(k)`` the micro-batches run with ``k`` active layers (counted by the work ledger,
``callbacks/ledger.py``) and ``t_*`` the seconds per micro-batch in a cost table measured once on
the reference machine (``train.py calibrate``) or taken from the paper (``configs/rst/``). Every
schedule is a function of ``tau = RST spent / RST budget``, so the learning rate fully decays
exactly when the budget ends, whatever the method and whatever machine the run is on.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.ledger import WorkLedger
from lightning_modules.errors import UserError

__all__ = ["TABLE_FORMAT", "CostTable", "RSTBudget", "format_duration", "parse_duration"]

TABLE_FORMAT = "rst-table/1"
_PROJECT_ROOT = Path(__file__).resolve().parents[1]
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd])")


def parse_duration(value: str | float | int) -> float:
    """Seconds in ``value``: a number of seconds, or a duration such as ``90s``, ``30m``, ``24h``, ``1h30m``."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise UserError(
                    f"cannot read the duration {value!r}: write a number of seconds or e.g. 90s, 30m, 24h, 1h30m"
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"the duration {value!r} must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{int(hours)}h{int(minutes):02d}m{secs:04.1f}s" if hours else f"{int(minutes)}m{secs:04.1f}s"


@dataclass
class CostTable:
    """Reference seconds of one micro-batch of work, for one model, sequence length and micro-batch size.

    ``fwd_bwd_seconds[k-1]`` is one forward+backward micro-batch with ``k`` active layers;
    ``fwd_seconds`` the same forward-only (a list, or one number for every ``k``);
    ``optimizer_step_seconds`` maps an optimizer class name to seconds per step (missing = 0).
    """

    fwd_bwd_seconds: list[float]
    micro_batch_size: int
    seq_len: int
    fwd_seconds: list[float] | float | None = None
    optimizer_step_seconds: dict[str, float] = field(default_factory=dict)
    machine: Any = None
    model: Any = None
    notes: str | None = None
    path: str | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostTable:
        """Read a table; a relative path is looked up in the working directory, then in this project."""
        path = Path(path)
        if not path.exists() and not path.is_absolute() and (_PROJECT_ROOT / path).exists():
            path = _PROJECT_ROOT / path
        if not path.exists():
            raise UserError(f"RST cost table {str(path)!r} does not exist: measure one with `train.py calibrate`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"RST cost table {str(path)!r} is not valid JSON ({error})") from None
        return cls.from_dict(data, path=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | None = None) -> CostTable:
        where = path or "the RST cost table"
        if data.get("format") != TABLE_FORMAT:
            raise UserError(f"{where} has format {data.get('format')!r}; expected {TABLE_FORMAT!r}")
        for key in ("fwd_bwd_seconds", "micro_batch_size", "seq_len"):
            if key not in data:
                raise UserError(f"{where} lacks the key {key!r}")
        fb = [float(x) for x in data["fwd_bwd_seconds"]]
        if not fb or any(x <= 0 for x in fb):
            raise UserError(f"{where}: fwd_bwd_seconds must be a non-empty list of positive seconds")
        return cls(
            fwd_bwd_seconds=fb,
            micro_batch_size=int(data["micro_batch_size"]),
            seq_len=int(data["seq_len"]),
            fwd_seconds=data.get("fwd_seconds"),
            optimizer_step_seconds={str(k): float(v) for k, v in (data.get("optimizer_step_seconds") or {}).items()},
            machine=data.get("machine"),
            model=data.get("model"),
            notes=data.get("notes"),
            path=path,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "machine": self.machine,
            "model": self.model,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "fwd_bwd_seconds": self.fwd_bwd_seconds,
            "fwd_seconds": self.fwd_seconds,
            "optimizer_step_seconds": self.optimizer_step_seconds,
            **({"notes": self.notes} if self.notes else {}),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file in the same directory, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.write("\n")
        os.replace(handle.name, path)

    @property
    def max_layers(self) -> int:
        return len(self.fwd_bwd_seconds)

    def _where(self) -> str:
        return f"RST cost table {self.path!r}" if self.path else "the RST cost table"

    def fwd_bwd(self, layers: int) -> float:
        if not 1 <= layers <= self.max_layers:
            raise UserError(f"{self._where()} has fwd_bwd_seconds for 1..{self.max_layers} layers, not {layers}")
        return self.fwd_bwd_seconds[layers - 1]

    def fwd(self, layers: int) -> float:
        if self.fwd_seconds is None:
            raise UserError(f"{self._where()} has no fwd_seconds, but this run does forward-only passes")
        if isinstance(self.fwd_seconds, (int, float)):
            return float(self.fwd_seconds)
        if not 1 <= layers <= len(self.fwd_seconds):
            raise UserError(f"{self._where()} has fwd_seconds for 1..{len(self.fwd_seconds)} layers, not {layers}")
        return float(self.fwd_seconds[layers - 1])

    def optimizer_step(self, name: str) -> float:
        return self.optimizer_step_seconds.get(name, 0.0)

    def seconds(self, ledger: WorkLedger, optimizer_share: float = 1.0) -> float:
        """Reference seconds of everything in ``ledger`` (example counts scaled by the micro-batch size).

        ``optimizer_share``: the fraction of each optimizer step this ledger pays. Under DDP every rank
        steps its replica, but the reference machine steps once per global step, so each of N ranks
        pays 1/N.
        """
        total = 0.0
        for kind, key, amount in ledger.entries():
            if kind == "fwd_bwd":
                total += amount / self.micro_batch_size * self.fwd_bwd(key)
            elif kind == "fwd":
                total += amount / self.micro_batch_size * self.fwd(key)
            else:
                total += amount * self.optimizer_step(key) * optimizer_share
        return total

    def check_run(self, *, micro_batch_size: int, seq_len: int, num_layers: int) -> None:
        """Fail at start-up when the table cannot price this run."""
        if micro_batch_size != self.micro_batch_size:
            raise UserError(
                f"{self._where()} was measured for micro-batches of {self.micro_batch_size}, but data.batch_size is "
                f"{micro_batch_size}: use data.batch_size={self.micro_batch_size} or calibrate a table for it"
            )
        if seq_len != self.seq_len:
            raise UserError(
                f"{self._where()} was measured for sequences of {self.seq_len} tokens, but the run uses {seq_len}: "
                "calibrate a table for this sequence length"
            )
        if num_layers > self.max_layers:
            raise UserError(
                f"{self._where()} has fwd_bwd_seconds for 1..{self.max_layers} layers, but the model has "
                f"{num_layers}: calibrate a table for this model"
            )


class RSTBudget(Callback):
    """Stop training when the Reference System Time budget is spent; expose ``tau`` to every schedule.

    Args:
        budget: the RST budget: seconds, or a duration such as ``90s``, ``30m``, ``24h``.
        table: path of the cost table (JSON, format ``rst-table/1``); required in ``table`` mode.
        mode: ``table`` charges the ledger at the table's reference prices; ``wall`` uses the time
            this machine measures for training steps (this machine becomes the reference).

    Raises:
        UserError: a bad duration, a missing table, or a table that cannot price this run.

    >>> RSTBudget(budget="90s", mode="wall").budget_seconds
    90.0
    """

    def __init__(self, budget: str | float = "24h", table: str | None = None, mode: Literal["table", "wall"] = "table"):
        super().__init__()
        self.budget = budget
        self.table_path = table
        self.mode = mode
        self.budget_seconds = parse_duration(budget)
        if mode not in ("table", "wall"):
            raise UserError(f"RSTBudget mode={mode!r}: use 'table' or 'wall'")
        if mode == "table" and not table:
            raise UserError("RSTBudget in table mode needs table=PATH (e.g. configs/rst/bert-paper.json), or mode=wall")
        self._table: CostTable | None = None  # loaded on first use, so `calibrate` can write it
        self._offset = 0.0  # RST spent before this fit (restored from a checkpoint)
        self._spent = 0.0
        self._baseline: float | None = None  # this rank's ledger value at fit start
        self._wall_train = 0.0  # seconds measured in training batches on this rank since fit start
        self._batch_start: float | None = None
        self._fit_start = time.monotonic()
        self._synced_step = -1
        self._checked_step = -1

    @property
    def table(self) -> CostTable | None:
        """The cost table (``None`` in wall mode), read from ``table`` on first use."""
        if self.mode == "table" and self._table is None:
            self._table = CostTable.load(self.table_path)
        return self._table

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode)

    # ----- the clock ------------------------------------------------------------------------------
    def budget_progress(self) -> float:
        """tau = RST spent / budget, as of the last optimizer step."""
        return min(1.0, self._spent / self.budget_seconds)

    @property
    def spent_seconds(self) -> float:
        return self._spent

    def _local_seconds(self, pl_module: L.LightningModule) -> float:
        if self.mode == "wall":  # the measured batches, and the one in progress (the LR schedule syncs mid-batch)
            running = time.monotonic() - self._batch_start if self._batch_start is not None else 0.0
            return self._wall_train + running
        world_size = pl_module.trainer.world_size if pl_module._trainer is not None else 1
        return self.table.seconds(pl_module.work_ledger, optimizer_share=1.0 / world_size)

    def sync(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Bring ``spent`` up to date on every rank (one all-reduce); idempotent within an optimizer step."""
        if self._synced_step == trainer.global_step:
            return
        local = self._local_seconds(pl_module) - (self._baseline or 0.0)
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64  # MPS has no float64
        value = torch.tensor(local, dtype=dtype, device=pl_module.device)
        reduce_op = "max" if self.mode == "wall" else "sum"  # wall: ranks run in lockstep; table: all work counts
        value = trainer.strategy.reduce(value, reduce_op=reduce_op)
        self._spent = self._offset + float(value)
        self._synced_step = trainer.global_step

    # ----- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, "work_ledger"):
            raise UserError(f"RSTBudget needs a module with a work ledger; {type(pl_module).__name__} has none")
        if self.table is not None:
            data = trainer.datamodule
            self.table.check_run(
                micro_batch_size=getattr(data, "batch_size", self.table.micro_batch_size),
                seq_len=getattr(data, "seq_len", self.table.seq_len),
                num_layers=getattr(pl_module, "num_layers", 1),
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning restored the loops, the ledger and this callback (resume): start counting here
        self._batch_start = None
        self._baseline = self._local_seconds(pl_module)
        self._checked_step = trainer.global_step
        self._fit_start = time.monotonic()
        self._spent = self._offset
        if self._spent >= self.budget_seconds:  # resumed from a run whose budget is already spent
            trainer.should_stop = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch_start is not None:
            self._wall_train += time.monotonic() - self._batch_start
            self._batch_start = None
        if trainer.global_step == self._checked_step:
            return  # inside gradient accumulation: decide at optimizer-step boundaries only
        self._checked_step = trainer.global_step
        self.sync(trainer, pl_module)  # a no-op if the LR scheduler already synced at this step
        remaining = max(0.0, self.budget_seconds - self._spent)
        pl_module.log_dict(
            {
                "rst/seconds": self._spent,
                "rst/fraction": self.budget_progress(),
                "rst/remaining": remaining,
                "time/wall_seconds": time.monotonic() - self._fit_start,
            },
            on_step=True,
            on_epoch=False,
            sync_dist=False,
            rank_zero_only=False,
        )
        for name, value in (("rst_spent", self._spent), ("rst_left", remaining)):  # progress bar only, seconds
            pl_module.log(name, value, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if self._spent >= self.budget_seconds and not trainer.should_stop:
            trainer.should_stop = True
            print(
                f"rank {trainer.global_rank}: RST budget {format_duration(self.budget_seconds)} spent at optimizer "
                f"step {trainer.global_step} (RST {self._spent:.3f} s, wall {time.monotonic() - self._fit_start:.1f} s)",
                flush=True,
            )

    # ----- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"spent_seconds": self._spent, "budget_seconds": self.budget_seconds, "mode": self.mode}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._offset = float(state_dict.get("spent_seconds", 0.0))
        self._spent = self._offset
        self._synced_step = -1

