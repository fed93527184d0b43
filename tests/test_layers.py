"""The project's imports point one way: core <- {lightning_modules, datamodules} <- callbacks <- train.py."""

import ast

import pytest

from helpers import ROOT

PACKAGES = ("core", "lightning_modules", "datamodules", "callbacks", "train")
ALLOWED = {
    "core": set(),
    "lightning_modules": {"core"},
    "datamodules": {"core"},
    "callbacks": {"core"},
    "train": {"core", "lightning_modules", "datamodules", "callbacks"},
}


def _project_imports(path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
    return imported & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    files = [ROOT / "train.py"] if package == "train" else sorted((ROOT / package).glob("*.py"))
    assert files
    for path in files:
        outside = _project_imports(path) - {package} - ALLOWED[package]
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}"


def test_the_core_does_not_import_lightning():
    for path in sorted((ROOT / "core").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {name for name in names if name.split(".")[0] in ("lightning", "pytorch_lightning")}, path
