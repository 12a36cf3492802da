"""The mutation benchmark's arithmetic and its list of explained survivors (the run itself,
minutes long, is `python -m bench mutation`)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from bench.mutation import Listed, load_accepted, module_of, summarise

ROOT = Path(__file__).resolve().parent.parent


def test_the_score_counts_timeouts_as_kills_and_leaves_out_only_equivalents() -> None:
    verdicts = {
        "agentpool.scheduler.fair.xǁFairQueueǁhead__mutmut_1": 1,  # killed
        "agentpool.scheduler.fair.xǁFairQueueǁhead__mutmut_2": 0,  # survived, equivalent
        "agentpool.scheduler.fair.xǁFairQueueǁhead__mutmut_3": 0,  # survived, accepted
        "agentpool.scheduler.fair.x_token_cost__mutmut_1": 36,  # timeout
        "agentpool.scheduler.fair.x_token_cost__mutmut_2": 33,  # no test reaches it
        "agentpool.actors.breaker.xǁCrashLoopǁcrashed__mutmut_1": 0,  # survived
        "agentpool.actors.breaker.xǁCrashLoopǁcrashed__mutmut_2": None,  # not run
    }
    listed = {
        "agentpool.scheduler.fair.xǁFairQueueǁhead__mutmut_2": Listed("equivalent", "never read"),
        "agentpool.scheduler.fair.xǁFairQueueǁhead__mutmut_3": Listed("accepted", "no promise"),
    }
    figures, survivors = summarise(verdicts, ["agentpool/scheduler/fair.py", "agentpool/actors/breaker.py"], listed)  # type: ignore[arg-type]
    assert figures["mutation_score"] == round(2 / 5, 4)  # killed + timeout over those plus 3 survivors
    assert (figures["killed"], figures["timeout"], figures["survived"], figures["no_tests"]) == (1, 1, 2, 1)
    assert (figures["equivalent"], figures["accepted"], figures["other"]) == (1, 1, 1)
    assert figures["survived_agentpool.scheduler.fair"] == 2 and figures["survived_agentpool.actors.breaker"] == 1
    assert [name for name, _ in survivors] == [
        "agentpool.actors.breaker.xǁCrashLoopǁcrashed__mutmut_1",
        "agentpool.scheduler.fair.x_token_cost__mutmut_2",
        "agentpool.scheduler.fair.xǁFairQueueǁhead__mutmut_3",
    ]


def test_module_names_come_from_mutant_names() -> None:
    assert module_of("agentpool.scheduler.fair.xǁFairQueueǁhead__mutmut_3") == "agentpool.scheduler.fair"
    assert module_of("agentpool.redact.x_luhn_valid__mutmut_23") == "agentpool.redact"


def test_every_listed_survivor_has_a_kind_and_a_reason_and_names_a_mutated_module() -> None:
    listed = load_accepted()
    assert listed
    modules = {
        path.removesuffix(".py").replace("/", ".")
        for path in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
    }
    for name, entry in listed.items():
        assert module_of(name) in modules, name
        assert entry.kind in ("equivalent", "accepted") and len(entry.reason) > 20
