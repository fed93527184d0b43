"""Layer control, the model-side contract used by layer stacking and layer dropping (``core.contracts.LayerControl``, docs/design.md).

A pre-training module owns one or more stacks of repeated blocks (BERT: the encoder layers; T5: the
encoder and decoder blocks, indexed alike). ``set_active_layers`` chooses which blocks run; the
others are skipped in forward (identity), cost nothing and receive no gradient, because for the
duration of a forward the ``transformers`` model iterates over a ``ModuleList`` of the active blocks
only. The full stacks stay registered, so ``state_dict`` and checkpoints always hold every layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from core.errors import UserError

__all__ = ["LayerControlMixin"]


class LayerControlMixin:
    """Mixin for LightningModules; subclasses call ``_init_layer_control`` with ``(owner, attribute)`` pairs."""

    def _init_layer_control(self, owners: Sequence[tuple[nn.Module, str]]) -> None:
        self._stack_owners = list(owners)
        self._full_stacks = [getattr(owner, attr) for owner, attr in owners]
        sizes = {len(stack) for stack in self._full_stacks}
        if len(sizes) != 1:
            raise ValueError(f"all layer stacks must have the same depth, got {sorted(sizes)}")
        self._active_layers: tuple[int, ...] | None = None

    def layer_stacks(self) -> list[nn.ModuleList]:
        """The repeated blocks, one ``ModuleList`` per stack, at full depth."""
        return list(self._full_stacks)

    @property
    def num_layers(self) -> int:
        """Allocated depth L of each stack."""
        return len(self._full_stacks[0])

    @property
    def active_layers(self) -> tuple[int, ...]:
        """Indices of the blocks that run, in order."""
        return self._active_layers if self._active_layers is not None else tuple(range(self.num_layers))

    @property
    def num_active_layers(self) -> int:
        return len(self.active_layers)

    def set_active_layers(self, indices: Sequence[int] | None) -> None:
        """Run only the blocks ``indices`` (sorted, distinct); ``None`` runs all. Empty is an error."""
        if indices is None:
            self._active_layers = None
            return
        chosen = sorted({int(i) for i in indices})
        if not chosen:
            raise UserError("set_active_layers got an empty selection; pass None to run all layers")
        if chosen[0] < 0 or chosen[-1] >= self.num_layers:
            raise UserError(f"layer indices {chosen} are outside 0..{self.num_layers - 1}")
        for i in self.required_layers():
            if i not in chosen:
                raise UserError(f"layer {i} cannot be switched off: {self.required_layers.__doc__}")
        self._active_layers = None if len(chosen) == self.num_layers else tuple(chosen)

    def required_layers(self) -> tuple[int, ...]:
        """No layer is required to stay on."""
        return ()

    @contextmanager
    def running_active_layers(self) -> Iterator[None]:
        """Within this context the wrapped model iterates over the active blocks only."""
        if self._active_layers is None:
            yield
            return
        for (owner, attr), stack in zip(self._stack_owners, self._full_stacks, strict=True):
            setattr(owner, attr, nn.ModuleList([stack[i] for i in self._active_layers]))
        try:
            yield
        finally:
            for (owner, attr), stack in zip(self._stack_owners, self._full_stacks, strict=True):
                setattr(owner, attr, stack)
