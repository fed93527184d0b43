"""The work ledger: a running count of the work a run actually did, by kind and active depth.

Whoever does work charges it here (DESIGN.md 3): the LightningModule for each forward+backward
micro-batch with the layers that were active, batch selection for its forward-only scoring passes,
Sophia for its Hessian passes, the optimizer for each step. Nobody hard-codes "method X costs Y":
the RST budget converts these counts into reference seconds with a measured cost table.

Entries are keyed by strings so the ledger checkpoints as plain JSON and all-reduces as one tensor:

- ``fwd_bwd/<k>``: forward+backward examples with ``k`` active layers,
- ``fwd/<k>``: forward-only examples with ``k`` active layers,
- ``optimizer_step/<Name>``: optimizer steps of the optimizer class ``Name``.

Example counts are stored (not micro-batches) so a partial micro-batch is charged exactly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

__all__ = ["WorkLedger"]

KINDS = ("fwd_bwd", "fwd", "optimizer_step")


class WorkLedger:
    """Counts of work done on this process.

    >>> ledger = WorkLedger()
    >>> ledger.charge_fwd_bwd(layers=4, examples=128)
    >>> ledger.charge_optimizer_step("AdamW")
    >>> dict(ledger.counts)
    {'fwd_bwd/4': 128.0, 'optimizer_step/AdamW': 1.0}
    """

    def __init__(self) -> None:
        self.counts: dict[str, float] = defaultdict(float)

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

    def charge_optimizer_step(self, optimizer_name: str, steps: int = 1) -> None:
        self.charge("optimizer_step", optimizer_name, steps)

    def entries(self):
        """Yield ``(kind, key, amount)`` with integer keys for layer counts."""
        for name, amount in sorted(self.counts.items()):
            kind, key = name.split("/", 1)
            yield kind, (int(key) if kind != "optimizer_step" else key), amount

    def examples(self, kind: str = "fwd_bwd") -> float:
        return sum(a for k, _, a in self.entries() if k == kind)

    def state_dict(self) -> dict[str, float]:
        return dict(self.counts)

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.counts = defaultdict(float, {str(k): float(v) for k, v in state.items()})

    def __repr__(self) -> str:
        return f"WorkLedger({dict(self.counts)})"
