"""Import a class by its dotted path (``lightning_modules.optimizers.Lion``): the one place that does it."""

from __future__ import annotations

import importlib

from core.errors import UserError

__all__ = ["import_class"]


def import_class(path: str, what: str = "class path", example: str = "package.module.ClassName") -> type:
    """The class at ``path``.

    Args:
        path: ``module.ClassName``.
        what: where the path came from, for the message (an option or a config key).
        example: a path that works, for the message.

    Raises:
        UserError: the module or the class is not there; a missing module is named as such, so that a user
            sees ``No module named 'mymethods'`` rather than a generic failure.
    """
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise UserError(f"{what}: {path!r} is not a dotted class path; give e.g. {example}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or module_name
        raise UserError(f"{what}: cannot import {path!r}: no module named {missing!r} (is it installed, or its "
                        f"folder on PYTHONPATH?)") from None
    except ImportError as error:
        raise UserError(f"{what}: cannot import {path!r}: {error}") from None
    found = getattr(module, class_name, None)
    if not isinstance(found, type):
        raise UserError(f"{what}: module {module_name!r} has no class {class_name!r}; give e.g. {example}")
    return found
