"""RST cost tables: what each piece of work costs on the reference machine (format ``rst-table/1``).

No Train No Gain (Kaddour et al. 2023, arXiv:2307.06440, section 2): a run's compute is the sum,
over the work it actually did, of what that work costs on a *reference machine*:

    RST = sum_k  n_fwd_bwd(k) * t_fb(k) + n_fwd(k) * t_f(k)  +  n_steps * t_opt  +  sum_w n_w * t_w

with ``n_*(k)`` the micro-batches run with ``k`` active layers (counted by the work ledger,
``core/ledger.py``) and ``t_*`` the seconds per micro-batch in a cost table measured once on the
reference machine (``train.py calibrate``) or taken from the paper (``configs/rst/``); ``n_w`` counts the units
of a method's own kind of work ``w`` (an EMA update; ``WorkLedger.charge_work``) and ``t_w`` is its price under
``work_seconds``, which ``train.py calibrate`` measures for the callbacks of the configuration it is given. The table
format is documented in docs/rst.md ("Table format") and in docs/design.md. A saved table carries a
SHA-256 seal of its content (``core/sealing.py``): an edited table is refused when it is loaded;
``python -m core.cost_table seal FILE`` re-seals one edited on purpose.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.ledger import WorkLedger, split_depth_key
from core.sealing import seal, verify_seal

__all__ = ["TABLE_FORMAT", "CostTable"]

TABLE_FORMAT = "rst-table/1"
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CostTable:
    """Reference seconds of one micro-batch of work, for one model, sequence length and micro-batch size.

    ``fwd_bwd_seconds[k-1]`` is one forward+backward micro-batch with ``k`` active layers;
    ``fwd_seconds`` the same forward-only (a list, or one number for every ``k``);
    ``optimizer_step_seconds`` maps an optimizer class name to seconds per step (empty: no step is charged;
    otherwise a name it lacks is refused, see ``optimizer_step``);
    a Hessian pass (Sophia) costs a forward+backward micro-batch, unless ``hessian_in_optimizer_step``
    says the optimizer step prices already include them (the paper's T5 table timed whole steps);
    ``work_seconds`` maps a method's own kind of work to the seconds of one unit (one event, or one example);
    a kind it lacks is refused (see ``work``); ``fwd_bwd_seconds_by_length`` maps a shorter sequence length
    (sequence-length warm-up) to its ``fwd_bwd_seconds``; a length it lacks is refused.
    """

    fwd_bwd_seconds: list[float]
    micro_batch_size: int
    seq_len: int
    fwd_seconds: list[float] | float | None = None
    optimizer_step_seconds: dict[str, float] = field(default_factory=dict)
    hessian_in_optimizer_step: bool = False
    work_seconds: dict[str, float] = field(default_factory=dict)
    fwd_bwd_seconds_by_length: dict[int, list[float]] = field(default_factory=dict)
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
        if not isinstance(data, dict):
            raise UserError(f"RST cost table {str(path)!r} is not a JSON object: measure one with `train.py calibrate`")
        verify_seal(data, f"RST cost table {str(path)!r}", f"measure it again with `train.py calibrate`, or, if the "
                    f"change is deliberate, seal it with `python -m core.cost_table seal {path}`")
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
            hessian_in_optimizer_step=bool(data.get("hessian_in_optimizer_step", False)),
            work_seconds={str(k): float(v) for k, v in (data.get("work_seconds") or {}).items()},
            fwd_bwd_seconds_by_length={int(k): [float(x) for x in v]
                                       for k, v in (data.get("fwd_bwd_seconds_by_length") or {}).items()},
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
            **({"hessian_in_optimizer_step": True} if self.hessian_in_optimizer_step else {}),
            **({"work_seconds": self.work_seconds} if self.work_seconds else {}),
            **({"fwd_bwd_seconds_by_length": self._by_length()} if self.fwd_bwd_seconds_by_length else {}),
            **({"notes": self.notes} if self.notes else {}),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file in the same directory, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(seal(self.to_dict()), handle, indent=2)
            handle.write("\n")
        os.replace(handle.name, path)

    def prices_digest(self) -> str:
        """sha256 of the prices and the shape they were measured for (not the free-form fingerprint).

        Two tables with the same digest charge every piece of work the same; a checkpoint records it
        so that a run cannot be resumed under different prices without saying so.
        """
        prices = {
            "micro_batch_size": self.micro_batch_size,
            "seq_len": self.seq_len,
            "fwd_bwd_seconds": self.fwd_bwd_seconds,
            "fwd_seconds": self.fwd_seconds,
            "optimizer_step_seconds": dict(sorted(self.optimizer_step_seconds.items())),
            **({"hessian_in_optimizer_step": True} if self.hessian_in_optimizer_step else {}),
            **({"work_seconds": dict(sorted(self.work_seconds.items()))} if self.work_seconds else {}),
            **({"fwd_bwd_seconds_by_length": self._by_length()} if self.fwd_bwd_seconds_by_length else {}),
        }
        return hashlib.sha256(json.dumps(prices, sort_keys=True).encode()).hexdigest()

    def _by_length(self) -> dict[str, list[float]]:
        return {str(n): self.fwd_bwd_seconds_by_length[n] for n in sorted(self.fwd_bwd_seconds_by_length)}

    @property
    def max_layers(self) -> int:
        return len(self.fwd_bwd_seconds)

    def _where(self) -> str:
        return f"RST cost table {self.path!r}" if self.path else "the RST cost table"

    def fwd_bwd(self, layers: int, length: int | None = None) -> float:
        """Seconds of a forward+backward micro-batch with ``layers`` active layers, of sequences cut to ``length``
        tokens (``None`` or the table's ``seq_len``: full length)."""
        if not 1 <= layers <= self.max_layers:
            raise UserError(f"{self._where()} has fwd_bwd_seconds for 1..{self.max_layers} layers, not {layers}")
        if length is None or length == self.seq_len:
            return self.fwd_bwd_seconds[layers - 1]
        self.check_lengths([length])
        return self.fwd_bwd_seconds_by_length[length][layers - 1]

    def check_lengths(self, lengths) -> None:
        """Refuse, in one line, sequence lengths this table has no forward+backward prices for."""
        missing = sorted({int(n) for n in lengths} - set(self.fwd_bwd_seconds_by_length) - {self.seq_len})
        if missing:
            have = ", ".join(map(str, sorted(self.fwd_bwd_seconds_by_length))) or "none"
            raise UserError(
                f"{self._where()} prices sequences of {self.seq_len} tokens and of {have} shorter ones, not of "
                f"{', '.join(map(str, missing))}: time them on the table's machine with `train.py calibrate --config "
                f"<your config> --output {self.path or 'TABLE'} --update --lengths`, or use RSTBudget mode=wall"
            )

    def fwd(self, layers: int) -> float:
        if self.fwd_seconds is None:
            raise UserError(f"{self._where()} has no fwd_seconds, but this run does forward-only passes")
        if isinstance(self.fwd_seconds, (int, float)):
            return float(self.fwd_seconds)
        if not 1 <= layers <= len(self.fwd_seconds):
            raise UserError(f"{self._where()} has fwd_seconds for 1..{len(self.fwd_seconds)} layers, not {layers}")
        return float(self.fwd_seconds[layers - 1])

    def optimizer_step(self, name: str) -> float:
        """Seconds of one step of optimizer class ``name``. A table without optimizer prices charges none
        (the paper's BERT table: every optimizer alike); a table with some must have this one."""
        if not self.optimizer_step_seconds:
            return 0.0
        if name not in self.optimizer_step_seconds:
            raise UserError(
                f"{self._where()} prices the steps of {', '.join(sorted(self.optimizer_step_seconds))}, not {name}: "
                f"time it on the table's machine with `train.py calibrate --config <your config> --output {self.path} "
                "--update --optimizers <its class path>`"
            )
        return self.optimizer_step_seconds[name]

    def work(self, kind: str) -> float:
        """Seconds of one unit of a method's own kind of work ``kind``; a kind the table lacks is refused."""
        if kind not in self.work_seconds:
            have = f"prices {', '.join(sorted(self.work_seconds))}" if self.work_seconds else "prices no work of methods' own"
            raise UserError(
                f"{self._where()} {have}, not {kind!r}: time it on the table's machine with `train.py calibrate "
                f"--config <your config> --output {self.path or 'TABLE'} --update --work`, or use RSTBudget mode=wall"
            )
        return self.work_seconds[kind]

    def seconds(self, ledger: WorkLedger, optimizer_share: float = 1.0) -> float:
        """Reference seconds of everything in ``ledger`` (example counts scaled by the micro-batch size).

        ``optimizer_share``: the fraction of each optimizer step (and of each work event) this ledger pays.
        Under DDP every rank steps its replica, but the reference machine steps once per global step, so
        each of N ranks pays 1/N.
        """
        total = 0.0
        for kind, key, amount in ledger.entries():
            if kind == "fwd_bwd":
                total += amount / self.micro_batch_size * self.fwd_bwd(*split_depth_key(key))
            elif kind == "fwd":
                total += amount / self.micro_batch_size * self.fwd(key)
            elif kind == "hessian":
                if not self.hessian_in_optimizer_step:
                    total += amount / self.micro_batch_size * self.fwd_bwd(*split_depth_key(key))
            elif kind == "optimizer_step":
                total += amount * self.optimizer_step(key) * optimizer_share
            else:  # a method's own kind: events are shared like optimizer steps, examples are this ledger's own
                total += amount * self.work(kind) * (optimizer_share if key == "events" else 1.0)
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


def _main(argv: list[str] | None = None) -> None:
    """``python -m core.cost_table seal FILE...``: check each table's format and write its seal."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m core.cost_table", description=_main.__doc__)
    parser.add_argument("command", choices=["seal"])
    parser.add_argument("files", nargs="+")
    known = parser.parse_args(argv)
    for name in known.files:
        data = json.loads(Path(name).read_text())
        table = CostTable.from_dict(data, path=name)  # refuses what is not a table
        table.save(name)
        print(f"sealed {name}")


if __name__ == "__main__":
    _main()
