"""The wheel installs one top-level package, `agentpool`: the repository's `actors/`,
`scheduler/` and `cluster/` go in as `agentpool.actors`, ..., and `bench/` stays out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench.layout import ROOT, package_dirs


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # From a copy of what a source distribution holds (setuptools builds in the source tree).
    source = out / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in package_dirs().values():
        shutil.copytree(folder, source / folder.name, ignore=shutil.ignore_patterns("__pycache__"))
    # pip's isolated build, as a user's `pip install .` or a release would make it.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("agentpool-*.whl")
    return built


def test_the_wheel_holds_agentpool_and_its_dist_info_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"agentpool", f"{wheel.name.split('-py')[0]}.dist-info"}
    # Every module of the mapped folders is in the wheel, under its installed name.
    for package, folder in package_dirs().items():
        for source in folder.rglob("*.py"):
            installed = "/".join([*package.split("."), *source.relative_to(folder).parts])
            assert installed in names, installed
    assert "agentpool/py.typed" in names


def test_the_installed_layout_imports_every_module_and_nothing_else(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = """
import importlib, importlib.util, json, pkgutil, sys
import agentpool
loaded = []
for info in pkgutil.walk_packages(agentpool.__path__, prefix="agentpool."):
    loaded.append(importlib.import_module(info.name).__file__)
print(json.dumps({
    "files": loaded,
    "stray": [name for name in ("actors", "scheduler", "cluster", "bench") if importlib.util.find_spec(name)],
}))
"""
    # Away from the checkout, with the unpacked wheel first on the path (the checkout's
    # editable install stays behind it, for the dependencies).
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["stray"] == []
    files = [Path(f) for f in found["files"]]
    assert all(f.is_relative_to(site / "agentpool") for f in files), files
    for package in ("agentpool.actors", "agentpool.scheduler", "agentpool.cluster", "agentpool.simulator"):
        assert any(f.is_relative_to(site.joinpath(*package.split("."))) for f in files), package
