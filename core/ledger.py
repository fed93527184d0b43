"""The work ledger: a running count of the work a run actually did, by kind and active depth.

Whoever does work charges it here (docs/design.md, "The RST clock"): the LightningModule for each
forward+backward micro-batch with the layers that were active, batch selection for its forward-only
scoring passes, Sophia for its Hessian passes, the optimizer for each step. Nobody hard-codes
"method X costs Y": the RST budget converts these counts into reference seconds with a measured
cost table.

Entries are keyed by strings so the ledger checkpoints as plain JSON:

- ``fwd_bwd/<k>``: forward+backward examples with ``k`` active layers, and ``fwd_bwd/<k>@<n>`` those of
  sequences cut to ``n`` tokens (sequence-length warm-up), priced per length (``hessian`` likewise),
- ``fwd/<k>``: forward-only examples with ``k`` active layers,
- ``hessian/<k>``: forward+backward examples of a Hessian estimate (Sophia) with ``k`` active layers,
- ``optimizer_step/<Name>``: optimizer steps of the optimizer class ``Name``,
- ``<kind>/events`` and ``<kind>/examples``: work of a kind a method brings (``charge_work``): an EMA update,
  a teacher's forward. Its name is lower-case letters, digits and ``_``; a cost table prices one unit of it
  under ``work_seconds`` (``core/cost_table.py``), and a table-mode budget refuses a kind its table lacks.
  *Events* are done by every process alike (each updates its own replica), so they count once for the run,
  like optimizer steps; *examples* are each process's own and add up over the processes, like passes.

Example counts are stored (not micro-batches) so a partial micro-batch is charged exactly.

A process charges its *own* work (a **local** ledger). Under DDP every rank trains the same number
of examples per optimizer step and steps its own replica once per global step, so the work of the
whole run is the local example counts times the world size and the local optimizer steps once
(``WorkLedger.global_work``). Checkpoints store that global ledger, so a run resumed on another
number of processes still knows exactly how much work came before.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping

import re

__all__ = ["EXAMPLE_KINDS", "KINDS", "WORK_UNITS", "WorkLedger", "is_per_example", "split_depth_key"]

KINDS = ("fwd_bwd", "fwd", "hessian", "optimizer_step")
EXAMPLE_KINDS = ("fwd_bwd", "fwd", "hessian")  # counted per example on each rank; optimizer steps are global events
WORK_UNITS = ("events", "examples")  # the units of a method's own kind of work
_WORK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _check_entry(name: str) -> None:
    kind, _, key = name.partition("/")
    if kind in KINDS:
        return
    if not _WORK_NAME.match(kind) or key not in WORK_UNITS:
        raise ValueError(
            f"unknown work entry {name!r}: use one of {', '.join(KINDS)}, or a kind of your own as "
            "<lower_case_name>/events or <lower_case_name>/examples (WorkLedger.charge_work)"
        )


def _depth_key(layers: int, length: int | None) -> str | int:
    return int(layers) if length is None else f"{int(layers)}@{int(length)}"


def split_depth_key(key: int | str) -> tuple[int, int | None]:
    """``(layers, length)`` of a pass's key: ``4`` -> ``(4, None)`` (the full length), ``"4@64"`` -> ``(4, 64)``."""
    if isinstance(key, int):
        return key, None
    layers, _, length = str(key).partition("@")
    return int(layers), (int(length) if length else None)


def is_per_example(name: str) -> bool:
    """Whether the entry ``name`` counts each process's own examples (summed over processes) rather than
    events every process does alike (counted once)."""
    kind, _, key = name.partition("/")
    return kind in EXAMPLE_KINDS or (kind not in KINDS and key == "examples")


class WorkLedger:
    """Counts of work done.

    >>> ledger = WorkLedger()
    >>> ledger.charge_fwd_bwd(layers=4, examples=128)
    >>> ledger.charge_optimizer_step("AdamW")
    >>> dict(ledger.counts)
    {'fwd_bwd/4': 128.0, 'optimizer_step/AdamW': 1.0}
    >>> dict(ledger.global_work(world_size=2).counts)
    {'fwd_bwd/4': 256.0, 'optimizer_step/AdamW': 1.0}
    """

    def __init__(self, counts: Mapping[str, float] | None = None) -> None:
        self.counts: dict[str, float] = defaultdict(float)
        for name, amount in (counts or {}).items():
            _check_entry(str(name))
            self.counts[str(name)] = float(amount)

    def charge(self, kind: str, key: int | str, amount: float = 1.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown work kind {kind!r}: use one of {', '.join(KINDS)}")
        if amount < 0:
            raise ValueError(f"cannot charge a negative amount ({amount})")
        self.counts[f"{kind}/{key}"] += float(amount)

    def charge_fwd_bwd(self, layers: int, examples: int, length: int | None = None) -> None:
        """One forward+backward pass over ``examples`` examples with ``layers`` active layers; ``length``: the
        tokens of a sequence cut shorter than the run's (``None``: the full length)."""
        self.charge("fwd_bwd", _depth_key(layers, length), examples)

    def charge_fwd(self, layers: int, examples: int) -> None:
        """One forward-only pass (scoring, Hessian sampling) over ``examples`` examples."""
        self.charge("fwd", int(layers), examples)

    def charge_hessian(self, layers: int, examples: int, length: int | None = None) -> None:
        """One forward+backward pass of a Hessian estimate (Sophia's sampled-label loss)."""
        self.charge("hessian", _depth_key(layers, length), examples)

    def charge_optimizer_step(self, optimizer_name: str, steps: int = 1) -> None:
        self.charge("optimizer_step", optimizer_name, steps)

    def charge_work(self, kind: str, amount: float = 1.0, *, per: str = "events") -> None:
        """``amount`` units of a method's own kind of work (see the module): ``per="events"`` for work every
        process does alike (an EMA update of its replica), ``per="examples"`` for each process's own examples.

        >>> ledger = WorkLedger()
        >>> ledger.charge_work("ema_update")
        >>> ledger.charge_work("teacher_fwd", 8, per="examples")
        >>> dict(ledger.global_work(world_size=2).counts)
        {'ema_update/events': 1.0, 'teacher_fwd/examples': 16.0}
        """
        if kind in KINDS:
            raise ValueError(f"{kind!r} is one of the ledger's own kinds: charge it with its own method")
        if per not in WORK_UNITS:
            raise ValueError(f"charge_work(per={per!r}): use 'events' or 'examples'")
        _check_entry(f"{kind}/{per}")
        if amount < 0:
            raise ValueError(f"cannot charge a negative amount ({amount})")
        self.counts[f"{kind}/{per}"] += float(amount)

    def work_kinds(self) -> list[str]:
        """The methods' own kinds of work in this ledger (not the built-in ones)."""
        return sorted({name.split("/", 1)[0] for name in self.counts} - set(KINDS))

    def entries(self) -> Iterator[tuple[str, int | str, float]]:
        """Yield ``(kind, key, amount)`` with integer keys for layer counts (``"<k>@<n>"`` stays a string:
        ``split_depth_key`` reads it)."""
        for name, amount in sorted(self.counts.items()):
            kind, key = name.split("/", 1)
            yield kind, (int(key) if kind in EXAMPLE_KINDS and "@" not in key else key), amount

    def of_kind(self, kind: str) -> WorkLedger:
        """The entries of one kind only (e.g. ``fwd``: batch selection's scoring, to price it apart)."""
        return WorkLedger({name: n for name, n in self.counts.items() if name.split("/", 1)[0] == kind})

    def examples(self, kind: str = "fwd_bwd") -> float:
        return sum(a for k, _, a in self.entries() if k == kind)

    def tokens_trained(self, tokens_per_sequence: float, seq_len: int) -> float:
        """Corpus tokens the forward+backward passes trained on: each example's ``tokens_per_sequence``, a
        sequence cut to ``n`` of its ``seq_len`` tokens (sequence-length warm-up) in proportion.

        >>> WorkLedger({"fwd_bwd/2": 10, "fwd_bwd/2@32": 4}).tokens_trained(128, 128)
        1408.0
        """
        total = 0.0
        for kind, key, amount in self.entries():
            if kind == "fwd_bwd":
                length = split_depth_key(key)[1]
                total += amount * tokens_per_sequence * (length / seq_len if length else 1.0)
        return total

    def global_work(self, world_size: int) -> WorkLedger:
        """This rank's ledger as the work of the whole run: examples x ``world_size``, optimizer steps once."""
        return WorkLedger(
            {
                name: amount * (world_size if is_per_example(name) else 1)
                for name, amount in self.counts.items()
            }
        )

    @classmethod
    def over_processes(cls, local_ledgers: list[Mapping[str, float]]) -> WorkLedger:
        """The whole run's work from every process's local counts: examples summed (ranks may score
        different numbers of candidates), optimizer steps counted once (every rank steps its replica)."""
        total = WorkLedger()
        for rank, counts in enumerate(local_ledgers):
            for name, amount in WorkLedger(counts).counts.items():
                if is_per_example(name):
                    total.counts[name] += amount
                elif rank == 0:
                    total.counts[name] += amount
        return total

    def __add__(self, other: WorkLedger) -> WorkLedger:
        total = WorkLedger(self.counts)
        for name, amount in other.counts.items():
            total.counts[name] += amount
        return total

    def state_dict(self) -> dict[str, float]:
        return dict(self.counts)

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.counts = WorkLedger(state).counts

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkLedger) and dict(self.counts) == dict(other.counts)

    def __repr__(self) -> str:
        return f"WorkLedger({dict(self.counts)})"
