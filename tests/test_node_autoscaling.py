"""Ray's own autoscaler adds agent-worker nodes because the pool wants more workers than fit,
and removes them once idle, mid-batch, losing nothing (`tests/nodes_scenario.py` on the
`fake_multinode` provider, in a subprocess: the cluster is its own)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.fake_cluster import RAY_CLUSTER_YAML, fake_config
from tests.nodes_scenario import ONE_NODE, summarize
from tests.scenarios import REDIS, run_scenario

SCENARIOS = [("tests.nodes_scenario", REDIS, "quick")]


def test_the_fake_cluster_has_ray_cluster_yaml_s_node_types_and_resources() -> None:
    source = yaml.safe_load(RAY_CLUSTER_YAML.read_text())
    config = fake_config("127.0.0.1:1", max_nodes={"agent_worker": 4, "tool_executor": 1}, idle_timeout_s=6)
    types = config["available_node_types"]
    assert types["ray.head.default"]["resources"] == source["available_node_types"]["head"]["resources"]
    for name in ("agent_worker", "tool_executor"):
        assert types[name]["resources"] == source["available_node_types"][name]["resources"]
        assert types[name]["min_workers"] == source["available_node_types"][name]["min_workers"]
    assert types["agent_worker"]["max_workers"] == 4 and types["tool_executor"]["max_workers"] == 1
    assert config["upscaling_speed"] == source["upscaling_speed"]


@pytest.fixture(scope="module")
def report(redis_url: str) -> dict[str, Any]:
    return run_scenario("tests.nodes_scenario", redis_url, "quick", timeout_s=300)


def test_the_autoscaler_adds_nodes_for_the_pool_and_the_pool_spreads_onto_them(report: dict[str, Any]) -> None:
    figures = summarize(report)
    first = report["samples"][0]
    assert len(first["nodes"]) == 1 and first["workers"] == 2  # min_workers: 1 node of 2 workers
    # The ramp to 4x one node's load: the pool wants more workers than fit, the autoscaler
    # says it adds agent_worker nodes (its own event log), and workers on them take tasks.
    adds = [e["text"] for e in report["events"] if e["added"]]
    assert adds and all("of type agent_worker" in text for text in adds), report["events"]
    assert figures["nodes_at_peak"] >= 3, figures
    assert max(len(s["taking"]) for s in report["samples"]) >= 3  # workers taking tasks on 3+ nodes
    assert figures["workers_at_peak"] > 2 * 2
    assert figures["demand_to_node_taking_tasks_s"] > 0
    assert max(s["in_flight"] for s in report["samples"]) == 4 * ONE_NODE


def test_idle_nodes_are_removed_mid_batch_and_nothing_is_lost(report: dict[str, Any]) -> None:
    figures = summarize(report)
    removed = [e["text"] for e in report["events"] if not e["added"]]
    assert removed and all("(idle)" in text for text in removed), report["events"]
    assert figures["nodes_removed_mid_batch_per_ramp"] >= 1, figures  # while the 1x tail ran
    last = report["samples"][-1]
    # Back to the autoscaler's min_workers: the pool's last workers share one node.
    assert figures["nodes_at_end"] == 1, (figures, {k: last[k] for k in ("nodes", "busy", "taking", "workers")})
    assert report["statuses"] == ["succeeded"] and report["answers_ok"]
    assert report["finished"] == report["submitted"] > 100
    assert figures["tasks_lost"] == 0 and figures["tasks_duplicated"] == 0, figures
