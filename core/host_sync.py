"""Counting the points where the host waits for the device: ``HostReadCounter``.

On a GPU the host queues kernels and runs ahead of the device; every read of a device value on the host
(``.item()``, ``.tolist()``, ``.cpu()``, ``bool(tensor)``, ``float(tensor)``, a blocking copy) makes it wait
until the device has caught up, and the device then idles while the host queues the next step. A training
step that never reads a device value keeps the device busy (docs/performance.md, "A step that never waits").

``torch.cuda.set_sync_debug_mode`` reports such waits on a GPU. On a CPU there is no device to wait for, so
this counter records the *reads* themselves, which a GPU would pay for: a ``TorchFunctionMode`` sees every
tensor method the host calls (``item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``, ``__float__``,
``__int__``, ``__index__``) and a ``TorchDispatchMode`` every ``aten::_local_scalar_dense`` (what those
reads and Python comparisons of 0-d tensors end in), so a read is counted however it is spelled. Each read
is attributed to the window named by ``label`` at the time (e.g. the optimizer step), with the innermost
frame of this project's code that made it, so a test can say which line synchronises.

>>> import torch
>>> counter = HostReadCounter()
>>> with counter:
...     counter.label = 1
...     _ = torch.ones(2).sum().item()
>>> counter.counts[1] > 0
True
"""

from __future__ import annotations

import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HOST_READS", "HostReadCounter", "read_site"]

HOST_READS = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"})
_ROOT = str(Path(__file__).resolve().parents[1])


def read_site(exclude: tuple[str, ...] = ()) -> str:
    """``file:line`` of the innermost frame of this project's code that led to the read (not this module, not
    an installed package, not a file under the ``exclude`` prefixes relative to the project's root), with the
    innermost installed package's frame after ``via`` when the read is in one."""
    skipped = tuple(f"{_ROOT}/{prefix}" for prefix in exclude)
    stack = [f for f in traceback.extract_stack()
             if not f.filename.endswith("host_sync.py") and not f.filename.startswith(skipped)]
    installed = [f for f in stack if "site-packages" in f.filename or not f.filename.startswith(_ROOT)]
    own = [f for f in stack if f not in installed]
    site = f"{Path(own[-1].filename).relative_to(_ROOT)}:{own[-1].lineno}" if own else "?"
    if installed and (not own or stack.index(installed[-1]) > stack.index(own[-1])):
        package = installed[-1].filename.split("site-packages/")[-1]
        site += f" via {package}:{installed[-1].lineno}"
    return site


class _Methods(TorchFunctionMode):
    def __init__(self, counter: HostReadCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") not in HOST_READS or self.counter._in_method:
            return func(*args, **(kwargs or {}))
        self.counter._record(func.__name__)
        self.counter._in_method = True  # the dispatch below it is the same read
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter._in_method = False


class _Scalars(TorchDispatchMode):
    def __init__(self, counter: HostReadCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.counter._in_method:
            self.counter._record("_local_scalar_dense")
        return func(*args, **(kwargs or {}))


class HostReadCounter:
    """A context manager that counts host reads of tensor values, by ``label`` (see the module).

    Attributes:
        label: the window reads are counted in now (set it from a callback: the optimizer step); ``None``
            does not count.
        counts: reads per label.
        where: per label, ``"read at file:line"`` -> count, for the message of a failing test.
    """

    def __init__(self) -> None:
        self.label: Any = None
        self.counts: Counter = Counter()
        self.where: dict[Any, Counter] = defaultdict(Counter)
        self._in_method = False
        self._modes = (_Methods(self), _Scalars(self))

    def _record(self, read: str) -> None:
        if self.label is None:
            return
        self.counts[self.label] += 1
        self.where[self.label][f"{read} at {read_site()}"] += 1

    def __enter__(self) -> HostReadCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
