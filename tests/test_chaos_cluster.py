"""Chaos on a cluster of its own: the driver of a detached pool, and a whole node, each
SIGKILLed mid-batch, and a supervised pool stopped by SIGTERM (`tests/chaos_scenario.py`,
run in a subprocess: one process holds one Ray, and the rest of the suite shares a
single-node one)."""

from __future__ import annotations

import re
from typing import Any

from tests.scenarios import REDIS, run_scenario

SCENARIOS = [("tests.chaos_scenario", name, REDIS) for name in ("driver", "node", "cli", "supervise")]


def scenario(name: str, redis_url: str) -> dict[str, Any]:
    return run_scenario("tests.chaos_scenario", name, redis_url)


def test_killing_the_driver_of_a_detached_pool_loses_no_accepted_task(redis_url: str) -> None:
    report = scenario("driver", redis_url)
    assert report["done_before_kill"] < report["submitted"]  # the kill came mid-batch
    assert report["lost"] == 0 and report["duplicates"] == 0, report
    assert report["statuses"] == ["succeeded"]


def test_losing_a_node_mid_batch_loses_and_duplicates_nothing(redis_url: str) -> None:
    report = scenario("node", redis_url)
    assert report["workers_on_both_nodes"]
    assert report["done_before_kill"] < report["submitted"]
    assert report["statuses"] == ["succeeded"] and report["in_order"]
    assert report["lost"] == 0 and report["duplicates"] == 0, report
    assert report["redispatched"] >= 1  # the dead node's tasks ran again elsewhere


def test_submit_detach_returns_at_once_and_the_results_land_in_redis(redis_url: str) -> None:
    report = scenario("cli", redis_url)
    assert report["started"], report["start_output"]  # found the cluster running here, no RAY_ADDRESS
    assert "20 accepted" in report["submit_output"], report
    # What the commands print is theirs alone: no Ray log lines, no token-auth notice, no password.
    for output in (report["start_output"], report["status_output"], report["submit_output"]):
        assert "INFO" not in output and "Token authentication" not in output and "WARNING" not in output, output
        assert not re.search(r"://[^/\s]*:[A-Za-z0-9_-]{8,}@", output), output
    assert report["status_code"] == 0 and "tenants" in report["status_output"]
    assert report["clash_code"] == 1 and "already running" in report["clash_output"], report["clash_output"]
    assert len(report["clash_output"].strip().splitlines()) <= 3 and "Traceback" not in report["clash_output"]
    assert report["results_code"] == 0 and report["results_listed"] == report["submitted"]  # Redis by --name
    assert report["finished_when_submit_returned"] < report["submitted"]  # it did not wait for them
    assert report["lost"] == 0 and report["duplicates"] == 0, report
    assert report["stopped"]


def test_sigterm_on_a_supervised_pool_drains_it_and_a_new_pool_finishes_every_task(redis_url: str) -> None:
    report = scenario("supervise", redis_url)
    assert report["exit_code"] == 0, report["errors"]
    output = report["output"]
    assert "grace period (3s) over" in output and "4 still running" in output, output
    assert "8 queued (kept in the Redis backlog)" in output and "stopped" in output, output
    assert report["pool_gone"]
    assert report["lost"] == 0 and report["duplicates"] == 0, report
    assert report["statuses"] == ["succeeded"]
    assert report["long_resumed"] == [1, 1, 1, 1]  # from the checkpoints the drain left
