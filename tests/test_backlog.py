"""The backlog in Redis through the public API: batch work beyond the scheduler's window waits
in Redis, not in the scheduler's memory, is read back in order and by priority, survives a
scheduler killed with it, and can be cancelled where it waits."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import ray
import redis

import agentpool.scheduler.scheduler as scheduler_module
from agentpool import AgentPool, AgentTask
from agentpool.errors import InvalidTaskInput
from tests.pools import small_config

pytestmark = pytest.mark.usefixtures("ray_session")


def _batch(n: int, tenant: str = "acme", *, delay_ms: int = 20, priority: str = "standard") -> list[AgentTask]:
    return [
        AgentTask(tenant=tenant, prompt=f"sim: delay {delay_ms}\nsim: answer {i}", priority=priority)  # type: ignore[arg-type]
        for i in range(n)
    ]


def _backlog_keys(client: redis.Redis, pool: AgentPool) -> list[str]:
    prefix = pool.config.key_prefix
    return [
        *client.scan_iter(f"{prefix}:{{*}}:backlog:*"),
        *(k for k in client.scan_iter(f"{prefix}:{{*}}:admitted:*") if client.hlen(k)),
    ]


def _wait_all(pool: AgentPool, tenant: str, n: int, timeout_s: float = 120) -> dict[str, Any]:
    """The tenant's results once `n` are in Redis (task_id -> record)."""
    reader = pool.results(tenant)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            records = {r.task_id: r for r in reader.read()}
            if len(records) >= n:
                return records
            assert time.monotonic() < deadline, f"{len(records)} of {n} results in time"
            time.sleep(0.2)
    finally:
        reader.close()


def test_a_batch_beyond_the_window_waits_in_redis_not_in_memory(redis_url: str, redis_client: redis.Redis) -> None:
    cfg = small_config(redis_url, tag="bl", worker_concurrency=4, queue_window=40)
    tasks = _batch(600)
    with AgentPool.start(cfg) as pool:
        accepted = pool.enqueue(tasks)
        assert {a["status"] for a in accepted} == {"accepted"}
        peak_memory, peak_redis = 0, 0
        while True:
            status = pool.status()
            peak_memory = max(peak_memory, status["jobs_in_memory"])
            peak_redis = max(peak_redis, status["queued_in_redis"])
            if not status["queued"] and not status["in_flight"]:
                break
            time.sleep(0.05)
        records = _wait_all(pool, "acme", len(tasks))
        # In memory: about the window and the tasks running (4, and those writing their
        # records), whatever the backlog.
        assert peak_memory <= 2 * (cfg.queue_window + 4)
        assert peak_redis > 400
        assert {r.status for r in records.values()} == {"succeeded"}
        assert set(records) == {t.task_id for t in tasks}
        assert not _backlog_keys(redis_client, pool)  # every entry left with its record


def test_submit_beyond_the_window_keeps_its_contract(redis_url: str) -> None:
    cfg = small_config(redis_url, tag="bl", worker_concurrency=8, queue_window=10)
    tasks = _batch(1500, delay_ms=1)
    with AgentPool.start(cfg) as pool:
        refs = pool.submit(tasks)
        peak = 0
        while len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < len(refs):
            peak = max(peak, pool.status()["jobs_in_memory"])
            time.sleep(0.02)
        # The calls wait in the relay but for the client's first few; the scheduler holds
        # those, its window, the tasks running and the chunk (1,000) the relay hands it.
        assert peak <= cfg.submit_direct_calls + 1000 + 2 * (cfg.queue_window + 8)
        results = ray.get(refs, timeout=300)
        assert [r.task_id for r in results] == [t.task_id for t in tasks]
        assert [r.answer for r in results] == [str(i) for i in range(len(tasks))]
        status = pool.status()
        assert status["finished_by_status"] == {"succeeded": len(tasks)}
        assert status["jobs_in_memory"] == 0 and status["queued"] == 0


def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.05)


def test_a_client_keeps_only_a_few_calls_waiting_at_the_scheduler(redis_url: str) -> None:
    """`submit_direct_calls` of a client's calls wait at the scheduler (one hop less); the
    rest wait in the relay, and a direct call that resolved makes room for another."""
    # All ten slow tasks run at once: the first four calls stay unresolved for as long as
    # the checks below take, without the batch running in rounds.
    cfg = small_config(redis_url, tag="bl", worker_concurrency=10, submit_direct_calls=4)
    with AgentPool.start(cfg) as pool:
        relay = ray.get_actor(f"{cfg.name}-relay", namespace="agentpool")
        slow = _batch(10, delay_ms=3000)
        first = pool.submit(slow)
        _until(lambda: ray.get(relay.waiting.remote()) == 6)  # an async actor may run calls out of order
        others = _batch(3, "other", delay_ms=1)
        more = pool.submit(others)  # the 4 direct calls still wait
        _until(lambda: ray.get(relay.waiting.remote()) == 9)
        results = ray.get(first + more, timeout=120)
        assert [r.task_id for r in results] == [t.task_id for t in slow + others]
        assert [r.answer for r in results] == [str(i) for i in range(10)] + ["0", "1", "2"]
        assert ray.get(relay.waiting.remote()) == 0
        again = pool.submit(_batch(4, "third", delay_ms=1))  # room again: all four go direct
        assert ray.get(relay.waiting.remote()) == 0
        assert {r.status for r in ray.get(again, timeout=60)} == {"succeeded"}


def test_records_that_come_before_their_calls_reach_them(redis_url: str) -> None:
    """Through the relay, a chunk's tasks go in one call and each ref is a call naming its
    task: tasks that ran before (submitted again) have their records back from the scheduler
    at once, before most of their calls have come. Each call still gets its record, a task
    given twice in a batch gets it twice, and nothing is left waiting."""
    cfg = small_config(redis_url, tag="bl", worker_concurrency=8, submit_direct_calls=0)
    with AgentPool.start(cfg) as pool:
        relay = ray.get_actor(f"{cfg.name}-relay", namespace="agentpool")
        tasks = _batch(1500, delay_ms=0)  # two chunks
        first = ray.get(pool.submit(tasks), timeout=120)
        assert {r.status for r in first} == {"succeeded"}
        again = ray.get(pool.submit([*tasks, tasks[7]]), timeout=120)
        assert again == [*first, first[7]]
        assert ray.get(relay.waiting.remote()) == 0


def test_later_critical_work_goes_before_a_standard_backlog(redis_url: str) -> None:
    cfg = small_config(redis_url, tag="bl", worker_concurrency=2, queue_window=10)
    with AgentPool.start(cfg) as pool:
        pool.enqueue(_batch(300, delay_ms=30))
        time.sleep(0.5)
        urgent = pool.run(_batch(5, priority="critical"))
        assert {r.status for r in urgent} == {"succeeded"}
        status = pool.status()
        # The critical tasks overtook most of the standard backlog.
        assert status["queued"] > 150, status["queued"]


def test_the_scheduler_killed_with_a_backlog_loses_and_duplicates_nothing(
    redis_url: str, redis_client: redis.Redis
) -> None:
    cfg = small_config(redis_url, tag="bl", worker_concurrency=4, queue_window=20)
    tasks = _batch(400, delay_ms=10)
    with AgentPool.start(cfg) as pool:
        pool.enqueue(tasks)
        while pool.status()["finished_by_status"].get("succeeded", 0) < 50:
            time.sleep(0.05)
        assert pool.status()["queued_in_redis"] > 100
        scheduler = ray.get_actor(f"{cfg.name}-scheduler", namespace="agentpool")
        os.kill(ray.get(scheduler.pid.remote()), signal.SIGKILL)
        records = _wait_all(pool, "acme", len(tasks))
        assert {r.status for r in records.values()} == {"succeeded"}
        entries = redis_client.xrange(f"{cfg.key_prefix}:{{acme}}:results")
        ids = [fields["task_id"] for _, fields in entries]
        assert sorted(ids) == sorted(t.task_id for t in tasks)  # one record each
        assert pool.status()["durability"]["recovered"] > 100
        assert not _backlog_keys(redis_client, pool)


class SlowReads(scheduler_module.Scheduler.__ray_actor_class__):  # type: ignore[misc,name-defined]
    """The real scheduler, whose reads of the backlog reach it 0.3 s after Redis answered
    them (a slow network, a loaded host): tasks read while in memory end meanwhile."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pull = self._store.pull

        async def slow_pull(reads: Any) -> Any:
            answer = await pull(reads)
            await asyncio.sleep(0.3)
            return answer

        self._store.pull = slow_pull


def test_a_task_that_ends_while_a_read_of_the_backlog_is_in_flight_is_not_taken_again(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A read returns the tasks in memory too (it skips them); one that ends before the
    answer arrives must not be taken again. It once was: it ran twice, was counted as read
    from Redis, and as many tasks as were taken twice stayed in Redis, never run."""
    real = scheduler_module.Scheduler
    scheduler_module.Scheduler = ray.remote(SlowReads)
    try:
        pool = AgentPool.start(small_config(redis_url, tag="bl", worker_concurrency=8, queue_window=20))
    finally:
        scheduler_module.Scheduler = real
    tasks = _batch(300, delay_ms=1)
    try:
        pool.enqueue(tasks)
        records = _wait_all(pool, "acme", len(tasks), timeout_s=60)
        assert set(records) == {t.task_id for t in tasks}
        _until(lambda: not pool.status()["in_flight"])
        status = pool.status()
        assert status["finished_by_status"] == {"succeeded": len(tasks)}  # each ran once
        assert status["queued_in_redis"] == 0 and status["queued"] == 0
        assert not _backlog_keys(redis_client, pool)
    finally:
        pool.shutdown()


def test_cancel_a_task_waiting_in_redis(redis_url: str, redis_client: redis.Redis) -> None:
    cfg = small_config(redis_url, tag="bl", worker_concurrency=1, queue_window=5)
    with AgentPool.start(cfg) as pool:
        detached = _batch(50, delay_ms=50)
        pool.enqueue(detached)
        waiting = [AgentTask(tenant="acme", prompt="sim: answer late")]
        ref = pool.submit(waiting)[0]
        time.sleep(0.3)
        assert pool.status()["queued_in_redis"] > 30
        last = detached[-1]
        cancelled = pool.cancel(last.task_id, reason="no longer needed")
        assert cancelled is not None and cancelled.status == "cancelled"
        assert cancelled.error is not None and cancelled.error.message == "no longer needed"
        assert pool.cancel(waiting[0].task_id).status == "cancelled"  # type: ignore[union-attr]
        assert ray.get(ref, timeout=30).status == "cancelled"
        records = _wait_all(pool, "acme", len(detached) + 1)
        assert records[last.task_id].status == "cancelled" and records[last.task_id].attempts == 0
        assert sum(r.status == "succeeded" for r in records.values()) == len(detached) - 1
        assert pool.status()["queued"] == 0
        assert not _backlog_keys(redis_client, pool)


def test_map_streams_results_with_a_bounded_window(redis_url: str) -> None:
    cfg = small_config(redis_url, tag="bl", worker_concurrency=8, queue_window=20)
    n = 400
    submitted: list[str] = []

    def source() -> Any:  # lazily made: map must not read ahead of its window
        for task in _batch(n, "acme", delay_ms=5) + _batch(n, "beta", delay_ms=5):
            submitted.append(task.task_id)
            yield task

    with AgentPool.start(cfg) as pool:
        seen: dict[str, str] = {}
        for result in pool.map(source(), window=50, chunk=20):
            assert result.task_id not in seen
            seen[result.task_id] = result.status
            assert len(submitted) - len(seen) <= 50  # never more than the window outstanding
        assert set(seen) == set(submitted) and len(seen) == 2 * n
        assert set(seen.values()) == {"succeeded"}
        # A task that already has its record is yielded from it, and a bad one raises at its chunk.
        again = [AgentTask(task_id=submitted[0], tenant="acme", prompt="sim: answer other")]
        assert [r.answer for r in pool.map(again)] == ["0"]
        bad = [{"tenant": "acme", "prompt": "ok"}, {"tenant": "bad tenant!", "prompt": "x"}]
        with pytest.raises(InvalidTaskInput):
            list(pool.map(bad))


def test_the_relay_killed_mid_batch_loses_and_duplicates_nothing(redis_url: str, redis_client: redis.Redis) -> None:
    cfg = small_config(redis_url, tag="bl", worker_concurrency=4, queue_window=20)
    tasks = _batch(300, delay_ms=10)
    with AgentPool.start(cfg) as pool:
        refs = pool.submit(tasks)
        ready, _ = ray.wait(refs, num_returns=30, timeout=60)
        assert len(ready) == 30
        relay = ray.get_actor(f"{cfg.name}-relay", namespace="agentpool")
        os.kill(ray.get(relay.pid.remote()), signal.SIGKILL)
        results = ray.get(refs, timeout=120)  # Ray sends the calls again to the restarted relay
        assert [r.task_id for r in results] == [t.task_id for t in tasks]
        assert {r.status for r in results} == {"succeeded"}
        entries = redis_client.xrange(f"{cfg.key_prefix}:{{acme}}:results")
        assert sorted(f["task_id"] for _, f in entries) == sorted(t.task_id for t in tasks)
