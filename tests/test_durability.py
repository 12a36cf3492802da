"""Durable execution through the public API, with real kills (SIGKILL) of real processes:
a worker, the scheduler, a tool executor; plus cancellation and approval gates."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
import ray
import redis

from agentpool import AgentPool, AgentResult, AgentTask, PoolConfig, SimulatorConfig
from agentpool.cluster.keys import Keys
from agentpool.cluster.redis_server import EmbeddedRedis
from agentpool.cluster.store import ResultStore
from agentpool.protocol import Dispatch, new_trace_id, pack, traceparent, unpack_outcomes
from agentpool.vocabulary import TaskStatus
from tests.toolkit import nap_tasks, tally_count

pytestmark = pytest.mark.usefixtures("ray_session")


def config(redis_url: str, **overrides: object) -> PoolConfig:
    base: dict[str, object] = {
        "name": f"d{uuid.uuid4().hex[:8]}",
        "key_prefix": f"t{uuid.uuid4().hex[:8]}",
        "redis_url": redis_url,
        "tool_modules": ["tests.toolkit"],
        "simulator": SimulatorConfig(latency_ms=5, latency_sigma=0),
        "num_workers": 2,
        "worker_concurrency": 16,
        "approval_timeout_s": 3.0,
        # A run killed with its worker holds its lease until it lapses: a short one, so that
        # the resumes these tests wait for come sooner (the default is 15 s).
        "run_lease_s": 5,
    }
    return PoolConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def pool(redis_url: str) -> Iterator[AgentPool]:
    p = AgentPool.start(config(redis_url))
    yield p
    p.shutdown()


def final_records(client: redis.Redis, pool: AgentPool, tenant: str) -> dict[str, int]:
    """Stream entries per task_id in the tenant's results stream."""
    counts: dict[str, int] = {}
    for _, fields in client.xrange(f"{pool.config.key_prefix}:{{{tenant}}}:results"):
        counts[fields["task_id"]] = counts.get(fields["task_id"], 0) + 1
    return counts


def wait_for(predicate: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def pid_of(actor: ray.actor.ActorHandle) -> int | None:
    """The actor's process id, or None while it is restarting."""
    try:
        return int(ray.get(actor.ping.remote(), timeout=10)["pid"])
    except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError, ray.exceptions.GetTimeoutError):
        return None


def tools_in_flight(pool: AgentPool) -> int:
    """Tool calls running in the pool's default executors."""
    names = [f"{pool.config.name}-tools-default-{i}" for i in range(pool.config.executor_group("default").executors)]
    return sum(ray.get(ray.get_actor(n, namespace="agentpool").ping.remote())["in_flight"] for n in names)


def stepped(label: str, nap_s: float) -> str:
    """Four turns: count, nap, count, answer."""
    return (
        f'sim: tool tally {{"label": "{label}-1"}}\n'
        f'sim: tool nap {{"seconds": {nap_s}}}\n'
        f'sim: tool tally {{"label": "{label}-2"}}\n'
        f"sim: answer done {label}"
    )


def test_a_worker_killed_mid_task_resumes_on_another_from_its_checkpoint(
    pool: AgentPool, redis_client: redis.Redis
) -> None:
    label = uuid.uuid4().hex[:10]
    task = AgentTask(tenant="acme", prompt=stepped(label, 3.0), tools=["tally", "nap"])
    ref = pool.submit([task])[0]
    # Killed once the first tool turn is checkpointed and the nap of the second is running.
    wait_for(lambda: tally_count(f"{label}-1") == 1)
    checkpoint = f"{pool.config.key_prefix}:{{acme}}:checkpoint:{task.task_id}"

    def turns_saved() -> int:  # the checkpoint is written beside the tool's start, not before it
        raw = redis_client.get(checkpoint)
        return sum(m["role"] == "assistant" for m in json.loads(raw)["messages"]) if raw else 0

    wait_for(lambda: turns_saved() >= 2)
    wait_for(lambda: tools_in_flight(pool) > 0)
    worker = ray.get_actor(pool.config.worker_name(0), namespace="agentpool")
    os.kill(ray.get(worker.pid.remote()), signal.SIGKILL)
    result = ray.get(ref, timeout=60)
    assert result.status == "succeeded", result.error
    assert result.answer == f"done {label}"
    assert result.resumes == 1 and result.llm_calls_saved == 2  # two turns were not sent again
    assert result.attempts == 2
    assert tally_count(f"{label}-1") == 1  # the completed tool call did not run again
    assert tally_count(f"{label}-2") == 1
    assert final_records(redis_client, pool, "acme")[task.task_id] == 1
    keys = redis_client.keys(f"{pool.config.key_prefix}:{{acme}}:checkpoint:*")
    assert not keys  # the checkpoint went with the final record
    wait_for(lambda: pool.status()["workers"]["restarting"] == 0)


def test_the_scheduler_killed_mid_batch_loses_and_duplicates_nothing(
    pool: AgentPool, redis_client: redis.Redis
) -> None:
    tasks = nap_tasks(60, 0.4, "acme")
    refs = pool.submit(tasks)
    ready, _ = ray.wait(refs, num_returns=10, timeout=30)
    assert len(ready) == 10
    scheduler = ray.get_actor(f"{pool.config.name}-scheduler", namespace="agentpool")
    os.kill(ray.get(scheduler.pid.remote()), signal.SIGKILL)
    results = ray.get(refs, timeout=120)
    assert [r.task_id for r in results] == [t.task_id for t in tasks]
    assert all(r.status == "succeeded" for r in results), {r.status for r in results}
    counts = final_records(redis_client, pool, "acme")
    assert all(counts[t.task_id] == 1 for t in tasks)
    admitted = redis_client.hlen(f"{pool.config.key_prefix}:{{acme}}:admitted:{pool.config.name}")
    assert admitted == 0  # every admission ended with its record


def test_cancel_a_queued_and_a_running_task(redis_url: str, redis_client: redis.Redis) -> None:
    with AgentPool.start(config(redis_url, num_workers=1, worker_concurrency=1)) as pool:
        running = AgentTask(tenant="acme", prompt='sim: tool nap {"seconds": 20}\nsim: answer late', tools=["nap"])
        queued = AgentTask(tenant="acme", prompt="sim: answer never")
        events = f"{pool.config.key_prefix}:{{acme}}:events"
        refs = pool.submit([running])
        wait_for(lambda: any(f["event"] == "tool_call" for _, f in redis_client.xrange(events)))  # it naps now
        # Submitted apart: two calls sent together may be admitted in either order (each
        # admission is a Redis round trip of its own), and the short one would run first.
        refs += pool.submit([queued])
        wait_for(lambda: pool.status()["queued"] == 1)
        first = pool.cancel(queued.task_id)
        assert first is not None and first.status == "cancelled"
        second = pool.cancel(running.task_id)
        assert second is not None and second.status == "cancelled"
        assert second.iterations == 1 and second.usage.output_tokens > 0  # the work done so far
        assert [r.status for r in ray.get(refs, timeout=30)] == ["cancelled", "cancelled"]
        status = pool.status()
        assert status["in_flight"] == 0 and status["queued"] == 0  # slots given back
        again = pool.cancel(running.task_id)  # nothing in progress any more: how it ended
        assert again is not None and again.status == "cancelled" and again.task_id == running.task_id
        assert final_records(redis_client, pool, "acme") == {running.task_id: 1, queued.task_id: 1}


def test_approval_gates_approve_deny_and_expire(pool: AgentPool, redis_client: redis.Redis) -> None:
    def paying(answer: str) -> AgentTask:
        prompt = f'sim: tool wire_money {{"amount": 500, "to": "bob"}}\nsim: answer {answer}'
        return AgentTask(tenant="initech", prompt=prompt, tools=["wire_money"])

    approved, denied, ignored = paying("paid"), paying("not paid"), paying("never")
    refs = pool.submit([approved, denied, ignored])
    wait_for(lambda: len(pool.status()["awaiting_approval"].get("initech", [])) == 3)
    assert pool.status()["in_flight"] == 0  # paused tasks hold no worker slot
    pending = {p["task_id"]: p for p in pool.pending_approvals("initech")}
    assert set(pending) == {approved.task_id, denied.task_id, ignored.task_id}
    assert pending[approved.task_id]["tools"] == ["wire_money"]
    assert pending[approved.task_id]["arguments"] == [{"amount": 500, "to": "bob"}]
    assert pool.approve(approved.task_id, True)["status"] == "decided"
    assert pool.approve(denied.task_id, False, note="not this week")["status"] == "decided"
    ok, no, expired = ray.get(refs, timeout=30)
    assert ok.status == "succeeded" and ok.tool_calls[0].ok and ok.answer == "paid"
    assert no.status == "succeeded" and no.tool_calls[0].error_kind == "denied"
    assert expired.status == "timed_out" and expired.error is not None
    assert expired.error.type == "ApprovalTimeout"
    assert pool.pending_approvals("initech") == []
    assert pool.approve(ok.task_id, True)["status"] == "not_awaiting_approval"
    events = [f["event"] for _, f in redis_client.xrange(f"{pool.config.key_prefix}:{{initech}}:events")]
    assert events.count("approval_requested") == 3 and events.count("approval_decided") == 2


def _tallying() -> tuple[str, AgentTask]:
    """A task whose first answer asks for a `tally` (of a label of its own), then answers `mine`."""
    label = f"fresh-{uuid.uuid4().hex[:8]}"
    prompt = f'sim: tool tally {{"label": "{label}"}}\nsim: answer mine'
    return label, AgentTask(tenant="fresh", prompt=prompt, tools=["tally"])


def _fresh(task: AgentTask) -> Dispatch:
    """A dispatch as a scheduler sends a task it has just accepted (`fresh`)."""
    return Dispatch(task=task, trace_id="0" * 32, traceparent="", admitted_at_unix=time.time(), fresh=True)


def test_a_fresh_dispatch_acts_on_nothing_before_its_begin_and_yields_to_a_run_it_finds(
    pool: AgentPool, redis_client: redis.Redis
) -> None:
    """A fresh task's first LLM call goes out while its begin is in flight; when the begin
    finds another run holding the task, the answer is set aside: its tool never runs, and
    the dispatch returns the other run's record once that run writes it."""
    label, task = _tallying()
    keys = Keys(pool.config.key_prefix)
    redis_client.set(keys.lease(task.tenant, task.task_id), "another-run", px=60_000)
    worker = ray.get_actor(pool.config.worker_name(0), namespace="agentpool")
    ref = worker.run.remote(pack(_fresh(task)))
    ready, _ = ray.wait([ref], timeout=1.5)
    assert not ready and tally_count(label) == 0  # waiting for the other run; its tool call not made

    theirs = AgentResult(task_id=task.task_id, tenant=task.tenant, status=TaskStatus.SUCCEEDED, answer="theirs")
    asyncio.run(ResultStore.for_pool(pool.redis_url, pool.config).write_result(theirs))
    ((_, result),) = unpack_outcomes(ray.get(ref, timeout=30))
    assert (result.answer, tally_count(label)) == ("theirs", 0)
    assert final_records(redis_client, pool, task.tenant)[task.task_id] == 1


@pytest.mark.parametrize("found", ["record", "cancel"])
def test_a_fresh_dispatch_whose_begin_finds_a_record_or_a_cancel_request_follows_it(
    pool: AgentPool, redis_client: redis.Redis, found: str
) -> None:
    label, task = _tallying()
    if found == "record":
        before = AgentResult(task_id=task.task_id, tenant=task.tenant, status=TaskStatus.FAILED)
        asyncio.run(ResultStore.for_pool(pool.redis_url, pool.config).write_result(before))
    else:
        redis_client.set(Keys(pool.config.key_prefix).cancel(task.tenant, task.task_id), "stop", ex=60)
    worker = ray.get_actor(pool.config.worker_name(0), namespace="agentpool")
    ((_, result),) = unpack_outcomes(ray.get(worker.run.remote(pack(_fresh(task))), timeout=30))
    expected = TaskStatus.FAILED if found == "record" else TaskStatus.CANCELLED
    assert (result.status, tally_count(label)) == (expected, 0)
    assert final_records(redis_client, pool, task.tenant)[task.task_id] == 1


def test_a_fresh_dispatch_runs_its_task_once_holding_the_lease(pool: AgentPool, redis_client: redis.Redis) -> None:
    label, task = _tallying()
    worker = ray.get_actor(pool.config.worker_name(0), namespace="agentpool")
    ((_, result),) = unpack_outcomes(ray.get(worker.run.remote(pack(_fresh(task))), timeout=30))
    assert (result.status, result.answer, tally_count(label)) == (TaskStatus.SUCCEEDED, "mine", 1), result
    assert redis_client.exists(Keys(pool.config.key_prefix).lease(task.tenant, task.task_id)) == 0


# Last in the module: the workers keep away from a crashed executor for a while after.
def test_a_tool_executor_killed_mid_batch_costs_no_task(pool: AgentPool, redis_client: redis.Redis) -> None:
    tasks = nap_tasks(20, 0.5, "globex")
    refs = pool.submit(tasks)
    executor = ray.get_actor(f"{pool.config.name}-tools-default-0", namespace="agentpool")
    wait_for(lambda: ray.get(executor.ping.remote())["in_flight"] > 0)  # killed with naps inside it
    killed = ray.get(executor.ping.remote())["pid"]
    os.kill(killed, signal.SIGKILL)
    results = ray.get(refs, timeout=60)
    assert all(r.status == "succeeded" for r in results)  # a failed nap is only a tool error
    counts = final_records(redis_client, pool, "globex")
    assert all(counts[t.task_id] == 1 for t in tasks)
    wait_for(lambda: pid_of(executor) not in (None, killed), timeout_s=60)  # the executor came back


def test_a_redis_restart_mid_batch_loses_and_duplicates_nothing() -> None:
    with EmbeddedRedis() as server, AgentPool.start(config(server.url)) as pool:
        tasks = nap_tasks(40, 0.3, "acme")
        refs = pool.submit(tasks)
        ready, _ = ray.wait(refs, num_returns=5, timeout=30)
        assert len(ready) == 5
        server.restart(down_s=1.5)  # results finishing meanwhile wait in the processes' outboxes
        results = ray.get(refs, timeout=60)  # ray.get is served all along
        assert all(r.status == "succeeded" for r in results), {r.status for r in results}
        client = redis.Redis.from_url(server.url, decode_responses=True)
        wait_for(lambda: len(final_records(client, pool, "acme")) == len(tasks))  # the outboxes drained
        assert set(final_records(client, pool, "acme").values()) == {1}
        stored = pool.results("acme")
        assert {r.task_id for r in stored.read()} == {t.task_id for t in tasks}
        backlog = pool.status()["durability"]
        assert backlog["pending_writes"] == 0 and backlog["writes_dropped"] == 0
        client.close()


def test_messages_of_the_release_before_get_answers_as_that_release_reads_them(pool: AgentPool) -> None:
    """During an upgrade, a scheduler of the release before sends its workers `Dispatch`
    objects (the workers restart first), and clients started before it send the scheduler
    `AgentTask` objects: both are taken, and answered with objects, not packed bytes."""

    def task(answer: str) -> AgentTask:
        return AgentTask(tenant="t", prompt=f"sim: answer {answer}")

    worker = ray.get_actor(pool.config.worker_name(0), namespace="agentpool")
    result = ray.get(worker.run.remote(_fresh(task("one"))), timeout=30)
    assert isinstance(result, AgentResult) and (result.status, result.answer) == (TaskStatus.SUCCEEDED, "one")
    batch = [_fresh(task("a")), _fresh(task("b"))]
    streamed = [ray.get(ref) for ref in worker.run_batch.options(num_returns="streaming").remote(batch)]
    outcomes = dict(pair for part in streamed for pair in part)
    assert {i: o.answer for i, o in outcomes.items()} == {0: "a", 1: "b"}
    other = task("old client")
    answered = ray.get(pool._scheduler.run.remote(other, traceparent(new_trace_id())), timeout=30)
    assert (answered.task_id, answered.status, answered.answer) == (other.task_id, TaskStatus.SUCCEEDED, "old client")
