"""Draining a pool before a stop or an upgrade (`pool.drain`, `undrain`, `shutdown(grace_s)`,
`agentpool drain`) on a real pool and a real Redis: new work is refused with a reason and a
retry hint, nothing queued starts, running tasks get the grace period, and whatever is left
is finished by the next pool of the same name on the same Redis, once each. SIGTERM on a
supervised pool is in `test_chaos_cluster.py` (it needs a Ray cluster of its own)."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter

import pytest
import ray
import redis
from typer.testing import CliRunner

from agentpool import AgentPool, AgentTask, DrainReport, ErrorReason, PoolConfig
from agentpool.cli import app
from tests.pools import small_config
from tests.toolkit import nap_tasks

pytestmark = pytest.mark.usefixtures("ray_session")


def config(redis_url: str, **overrides: object) -> PoolConfig:
    # A run cut short holds its lease until it lapses: a short one, so that the next pool
    # resumes it sooner (the default is 15 s).
    base: dict[str, object] = {"tool_modules": ["tests.toolkit"], "worker_concurrency": 4, "run_lease_s": 5}
    return small_config(redis_url, tag="dr", **{**base, **overrides})


def records(client: redis.Redis, pool_config: PoolConfig, tenant: str = "acme") -> Counter[str]:
    """Final records per task_id in the tenant's results stream."""
    stream = f"{pool_config.key_prefix}:{{{tenant}}}:results"
    return Counter(fields["task_id"] for _, fields in client.xrange(stream))


def started(pool: AgentPool, task_id: str) -> bool:
    """Whether the task's first LLM turn is done (so a checkpoint of it is in Redis)."""
    state = pool.get(task_id, tenant="acme")
    return state is not None and state.iteration >= 1


def wait_for(check: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.05)
    assert check(), "timed out"  # type: ignore[operator]


def test_a_drained_pool_refuses_new_work_and_the_next_pool_finishes_what_it_left(
    redis_url: str, redis_client: redis.Redis
) -> None:
    cfg = config(redis_url)
    long, short, queued = nap_tasks(2, 6.0), nap_tasks(2, 0.3), nap_tasks(6, 0.2)
    pool = AgentPool.start(cfg)
    try:
        pool.enqueue(long + short)
        wait_for(lambda: pool.status()["in_flight"] == 4)
        wait_for(lambda: all(started(pool, t.task_id) for t in long))  # napping, past a checkpoint
        # The checkpoint is written beside the nap's start: in Redis too before the stop.
        kept = [f"{cfg.key_prefix}:{{acme}}:checkpoint:{t.task_id}" for t in long]
        wait_for(lambda: all(redis_client.exists(key) for key in kept))
        pool.enqueue(queued)  # no slot free: they wait
        report = pool.drain(grace_s=2.5)
        assert isinstance(report, DrainReport)
        assert not report.drained and report.grace_s == 2.5 and 2.4 <= report.elapsed_s < 10, report
        assert report.finished == 2, report  # the short ones ended in the grace period
        assert report.running == sorted(t.task_id for t in long), report
        assert report.queued == 6 and report.paused == 0 and report.refused == 0, report
        status = pool.status()
        assert status["draining"]["grace_left_s"] == 0.0 and status["draining"]["for_s"] >= 2.5
        assert status["in_flight"] == 2 and status["queued"] == 6, status
        # New work, whichever way it comes: refused at once, with a reason and a hint.
        (late,) = pool.run([AgentTask(tenant="acme", prompt="hello", deadline_s=30)])
        assert late.status == "rejected" and late.error is not None
        assert (late.error.type, late.error.reason, late.error.retryable) == ("Draining", ErrorReason.DRAINING, True)
        assert late.retry_after_s is not None and 0 < late.retry_after_s <= 10.0
        (batch,) = pool.run(nap_tasks(1, 0.1))  # its caller waits: refused too
        assert batch.status == "rejected" and batch.error is not None and batch.error.reason is ErrorReason.DRAINING
        # Batch work handed over without waiting (enqueue) waits in the Redis backlog instead.
        detached = nap_tasks(1, 0.1)
        answers = pool.enqueue([*detached, AgentTask(tenant="acme", prompt="hello", priority="sheddable")])
        assert [a["status"] for a in answers] == ["accepted", "rejected"]
        queued += detached
        again = pool.drain(grace_s=0.0)  # a second call reports again, at once
        assert again.refused == 3 and again.queued == 7 and again.running == report.running, again
        time.sleep(0.5)
        assert pool.status()["queued"] == 7  # nothing queued started
    finally:
        left = pool.shutdown()
    assert left is None  # drained by hand: the stop itself had no grace period
    done = records(redis_client, cfg)
    assert all(done[t.task_id] == 1 for t in short)
    assert not any(t.task_id in done for t in long + queued)  # left for the next pool
    with AgentPool.start(cfg) as successor:
        wait_for(lambda: all(records(redis_client, cfg)[t.task_id] for t in long + queued), 90)
        results = {r.task_id: r for r in successor.results("acme").read()}
    done = records(redis_client, cfg)
    assert all(done[t.task_id] == 1 for t in long + short + queued), done
    assert {results[t.task_id].status for t in long + short + queued} == {"succeeded"}
    resumed = [results[t.task_id] for t in long]  # from their checkpoints
    seen = [r.model_dump(include={"resumes", "attempts", "iterations", "checkpoint_discarded"}) for r in resumed]
    assert [r.resumes for r in resumed] == [1, 1], seen


def test_a_draining_pool_refuses_every_task_of_a_submit_at_once(redis_url: str) -> None:
    """Batch work handed over without a ref waits in Redis for the next pool; a `submit`'s
    tasks have refs: those that wait in the relay are refused at once, as are the few that
    go straight to the scheduler, not left in the backlog with their callers waiting."""
    with AgentPool.start(config(redis_url, submit_direct_calls=4)) as pool:
        assert pool.drain(grace_s=1.0).drained
        results = ray.get(pool.submit(nap_tasks(40, 0.01)), timeout=60)
        assert {(r.status, r.error.reason if r.error else None) for r in results} == {("rejected", "draining")}
        assert all(r.retry_after_s for r in results)
        assert pool.status()["queued"] == 0


def test_undrain_takes_work_again_and_starts_what_waited(redis_url: str) -> None:
    with AgentPool.start(config(redis_url, worker_concurrency=1)) as pool:
        first = pool.submit(nap_tasks(1, 1.0))
        wait_for(lambda: pool.status()["in_flight"] == 1)
        waiting = pool.submit(nap_tasks(3, 0.1))
        wait_for(lambda: pool.status()["queued"] == 3)  # accepted before the drain
        report = pool.drain(grace_s=5.0)
        assert report.drained and report.finished == 1 and report.running == [] and report.queued == 3
        assert ray.get(first)[0].status == "succeeded"
        ready, _ = ray.wait(waiting, num_returns=3, timeout=1.0)
        assert ready == []  # nothing starts while draining
        assert pool.undrain() is True and pool.undrain() is False
        assert pool.status()["draining"] is None
        assert [r.status for r in ray.get(waiting, timeout=60)] == ["succeeded"] * 3
        (after,) = pool.run(nap_tasks(1, 0.1))
        assert after.status == "succeeded"


def test_shutdown_with_a_grace_period_lets_running_tasks_end(
    redis_url: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(redis_url)
    pool = AgentPool.start(cfg)
    tasks = nap_tasks(3, 1.0)
    pool.enqueue(tasks)
    wait_for(lambda: pool.status()["in_flight"] == 3)
    with caplog.at_level(logging.WARNING, logger="agentpool"):
        report = pool.shutdown(grace_s=30.0)
    assert report is not None and report.drained and report.finished == 3 and report.elapsed_s < 30
    assert "lost" not in caplog.text  # its Redis is its own: nothing would be lost anyway
    assert all(records(redis_client, cfg)[t.task_id] == 1 for t in tasks)
    with pytest.raises(ValueError, match="grace_s"):
        AgentPool.drain(pool, -1.0)  # type: ignore[arg-type]


def test_work_left_in_an_embedded_redis_is_said_to_be_lost(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config("redis://unused").model_copy(update={"redis_url": None})
    pool = AgentPool.start(cfg)
    pool.enqueue(nap_tasks(2, 30.0))
    wait_for(lambda: pool.status()["in_flight"] == 2)
    with caplog.at_level(logging.WARNING, logger="agentpool"):
        report = pool.shutdown(grace_s=0.5)
    assert report is not None and len(report.running) == 2
    assert "2 running task(s) are left in its embedded Redis" in caplog.text and "AGENTPOOL_REDIS_URL" in caplog.text


def test_agentpool_drain_prints_the_report_and_undo_takes_work_again(redis_url: str) -> None:
    cfg = config(redis_url)
    with AgentPool.start(cfg, detached=True) as pool:
        pool.enqueue(nap_tasks(1, 20.0))
        wait_for(lambda: pool.status()["in_flight"] == 1)
        runner = CliRunner()
        drained = runner.invoke(app, ["drain", "--grace", "0.5", "--name", cfg.name])
        assert drained.exit_code == 0, drained.output
        assert "grace period (0.5s) over" in drained.output and "1 still running" in drained.output
        assert "0 queued (kept in the Redis backlog)" in drained.output
        undone = runner.invoke(app, ["drain", "--undo", "--name", cfg.name])
        assert undone.exit_code == 0 and "takes work again" in undone.output
        bad = runner.invoke(app, ["drain", "--grace", "-1", "--name", cfg.name])
        assert bad.exit_code == 2  # a usage error, before any call
        pool.terminate()


def test_agentpool_stop_stops_every_actor_and_the_name_can_start_again_at_once(redis_url: str) -> None:
    """`stop` finds the pool's actors by the names its scheduler was given; the webhook
    deliverers start after it and were once missing from that list (they outlived `stop`)."""
    cfg = config(redis_url)

    def left() -> list[str]:
        named = ray.util.list_named_actors(all_namespaces=True)
        return sorted(a["name"] for a in named if a["name"].startswith(f"{cfg.name}-"))

    pool = AgentPool.start(cfg, detached=True)
    assert f"{cfg.name}-webhooks-0" in left()
    stopped = CliRunner().invoke(app, ["stop", "--name", cfg.name])
    assert stopped.exit_code == 0, stopped.output
    wait_for(lambda: not left())
    with AgentPool.start(cfg, detached=True) as again:  # the same name, at once
        assert again.run([AgentTask(tenant="acme", prompt="sim: answer back")])[0].answer == "back"
    pool.shutdown()  # the first handle: nothing left to stop


def test_a_scheduler_restarted_while_draining_goes_on_draining(redis_url: str) -> None:
    """The drain is noted in Redis with this start of the pool: a scheduler Ray restarts
    reads it back at boot; undrain clears it; a pool started again under the name does
    not inherit it."""
    cfg = config(redis_url)

    def restart_scheduler(pool: AgentPool) -> None:
        scheduler = ray.get_actor(f"{cfg.name}-scheduler", namespace="agentpool")
        before = ray.get(scheduler.pid.remote())
        os.kill(before, signal.SIGKILL)

        def answers() -> bool:  # from a new process (Ray restarts it; on a loaded machine, slowly)
            try:
                return bool(ray.get(scheduler.pid.remote(), timeout=5) != before)
            except ray.exceptions.RayError:
                return False

        wait_for(answers)

    with AgentPool.start(cfg) as pool:
        pool.drain(grace_s=0.5)
        restart_scheduler(pool)
        assert pool.status()["draining"] is not None
        (refused,) = pool.run([AgentTask(tenant="acme", prompt="sim: answer no")])
        assert refused.status == "rejected" and refused.error is not None
        assert refused.error.reason == ErrorReason.DRAINING
        assert pool.undrain()
        restart_scheduler(pool)
        assert pool.status()["draining"] is None
        assert pool.run([AgentTask(tenant="acme", prompt="sim: answer yes")])[0].answer == "yes"
        pool.drain(grace_s=0.5)
    with AgentPool.start(cfg) as again:  # the same name on the same Redis, started anew
        assert again.status()["draining"] is None
        assert again.run([AgentTask(tenant="acme", prompt="sim: answer anew")])[0].answer == "anew"
