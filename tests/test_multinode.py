"""A pool across several raylets on this machine: placement by custom resources, workers
spread across nodes, a batch completing, and the worker count growing and shrinking.

The cluster runs in a subprocess (`tests/multinode_scenario.py`): a process holds one Ray,
and the rest of the suite shares a single-node one."""

from __future__ import annotations

from tests.scenarios import REDIS, run_scenario

SCENARIOS = [("tests.multinode_scenario", REDIS)]


def test_a_pool_spreads_over_nodes_and_scales_with_load(redis_url: str) -> None:
    report = run_scenario("tests.multinode_scenario", redis_url)
    workers = set(report["worker_nodes"])
    initial, peak = report["initial_nodes"], report["peak_nodes"]
    # Agent workers go only where agent_worker is, never to the head, and spread over both nodes.
    assert len(initial) == 2 and set(initial.values()) == workers
    assert len(peak) == 4 and set(peak.values()) == workers and report["head"] not in peak.values()
    assert report["statuses"] == ["succeeded"] and report["answers_ok"] and report["tool_ok"]
    counts = [n for _, n in report["history"]]
    assert max(counts) == 4 and report["final_count"] == 2 and counts[-1] == 2
