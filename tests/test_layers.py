"""The layering of ARCHITECTURE.md holds: import-linter's contracts in pyproject.toml over
the real import graph (function-level imports included), and every module has its layer."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import agentpool
from bench.layout import stage

ROOT = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def test_no_import_points_against_the_layers(tmp_path: Path) -> None:
    # On a copy in the installed layout: import-linter finds a package's modules by walking
    # its folder, and `agentpool.actors` lives in `actors/` in the checkout.
    staged = stage(tmp_path / "installed")
    # In its own process: import-linter's CLI configures logging with dictConfig, which
    # disables every logger already made (the pool's own among them) for the rest of a run.
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=staged,
        env={**os.environ, "PYTHONPATH": str(staged)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


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
