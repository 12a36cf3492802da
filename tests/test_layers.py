"""The layering of ARCHITECTURE.md holds: import-linter's contracts in pyproject.toml over
the real import graph (function-level imports included), and every module has its layer."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

import agentpool

ROOT = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def test_no_import_points_against_the_layers(capsys: pytest.CaptureFixture[str]) -> None:
    exit_code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert exit_code == 0, report
    assert "0 broken" in report


def test_every_module_of_agentpool_has_a_layer() -> None:
    """A new module of `agentpool/` is placed in a layer, or the contract would not see it
    (the top-level folders are layers of their own, whatever they hold)."""
    (layers,) = [c["layers"] for c in CONFIG["contracts"] if c["type"] == "layers"]
    placed = {name.strip() for layer in layers for part in layer.split("|") for name in part.split(":")}
    unplaced = []
    for module in pkgutil.walk_packages(agentpool.__path__, prefix="agentpool."):
        name = module.name
        if module.ispkg and name == "agentpool.simulator":
            continue  # the package's __init__ only re-exports its modules, each placed
        if not any(name == p or name.startswith(p + ".") for p in placed):
            unplaced.append(name)
    assert unplaced == []
