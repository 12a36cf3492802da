"""Worker autoscaling inside the pool, on the session's local Ray: the pool grows under a
backlog, shrinks after it without cutting a run short, and leaves no worker behind."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import ray

from agentpool import AgentPool, AgentTask, AutoscaleConfig, PoolConfig, SimulatorConfig
from agentpool.pool import NAMESPACE
from agentpool.scheduler.fleet import worker_actor_names

pytestmark = pytest.mark.usefixtures("ray_session")


def _until(condition: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    """Polls another process's state until `condition` holds (a real cluster has no clock to inject)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def _workers_alive(config: PoolConfig) -> list[str]:
    return worker_actor_names(config, NAMESPACE)


def test_workers_follow_the_load_up_and_back_down(redis_url: str) -> None:
    config = PoolConfig(
        name=f"p{uuid.uuid4().hex[:8]}",
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        # A backlog of 60 x 1 s / 4 loops = 15 s: well past the ~7 s a new worker process takes
        # to start on a loaded 2-core machine, so the pool is still busy when both are up.
        simulator=SimulatorConfig(latency_ms=1000, latency_sigma=0),
        num_workers=1,
        worker_concurrency=4,
        autoscale=AutoscaleConfig(
            min_workers=1,
            max_workers=3,
            target_loops_per_worker=3,
            upscale_delay_s=0.5,
            downscale_delay_s=2.0,
            interval_s=0.25,
        ),
    )
    with AgentPool.start(config) as pool:
        tasks = [AgentTask(tenant="acme", prompt=f"sim: answer {i}", timeout_s=120) for i in range(60)]
        refs = pool.submit(tasks)
        grown = _until(lambda: pool.status()["workers"]["count"] == 3 and pool.status()["workers"])
        assert len(grown["names"]) == 3
        results = ray.get(refs)
        assert [r.status for r in results] == ["succeeded"] * 60
        assert [r.answer for r in results] == [str(i) for i in range(60)]
        shrunk = _until(lambda: pool.status()["workers"]["count"] == 1 and pool.status()["workers"])
        counts = [n for _, n in shrunk["history"]]
        assert max(counts) == 3 and counts[-1] == 1
        # Never more than one step back down at a time after the peak: no flapping up again.
        peak = counts.index(3)
        assert counts[peak:] == sorted(counts[peak:], reverse=True)
        _until(lambda: len(_workers_alive(config)) == 1)  # the drained ones were killed
        # A task after scaling down still runs.
        (after,) = pool.run([AgentTask(tenant="acme", prompt="sim: answer again")])
        assert after.status == "succeeded"
    assert _workers_alive(config) == []
