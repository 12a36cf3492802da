"""`pool.update_config` on a real pool: a tenant's concurrency cap and a model's rate limit
change while tasks wait on them, and the change outlives the restart of each process that
applies it (the scheduler reads it back from Redis, the limiter is caught up by the
scheduler, a worker by its next dispatch)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
import ray

from agentpool import AgentPool, InvalidConfig, RateLimit, TenantPolicy
from tests.pools import small_config
from tests.toolkit import nap_tasks

pytestmark = pytest.mark.usefixtures("ray_session")


def wait_for(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ray.exceptions.RayError:  # an actor restarting
            pass
        time.sleep(0.1)
    assert check(), "timed out"


def test_a_tenants_cap_changes_live_and_every_process_keeps_the_change(redis_url: str) -> None:
    cfg = small_config(
        redis_url, tag="lc", tool_modules=["tests.toolkit"], tenants={"acme": TenantPolicy(max_concurrency=1)}
    )
    with AgentPool.start(cfg) as pool:
        pool.enqueue(nap_tasks(8, 2.0))
        wait_for(lambda: pool.status()["in_flight"] == 1)
        time.sleep(0.5)
        assert pool.status()["in_flight"] == 1  # the cap holds
        answer = pool.update_config(tenants={"acme": TenantPolicy(max_concurrency=3)})
        assert answer == {
            "version": 1,
            "changed": ["tenants"],
            "limiter": True,
            "workers": {"confirmed": 1, "workers": 1},
        }
        assert pool.config.tenants["acme"].max_concurrency == 3  # the handle's view too
        wait_for(lambda: pool.status()["in_flight"] == 3, 10)
        status = pool.status()
        assert status["config_version"] == 1 and status["limits"]["config_version"] == 1

        with pytest.raises(InvalidConfig, match="num_workers: not changeable"):
            pool.update_config(num_workers=4)
        with pytest.raises(InvalidConfig, match="max_concurrency"):
            pool.update_config(tenants={"acme": {"max_concurrency": 0}})
        assert pool.status()["config_version"] == 1  # nothing changed

        scheduler = ray.get_actor(f"{cfg.name}-scheduler", namespace="agentpool")
        os.kill(ray.get(scheduler.pid.remote()), signal.SIGKILL)
        wait_for(lambda: pool.status()["config_version"] == 1)  # read back from Redis at boot
        limiter = ray.get_actor(f"{cfg.name}-limiter", namespace="agentpool")
        ray.kill(limiter, no_restart=False)
        wait_for(lambda: pool.status()["limits"]["config_version"] == 1, 30)  # the tick caught it up
        # Nothing left to dispatch: the restarted worker hears of the change only from the
        # next dispatch (a task still queued here could reach it first, carrying version 1).
        wait_for(lambda: (s := pool.status())["in_flight"] == 0 and s["queued"] == 0)
        worker = ray.get_actor(cfg.worker_name(0), namespace="agentpool")
        os.kill(ray.get(worker.pid.remote()), signal.SIGKILL)
        wait_for(lambda: ray.get(worker.update_config.remote({}, 0)) == 0)  # restarted as it started
        (after,) = pool.run(nap_tasks(1, 0.1))
        assert after.status == "succeeded"
        assert ray.get(worker.update_config.remote({}, 0)) == 1  # its dispatch carried version 1
        pool.enqueue(nap_tasks(6, 3.0))  # still three at a time, after every restart
        wait_for(lambda: pool.status()["in_flight_by_tenant"].get("acme") == 3, 30)
        time.sleep(0.5)
        assert pool.status()["in_flight_by_tenant"]["acme"] == 3


def test_a_models_rate_limit_raised_live_releases_the_calls_waiting_for_it(redis_url: str) -> None:
    cfg = small_config(redis_url, tag="ll", tool_modules=["tests.toolkit"], limits={"claude": RateLimit(rpm=2)})
    with AgentPool.start(cfg) as pool:
        refs = pool.submit(nap_tasks(3, 0.0))  # two LLM calls each: 6 requests, 2 a minute
        ready, waiting = ray.wait(refs, num_returns=3, timeout=4.0)
        assert len(ready) <= 1 and waiting  # at 2 a minute, the rest would need two more minutes
        pool.update_config(limits={"claude": RateLimit(rpm=6000)})
        results = ray.get(refs, timeout=30)
        assert [r.status for r in results] == ["succeeded"] * 3
        models = pool.status()["limits"]["models"]
        assert models["claude"]["dimensions"]["requests"]["capacity"] == 6000.0
