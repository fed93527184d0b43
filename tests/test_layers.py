"""The project's imports point one way, and no module imports itself back through others.

Layers, bottom to top (a module may import only from lower layers and from its own package's modules of the
same layer):

0. ``core`` (no Lightning);
1. ``lightning_modules``, ``datamodules``;
2. ``callbacks``;
3. ``training``, the command line's Lightning layer (``PretrainingCLI``, run folders, ``summary.json``, calibration);
4. ``studies``, ``benchmarks``;
5. ``cli``: the command modules ``cli.commands.*``, the command table ``cli.__main__`` and ``cli`` itself;
6. ``train.py``, which nothing imports.

Every import counts, also one inside a function: a lazy import hides a circle from Python, not from a reader.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from helpers import ROOT

TOP_LEVEL = ("core", "lightning_modules", "datamodules", "callbacks", "training", "cli", "studies", "benchmarks", "train")
LAYERS = [  # (module-name pattern, layer)
    (r"core(\..*)?", 0),
    (r"(lightning_modules|datamodules)(\..*)?", 1),
    (r"callbacks(\..*)?", 2),
    (r"training(\..*)?", 3),
    (r"(studies|benchmarks)(\..*)?", 4),
    (r"cli(\.commands(\..*)?|\.__main__)?", 5),
    (r"train", 6),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the project outside tests: name -> file."""
    files = [ROOT / "train.py"] + [p for name in TOP_LEVEL[:-1] for p in sorted((ROOT / name).rglob("*.py"))]
    return {_module_name(path): path for path in files}


def layer_of(module: str) -> int:
    for pattern, layer in LAYERS:
        if re.fullmatch(pattern, module):
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (``from training import summary`` counts as ``training.summary``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in TOP_LEVEL}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in ``graph``, as the list of modules around it, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


MODULES = project_modules()
GRAPH = {name: imports_of(path, MODULES) for name, path in MODULES.items()}


def test_every_top_level_package_and_train_py_is_covered():
    assert {name.split(".")[0] for name in MODULES} == set(TOP_LEVEL)
    for name in MODULES:
        layer_of(name)


@pytest.mark.parametrize("package", TOP_LEVEL)
def test_imports_point_one_way(package):
    for name, imported in GRAPH.items():
        if name.split(".")[0] != package:
            continue
        for target in imported:
            assert target in MODULES, f"{MODULES[name].relative_to(ROOT)} imports {target}, which is no project module"
            same_package = target.split(".")[0] == package and layer_of(target) == layer_of(name)
            assert same_package or layer_of(target) < layer_of(name), (
                f"{MODULES[name].relative_to(ROOT)} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")


def test_no_module_imports_itself_back_through_others():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


def test_no_top_level_package_imports_itself_back_through_others():
    packages = {}
    for name, imported in GRAPH.items():
        packages.setdefault(name.split(".")[0], set()).update(t.split(".")[0] for t in imported)
    graph = {package: targets - {package} for package, targets in packages.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_reintroduced_circle():
    graph = {name: set(imported) for name, imported in GRAPH.items()}
    graph["training.lightning_cli"].add("studies.runner")  # what `studies/compare.py` <-> `train.py` once did
    assert _cycle(graph) is not None
    with pytest.raises(AssertionError):
        assert layer_of("studies.runner") < layer_of("training.lightning_cli")


def test_the_core_does_not_import_lightning():
    for path in sorted((ROOT / "core").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {name for name in names if name.split(".")[0] in ("lightning", "pytorch_lightning")}, path


def test_nothing_imports_the_entry_file():
    importers = [name for name, imported in GRAPH.items() if "train" in imported]
    assert not importers, importers


CLASS_NAME_TESTS = [
    re.compile(r"\.__name__\s*[!=]=|[!=]=\s*[\w.()]*\.__name__"),  # type(x).__name__ == "RSTBudget"
    re.compile(r"\.(startswith|endswith)\(\s*f?[\"'][A-Z][A-Za-z]+[\"']"),  # key.endswith("DataModule")
]


def test_contracts_are_found_by_type_never_by_class_name():
    offenders = []
    for path in MODULES.values():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(pattern.search(line) for pattern in CLASS_NAME_TESTS):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_class_name_patterns_catch_what_they_are_for():
    caught = ['if type(c).__name__ == "RSTBudget":', 'if k.endswith("DataModule")', 'k.startswith("RSTBudget")']
    missed = ['if __name__ == "__main__":', 'name.startswith("_")', 'path.endswith(".npy")']
    assert all(any(p.search(line) for p in CLASS_NAME_TESTS) for line in caught)
    assert not any(any(p.search(line) for p in CLASS_NAME_TESTS) for line in missed)


def test_no_module_outside_the_tests_exceeds_400_lines():
    long = {str(path.relative_to(ROOT)): n for path in MODULES.values() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


def test_train_py_is_a_few_lines_that_run_the_cli():
    text = (ROOT / "train.py").read_text()
    assert len(text.splitlines()) < 30 and "from cli import main" in text
