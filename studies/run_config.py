"""One run's configuration: the study's base configs and the method's overlays merged by the CLI's own parser,
then the overrides, the grid point, the budget (and table), the seed and the run's log directory; and its hash,
by which a rerun tells a finished run of the same configuration from a stale one."""

from __future__ import annotations

import functools
from typing import Any

import yaml

from callbacks.rst import RSTBudget
from core.class_paths import import_class
from core.errors import UserError
from core.sealing import json_sha256
from studies.study import Run, Study
from training.lightning_cli import parsed_config

__all__ = ["config_hash", "resolved_config"]


def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``model.learning_rate`` or ``model.init_args.learning_rate`` alike (``init_args`` is implied); in a list
    of classes a part names the class: ``trainer.callbacks.RhoLoss.irreducible_losses``."""
    node: Any = config
    parts = key.split(".")
    for index, part in enumerate(parts):
        if isinstance(node, list):
            matches = [item for item in node if isinstance(item, dict) and str(item.get("class_path", "")).split(".")[-1] == part]
            if len(matches) != 1:
                raise UserError(f"override {key}: {'.'.join(parts[:index])} holds {len(matches)} {part}")
            node = matches[0]
            continue
        if isinstance(node, dict) and part not in node and "init_args" in node and part != "init_args":
            node = node["init_args"]
        if not isinstance(node, dict):
            raise UserError(f"override {key}: {'.'.join(parts[:index])} is not a mapping")
        if index == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _check_class_paths(node: Any, where: str) -> None:
    if isinstance(node, dict):
        path = node.get("class_path")
        if isinstance(path, str):
            import_class(path, what=where)
        for value in node.values():
            _check_class_paths(value, where)
    elif isinstance(node, list):
        for value in node:
            _check_class_paths(value, where)


@functools.lru_cache(maxsize=64)
def _parsed(configs: tuple[str, ...], method: str) -> str:
    """The configs merged and checked by the CLI's own parser, as YAML (parsed once per list of configs)."""
    try:
        return parsed_config(configs)
    except UserError as error:
        raise UserError(f"method {method}: its configs do not parse ({error})") from None


def _is_budget(callback: dict[str, Any]) -> bool:
    """A callback entry of a resolved config that is the RST budget clock (found by type, not by name)."""
    path = callback.get("class_path")
    return isinstance(path, str) and issubclass(import_class(path, what="trainer.callbacks"), RSTBudget)


def resolved_config(study: Study, run: Run) -> dict[str, Any]:
    """The run's whole configuration: base + the method's overlays, resolved by the CLI's own parser, then the
    method's overrides and grid point, the budget (and table), the seed and the run's log directory."""
    method = study.method(run.method)
    config = yaml.safe_load(_parsed(tuple(study.base) + tuple(method.configs), run.method))
    for key, value in {**study.overrides, **method.overrides, **run.setting}.items():
        if isinstance(value, str):
            value = value.replace("{study}", str(study.output)).replace("{seed}", str(run.seed))
        _set_dotted(config, key, value)
    _check_class_paths(config, f"method {run.method}")
    callbacks = config["trainer"].get("callbacks") or []
    budget = next((c for c in callbacks if _is_budget(c)), None)
    if budget is None:
        raise UserError(f"method {run.method}: its config has no callbacks.rst.RSTBudget; a study compares under one RST budget")
    budget["init_args"]["budget"] = run.budget
    if study.table is not None:
        budget["init_args"]["table"] = study.table
    if not budget["init_args"].get("table"):
        raise UserError(f"method {run.method}: no cost table: set table: in the study or in the RSTBudget callback")
    config["seed_everything"] = run.seed
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": str(run.directory), "name": "tb", "version": "run",
                                                 "default_hp_metric": False}}
    config["trainer"]["enable_progress_bar"] = False
    return config


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of a resolved configuration (keys sorted): equal exactly when the configurations are."""
    return json_sha256(config)
