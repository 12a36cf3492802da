"""The checkout in the layout the wheel installs, for tools that find modules by path.

The repository keeps `actors/`, `scheduler/` and `cluster/` at its top level; the wheel
installs them as `agentpool.actors`, ... (pyproject's `[tool.setuptools.package-dir]`).
Python imports them either way (the editable install maps the names), but tools that walk
files to name modules do not: import-linter would find no `agentpool.actors`, and mutmut
would name a mutant of `actors/breaker.py` `actors.breaker...` while the code runs as
`agentpool.actors.breaker`. They run on a copy staged here, in the installed layout.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dirs() -> dict[str, Path]:
    """Installed package name -> its folder in the checkout, from pyproject."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def stage(dest: Path, *, also: tuple[str, ...] = ()) -> Path:
    """Copy the packages into `dest` as they install (`dest/agentpool/actors/...`), plus the
    checkout's files or folders named in `also` as they are; returns `dest`."""
    shutil.rmtree(dest, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    # Parents first, so a mapped child lands inside its parent's copy.
    for name, folder in sorted(package_dirs().items(), key=lambda item: item[0].count(".")):
        shutil.copytree(folder, dest.joinpath(*name.split(".")), ignore=ignore, dirs_exist_ok=True)
    for extra in also:
        source = ROOT / extra
        if source.is_dir():
            shutil.copytree(source, dest / extra, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, dest / extra)
    return dest
