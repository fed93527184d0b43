"""The seams between the parts, declared in one place (docs/design.md, "Contracts").

Models (``lightning_modules/``) offer:

- ``LayerControl``: their repeated blocks and a way to choose which of them run;
- ``PerExampleLoss``: the training loss of each example, for batch selection;
- ``ChargesWork``: a ``WorkLedger`` they charge every forward+backward pass and optimizer step to;
- ``SkipsOptimizerSteps``: a way to abandon the optimizer step in progress, so that it changes nothing.

Callbacks (``callbacks/``) implement:

- ``BudgetClock``: the one object that measures budget progress tau (``RSTBudget``); the learning-rate
  schedule and every method's schedule read it;
- ``DepthSchedule``: a callback that decides which layers run at each optimizer step (layer stacking,
  layer dropping); at most one per run, and ``train.py plan`` replays it;
- ``BatchSelector``: a callback that chooses the examples of every training micro-batch from scored
  candidates (selective backprop, RHO-loss); the data module asks it for the training batches;
- ``SequenceSchedule``: a callback that cuts the training sequences shorter as a function of tau
  (sequence-length warm-up); ``train.py plan`` replays it and ``train.py calibrate`` prices its lengths;
- ``DoesOwnWork``: a callback that does work of a kind of its own (an EMA update) and charges it
  (``callbacks.rst.charged_work``); ``train.py plan`` replays it and ``train.py calibrate`` prices it.

Code finds its partners by these types (``isinstance``), never by attribute probing or class names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from core.cost_table import CostTable
from core.ledger import WorkLedger

__all__ = [
    "BatchSelector",
    "BudgetClock",
    "ChargesWork",
    "DepthSchedule",
    "DoesOwnWork",
    "EstimatesHessian",
    "LayerControl",
    "ModalOptimizer",
    "PerExampleLoss",
    "SequenceSchedule",
    "SkipsOptimizerSteps",
]


@runtime_checkable
class LayerControl(Protocol):
    """A model whose repeated blocks can be switched on and off.

    ``layer_stacks()`` returns one ``ModuleList`` per stack at full depth (BERT: the encoder layers;
    T5: the encoder and the decoder blocks, indexed alike). ``set_active_layers(indices)`` runs only
    those blocks (``None``: all; empty: an error); inactive blocks are skipped in forward, cost
    nothing and get no gradient. ``required_layers()`` may never be switched off (T5's block 0).
    """

    @property
    def num_layers(self) -> int: ...

    @property
    def active_layers(self) -> tuple[int, ...]: ...

    def layer_stacks(self) -> list[Any]: ...

    def set_active_layers(self, indices: Sequence[int] | None) -> None: ...

    def required_layers(self) -> tuple[int, ...]: ...


@runtime_checkable
class PerExampleLoss(Protocol):
    """``per_example_loss(batch) -> Tensor[B]``: the training objective of each example, averaged over
    its target tokens, without gradient, in eval mode, at the active depth (for batch selection)."""

    def per_example_loss(self, batch: dict[str, Any]) -> Any: ...


@runtime_checkable
class ChargesWork(Protocol):
    """A module that charges its work to ``work_ledger`` (this process, this fit) and reports
    ``work_done(world_size)``: the global work of the whole run, checkpoints before this fit included."""

    work_ledger: WorkLedger

    def work_done(self, world_size: int) -> WorkLedger: ...


@runtime_checkable
class EstimatesHessian(Protocol):
    """An optimizer that needs a Hessian estimate every ``hessian_interval`` steps (Sophia) over
    ``hessian_micro_batches`` micro-batches of the step (``None``: all); ``free_hessian``: not charged.
    The training module runs the passes, calls ``update_hessian()`` with their (unclipped) gradients, then
    ``set_batch_positions`` with the number of labels the estimate sampled on all processes, and charges
    the passes (``hessian/<k>`` in the ledger); ``plan`` charges them the same way. It logs ``win_rate``
    (the share of coordinates whose last update was not clipped; ``None`` before a step)."""

    hessian_interval: int
    hessian_micro_batches: int | None
    free_hessian: bool
    win_rate: Any

    def set_batch_positions(self, positions: Any) -> None: ...

    def update_hessian(self) -> None: ...


@runtime_checkable
class SkipsOptimizerSteps(Protocol):
    """A module whose optimizer step in progress can be abandoned: ``skip_optimizer_step()``, called from
    ``on_before_optimizer_step`` (gradients complete, not yet clipped or applied), makes that step change
    no parameter and no optimizer state, whatever the optimizer (``NonFiniteCheck(action="skip")``)."""

    def skip_optimizer_step(self) -> None: ...


@runtime_checkable
class ModalOptimizer(Protocol):
    """An optimizer whose parameters differ between training and evaluation (schedule-free methods)."""

    def train(self) -> Any: ...

    def eval(self) -> Any: ...


class BudgetClock(ABC):
    """Measures budget progress ``tau`` in [0, 1]; at most one per run.

    Every schedule (learning rate, stacking points, drop rate) is a function of ``tau``, so it ends
    exactly when the budget does (paper section 2.1).

    Attributes:
        budget_seconds: the budget in RST-seconds (with ``table``, ``train.py plan`` and ``RhoLoss`` simulate
            the run against it).
    """

    budget_seconds: float

    @abstractmethod
    def budget_progress(self) -> float:
        """tau = spent / budget, as of the last optimizer step."""

    @property
    @abstractmethod
    def spent_seconds(self) -> float:
        """RST spent so far (the whole run's, every rank's work), as of the last optimizer step."""

    @property
    @abstractmethod
    def table(self) -> CostTable | None:
        """The cost table that prices the run's work, or ``None`` if the clock measures wall time
        (``train.py score`` prices its scoring forwards with it)."""

    def sync(self, trainer: Any, pl_module: Any) -> None:  # noqa: B027 (optional hook)
        """Bring the clock up to date before a schedule reads it (a collective: every rank calls it)."""


class DepthSchedule(ABC):
    """A callback that decides the active layers of every optimizer step; at most one per run.

    Attributes:
        depth_is_persistent: ``True`` if the active depth is part of the model (stacking: a checkpoint
            stores it); ``False`` if it is a per-step draw (dropping: a checkpoint stores all layers).
    """

    depth_is_persistent: bool = True

    @abstractmethod
    def planned_active_layers(self, tau: float, num_layers: int, step: int, required: Sequence[int] = ()) -> int:
        """For ``train.py plan``: how many layers run at optimizer ``step`` with budget progress ``tau``
        (the same number the run will use)."""

    def planned_phase(self, tau: float) -> str | None:
        """For ``train.py plan``: a name for the phase at ``tau`` (``None``: name it by its depth)."""
        return None


class BatchSelector(ABC):
    """A callback that picks each training micro-batch from scored candidates; at most one per run.

    The data module hands it ``open_candidates(position, mask_pass_period)`` (an iterator over this
    rank's candidate micro-batches from rank-batch ``position`` to the end of its pass) and serves what
    ``training_batches`` returns: an endless stream of ``core.selection.PendingBatch``, each assembled
    into exactly ``batch_size`` selected examples just before its training step.

    Attributes:
        scoring_wall_seconds: time this process spent scoring candidates in this fit, if the selection is
            charged (``RSTBudget`` in wall mode adds it to the measured training time).
    """

    scoring_wall_seconds: float = 0.0

    @abstractmethod
    def training_batches(self, open_candidates: Any, batch_size: int) -> Any:
        """The training loader: an endless iterable of ``PendingBatch``."""

    @abstractmethod
    def planned_scored_per_trained(self) -> float:
        """For ``train.py plan``: expected forward-only examples charged per trained example."""


class DoesOwnWork(ABC):
    """A callback that does work of kinds of its own and charges it, so that the RST budget pays for it.

    It wraps each piece of work in ``callbacks.rst.charged_work(trainer, kind, amount, per=...)``, which
    charges the module's work ledger (a table-mode budget prices it with the table's ``work_seconds``) and,
    in wall mode, adds the measured time. ``RSTBudget`` refuses at start-up a table-mode run whose table lacks
    a price for one of ``work_kinds``; ``train.py plan`` charges ``planned_work`` after every optimizer step;
    ``train.py calibrate`` stores what ``measure_work`` times.
    """

    @abstractmethod
    def work_kinds(self) -> dict[str, str]:
        """Each kind of work this callback charges -> its unit, ``"events"`` or ``"examples"``."""

    @abstractmethod
    def planned_work(self, step: int, tau: float) -> dict[str, float]:
        """For ``train.py plan``: units of each kind the whole run does after optimizer step ``step`` (1 for the
        first), with ``tau`` the budget progress after that step (what the run's clock reads then)."""

    def measure_work(self, model: Any) -> dict[str, float]:
        """For ``train.py calibrate``: seconds of one unit of each kind on this machine for ``model``
        (a configured module, on the device calibration uses); empty: it cannot be timed apart."""
        return {}


class SequenceSchedule(ABC):
    """A callback that trains on sequences cut shorter than the data's ``seq_len`` early in the budget; at most
    one per run. The module charges each pass at the length it ran (``fwd_bwd/<k>@<n>``), a table prices each
    length (``fwd_bwd_seconds_by_length``), and ``RSTBudget`` refuses at start-up a table-mode run whose table
    lacks one of ``lengths``."""

    @abstractmethod
    def planned_length(self, tau: float, full_length: int) -> int:
        """For ``train.py plan``: the tokens per sequence at budget progress ``tau`` (the run's own rule)."""

    @abstractmethod
    def lengths(self, full_length: int) -> list[int]:
        """Every length shorter than ``full_length`` the schedule can train on (``train.py calibrate`` times them)."""
