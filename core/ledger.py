"""The work ledger: a running count of the work a run actually did, by kind and active depth.

Whoever does work charges it here (docs/design.md, "The RST clock"): the LightningModule for each
forward+backward micro-batch with the layers that were active, batch selection for its forward-only
scoring passes, Sophia for its Hessian passes, the optimizer for each step. Nobody hard-codes
"method X costs Y": the RST budget converts these counts into reference seconds with a measured
cost table.

Entries are keyed by strings so the ledger checkpoints as plain JSON:

- ``fwd_bwd/<k>``: forward+backward examples with ``k`` active layers,
- ``fwd/<k>``: forward-only examples with ``k`` active layers,
- ``hessian/<k>``: forward+backward examples of a Hessian estimate (Sophia) with ``k`` active layers,
- ``optimizer_step/<Name>``: optimizer steps of the optimizer class ``Name``.

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

__all__ = ["EXAMPLE_KINDS", "KINDS", "WorkLedger"]

KINDS = ("fwd_bwd", "fwd", "hessian", "optimizer_step")
EXAMPLE_KINDS = ("fwd_bwd", "fwd", "hessian")  # counted per example on each rank; optimizer steps are global events


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
            kind = str(name).split("/", 1)[0]
            if kind not in KINDS:
                raise ValueError(f"unknown work kind in ledger entry {name!r}: use one of {', '.join(KINDS)}")
            self.counts[str(name)] = float(amount)

    def charge(self, kind: str, key: int | str, amount: float = 1.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown work kind {kind!r}: use one of {', '.join(KINDS)}")
        if amount < 0:
            raise ValueError(f"cannot charge a negative amount ({amount})")
        self.counts[f"{kind}/{key}"] += float(amount)

    def charge_fwd_bwd(self, layers: int, examples: int) -> None:
        """One forward+backward pass over ``examples`` examples with ``layers`` active layers."""
        self.charge("fwd_bwd", int(layers), examples)

    def charge_fwd(self, layers: int, examples: int) -> None:
        """One forward-only pass (scoring, Hessian sampling) over ``examples`` examples."""
        self.charge("fwd", int(layers), examples)

    def charge_hessian(self, layers: int, examples: int) -> None:
        """One forward+backward pass of a Hessian estimate (Sophia's sampled-label loss)."""
        self.charge("hessian", int(layers), examples)

    def charge_optimizer_step(self, optimizer_name: str, steps: int = 1) -> None:
        self.charge("optimizer_step", optimizer_name, steps)

    def entries(self) -> Iterator[tuple[str, int | str, float]]:
        """Yield ``(kind, key, amount)`` with integer keys for layer counts."""
        for name, amount in sorted(self.counts.items()):
            kind, key = name.split("/", 1)
            yield kind, (int(key) if kind != "optimizer_step" else key), amount

    def of_kind(self, kind: str) -> WorkLedger:
        """The entries of one kind only (e.g. ``fwd``: batch selection's scoring, to price it apart)."""
        return WorkLedger({name: n for name, n in self.counts.items() if name.split("/", 1)[0] == kind})

    def examples(self, kind: str = "fwd_bwd") -> float:
        return sum(a for k, _, a in self.entries() if k == kind)

    def global_work(self, world_size: int) -> WorkLedger:
        """This rank's ledger as the work of the whole run: examples x ``world_size``, optimizer steps once."""
        return WorkLedger(
            {
                name: amount * (world_size if name.split("/", 1)[0] in EXAMPLE_KINDS else 1)
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
                if name.split("/", 1)[0] in EXAMPLE_KINDS:
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
