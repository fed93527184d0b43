"""Small-experiment conveniences of ``fit``/``validate``/``test``/``plan`` on top of LightningCLI's parser.

- ``--budget 10s``: the RST budget of the config's ``RSTBudget`` callback, without an overlay.
- ``--trainer.callbacks.CLASS.ARG VALUE``: a callback's argument, the callback named by its class (as study
  files do), e.g. ``--trainer.callbacks.RunCheckpoint.every 30s``. LightningCLI itself only reaches the
  callback list by position or by re-listing it.
- ``condense_parser_error``: the line that says what is wrong in one of jsonargparse's error reports (which
  nest every union member's complaint), so that a parser error is printed as one ``error:`` line.

``split_overrides`` takes these out of the arguments before LightningCLI parses them; ``apply_overrides`` writes
them into the parsed configuration before anything is instantiated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from core.errors import UserError

__all__ = ["CommandLineOverrides", "apply_overrides", "condense_parser_error", "split_overrides"]

_CALLBACK_ARGUMENT = re.compile(r"^--trainer\.callbacks\.([A-Z]\w*)\.(\w+(?:\.\w+)*)$")


@dataclass
class CommandLineOverrides:
    """What ``split_overrides`` took out of the arguments."""

    budget: str | None = None
    callbacks: list[tuple[str, str, Any]] = field(default_factory=list)  # (class name, argument, value)

    def __bool__(self) -> bool:
        return self.budget is not None or bool(self.callbacks)


def _value(text: str) -> Any:
    """A command-line value as YAML reads it (``0.5`` a float, ``true`` a bool, ``10s`` a string)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_overrides(argv: list[str]) -> tuple[list[str], CommandLineOverrides]:
    """``argv`` without ``--budget`` and ``--trainer.callbacks.CLASS.ARG`` (``--key value`` or ``--key=value``),
    and what they say."""
    rest: list[str] = []
    overrides = CommandLineOverrides()
    index = 0
    while index < len(argv):
        argument = argv[index]
        key, equals, inline = argument.partition("=")
        matched = _CALLBACK_ARGUMENT.match(key)
        if key == "--budget" or matched:
            if equals:
                value = inline
            elif index + 1 < len(argv):
                index += 1
                value = argv[index]
            else:
                raise UserError(f"{key} needs a value, e.g. {key} {'10s' if key == '--budget' else '...'}")
            if matched:
                overrides.callbacks.append((matched.group(1), matched.group(2), _value(value)))
            else:
                overrides.budget = value
        else:
            rest.append(argument)
        index += 1
    return rest, overrides


def _class_name(callback: Any) -> str:
    return str(callback.get("class_path", "")).rpartition(".")[2] if hasattr(callback, "get") else type(callback).__name__


def _set(init_args: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        init_args = init_args[part]
    init_args[last] = value


def apply_overrides(config: Any, overrides: CommandLineOverrides) -> None:
    """Write ``overrides`` into a parsed configuration (a jsonargparse ``Namespace`` with ``trainer.callbacks``).

    Raises:
        UserError: no callback of the named class, or more than one; ``--budget`` without an ``RSTBudget``.
    """
    if not overrides:
        return
    from callbacks.rst import RSTBudget
    from core.class_paths import import_class

    callbacks = list(config.get("trainer.callbacks") or [])
    names = [_class_name(c) for c in callbacks]
    requests = list(overrides.callbacks)
    if overrides.budget is not None:
        clocks = [name for c, name in zip(callbacks, names, strict=True)
                  if isinstance(c.get("class_path"), str) and issubclass(import_class(c["class_path"]), RSTBudget)]
        if not clocks:
            raise UserError("--budget: the config has no callbacks.rst.RSTBudget callback to set it on; add one "
                            "(configs/bert/demo.yaml shows how)")
        requests.insert(0, (clocks[0], "budget", overrides.budget))
    for class_name, argument, value in requests:
        matches = [c for c, name in zip(callbacks, names, strict=True) if name == class_name]
        if len(matches) != 1:
            listed = ", ".join(names) or "none"
            raise UserError(f"--trainer.callbacks.{class_name}.{argument}: the config has {len(matches)} {class_name} "
                            f"callbacks; its callbacks: {listed}")
        if matches[0].get("init_args") is None:
            matches[0]["init_args"] = type(config)()
        try:
            _set(matches[0]["init_args"], argument, value)
        except (KeyError, TypeError):
            raise UserError(f"--trainer.callbacks.{class_name}.{argument}: {class_name} has no argument "
                            f"{argument.split('.')[0]!r} set in the config to nest into") from None


_MOST_TELLING = (
    re.compile(r"No module named '[^']+'"),
    re.compile(r"[Uu]nrecognized arguments: .*"),
    re.compile(r"Import path .* does not .*"),
)


def condense_parser_error(message: str) -> str:
    """One line of a jsonargparse error: a missing module or unrecognised arguments if it mentions one,
    otherwise its first non-empty line."""
    for pattern in _MOST_TELLING:
        found = pattern.search(message)
        if found:
            text = found.group(0).strip()
            return f"no module named {text.split(' ', 3)[3]}" if text.startswith("No module named") else text
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[0] if lines else "the arguments do not parse"
