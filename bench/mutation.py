"""`mutation`: how many deliberate mistakes in the pure policy cores the fast tests catch.

mutmut (pinned in the `dev` extra) runs on a copy of the checkout in the installed layout
(`.mutation/`, see bench/layout.py, so a mutant's name is its module's real name). It copies
the package into `.mutation/mutants/`, makes every small
change it knows in the modules listed under `only_mutate` in pyproject's `[tool.mutmut]`
(a `<` for a `<=`, a constant off by one, a dropped argument, ...), and runs, for each
mutant, the fast tests listed there that reach the mutated function (no Ray, no Redis).
A mutant is killed when a test fails, and survives when every test passes.

Hypothesis runs derandomised and without its example database (the `mutation` profile in
`tests/conftest.py`), so a run's verdicts depend on the code and the tests only.

Figures:
- `mutation_score`: killed / (killed + survived). Timeouts count as killed (the mutant
  hangs or runs away), mutants that no fast test reaches count as survived. Mutants
  listed in `bench/mutation_accepted.toml` as `equivalent` (no input tells them from the
  original; the reason says why) are left out of both; those listed as `accepted` (a
  difference the product does not promise; the reason says which) still count as survived.
- `mutants`, `killed`, `timeout`, `survived`, `no_tests`, `equivalent`, `accepted`: counts
  (`accepted` survivors are among `survived`).
- `survived_<module>`: survivors (no-test and accepted mutants included) per module.
- `run_s`: wall time of the run, mutant generation and the clean test run included.

`--quick` runs a fixed sample (a sixth of the mutants, chosen by a hash of their names, so
every module is sampled and the sample is the same each run) through the same tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.layout import ROOT, stage
from bench.report import write

#: Where mutmut runs; `cd .mutation && python -m mutmut show NAME` prints a mutant's change.
STAGE = ROOT / ".mutation"
ACCEPTED = Path(__file__).with_name("mutation_accepted.toml")
QUICK_SHARE = 6
MAX_CHILDREN = os.cpu_count() or 2
SURVIVED = ("survived", "no_tests")
#: mutmut's verdicts, as this report names them.
KINDS = {"killed": "killed", "timeout": "timeout", "survived": "survived", "no tests": "no_tests"}


def run(out: Path, quick: bool) -> dict[str, Any]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    modules: list[str] = config["only_mutate"]
    accepted = load_accepted()
    started = time.monotonic()
    # Staged afresh: mutmut's cached verdicts would make it no run at all.
    stage(STAGE, also=("tests", "pyproject.toml"))
    if quick:
        # Asked for no mutant, mutmut generates them all and maps tests to functions, then
        # stops ("nothing matches"): the names to sample from are then known.
        _mutmut(["run", "agentpool-no-such-mutant*"], check=False)
        sample = sorted(name for name in read_verdicts(modules) if _sampled(name))
        if not sample:
            raise SystemExit("mutmut generated no mutants; run `python -m mutmut run` to see why")
        _mutmut(["run", *sample])
    else:
        _mutmut(["run"])
    run_s = time.monotonic() - started
    verdicts = read_verdicts(modules)
    if quick:
        verdicts = {name: code for name, code in verdicts.items() if _sampled(name)}
    figures, survivors = summarise(verdicts, modules, accepted)
    # A listed mutant that no longer survives (killed, or gone with a change of its function).
    stale = [] if quick else [name for name in accepted if verdict(verdicts.get(name)) not in SURVIVED]
    figures["stale_listed"] = len(stale)
    figures["run_s"] = round(run_s, 1)
    listing = "\n".join(f"- `{name}` ({kind})" for name, kind in survivors) or "- none"
    write(
        out,
        "mutation",
        figures=figures,
        config={
            "quick": quick,
            "tool": f"mutmut {_mutmut_version()}",
            "modules": modules,
            "tests": config["pytest_add_cli_args_test_selection"],
            "sample": f"1 in {QUICK_SHARE}" if quick else "all",
            "listed": len(accepted),
        },
        notes=(
            "Killed / (killed + survived) over the pure policy modules, judged by the fast tests. "
            "`cd .mutation && python -m mutmut show NAME` prints a survivor's change.\n\n### Survivors\n\n"
            + listing
            + ("\n\n### Listed in mutation_accepted.toml, no longer surviving\n\n" + "\n".join(stale) if stale else "")
        ),
    )
    return figures


def summarise(
    verdicts: dict[str, int], modules: list[str], accepted: dict[str, Listed]
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The figures of a run, and its survivors (name, kind) that are not accepted."""
    kinds: Counter[str] = Counter()
    per_module: Counter[str] = Counter()
    survivors: list[tuple[str, str]] = []
    for name, code in sorted(verdicts.items()):
        kind = verdict(code)
        listed = accepted.get(name)
        if kind in SURVIVED and listed is not None:
            kinds[listed.kind] += 1
            if listed.kind == "equivalent":
                continue
        kinds[kind] += 1
        if kind in SURVIVED:
            per_module[module_of(name)] += 1
            survivors.append((name, kind if listed is None else f"{kind}, accepted: {listed.reason}"))
    killed = kinds["killed"] + kinds["timeout"]
    survived = kinds["survived"] + kinds["no_tests"]
    figures: dict[str, Any] = {
        "mutation_score": round(killed / (killed + survived), 4) if killed + survived else 1.0,
        "mutants": len(verdicts),
        "killed": kinds["killed"],
        "timeout": kinds["timeout"],
        "survived": kinds["survived"],
        "no_tests": kinds["no_tests"],
        "equivalent": kinds["equivalent"],
        "accepted": kinds["accepted"],
        "other": kinds["other"],
    }
    for path in modules:
        module = path.removesuffix(".py").replace("/", ".")
        figures[f"survived_{module}"] = per_module[module]
    return figures, survivors


def verdict(code: int | None) -> str:
    """mutmut's own reading of a mutant's exit code; anything else (not run, interrupted,
    suspicious, a crash) is `other`: reported, never counted as a kill."""
    from mutmut.stats import status_by_exit_code

    return KINDS.get(status_by_exit_code[code], "other")


def module_of(mutant: str) -> str:
    """`agentpool.scheduler.fair.xǁFairQueueǁhead__mutmut_3` -> `agentpool.scheduler.fair`."""
    return re.split(r"\.x[ǁ_]", mutant, maxsplit=1)[0]


@dataclass(frozen=True)
class Listed:
    kind: str  # "equivalent" or "accepted"
    reason: str


def load_accepted() -> dict[str, Listed]:
    """The survivors explained in `mutation_accepted.toml`, by mutant name."""
    if not ACCEPTED.exists():
        return {}
    listed: dict[str, Listed] = {}
    for name, entry in tomllib.loads(ACCEPTED.read_text()).get("mutant", {}).items():
        kind, reason = entry.get("kind"), str(entry.get("reason", "")).strip()
        if kind not in ("equivalent", "accepted") or not reason:
            raise SystemExit(f"{ACCEPTED.name}: {name} needs kind = equivalent|accepted and a reason")
        listed[name] = Listed(kind, reason)
    return listed


def read_verdicts(modules: list[str]) -> dict[str, int]:
    """Every mutant of the mutated modules, with its exit code (None: not run)."""
    verdicts: dict[str, int] = {}
    for path in modules:
        meta = STAGE / "mutants" / f"{path}.meta"
        if meta.exists():
            verdicts.update(json.loads(meta.read_text())["exit_code_by_key"])
    return verdicts


def _sampled(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % QUICK_SHARE == 0


def _mutmut(args: list[str], *, check: bool = True) -> None:
    env = {**os.environ, "HYPOTHESIS_PROFILE": "mutation"}
    command = [sys.executable, "-m", "mutmut", *args[:1], "--max-children", str(MAX_CHILDREN), *args[1:]]
    done = subprocess.run(command, cwd=STAGE, env=env, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise SystemExit(f"mutmut {args[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")
