"""A task's state at any moment (`pool.get`) and its events followed live (`pool.events`)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import ray
import redis

from agentpool import AgentPool, AgentTask, EventType, PoolConfig, SimulatorConfig, TaskPhase
from agentpool.events import EventEntry

pytestmark = pytest.mark.usefixtures("ray_session")


def wait_for(predicate: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pool(redis_url: str) -> Iterator[AgentPool]:
    config = PoolConfig(
        name=f"g{uuid.uuid4().hex[:8]}",
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        tool_modules=["tests.toolkit"],
        simulator=SimulatorConfig(latency_ms=5, latency_sigma=0),
        num_workers=1,
        worker_concurrency=1,
        approval_timeout_s=30.0,
    )
    with AgentPool.start(config) as p:
        yield p


def napping(seconds: float, tenant: str = "acme") -> AgentTask:
    return AgentTask(tenant=tenant, prompt=f'sim: tool nap {{"seconds": {seconds}}}\nsim: answer woke', tools=["nap"])


def test_get_follows_a_task_from_queued_to_running_to_finished(pool: AgentPool) -> None:
    first, second, third = napping(1.5), napping(0.1), napping(0.1)
    refs = pool.submit([first])
    wait_for(lambda: (s := pool.get(first.task_id)) is not None and s.phase == TaskPhase.RUNNING and s.iteration == 1)
    refs += pool.submit([second])
    refs += pool.submit([third])
    wait_for(lambda: pool.status()["queued"] == 2)
    running = pool.get(first.task_id)
    assert running is not None and running.attempt == 1
    assert running.usage.output_tokens > 0 and running.usage.input_tokens > 0  # the first LLM turn's
    behind = [pool.get(t.task_id) for t in (second, third)]
    assert [s.phase if s else None for s in behind] == [TaskPhase.QUEUED, TaskPhase.QUEUED]
    # Each its place in line; in either order: Ray runs an async actor's calls concurrently,
    # so two `submit` calls in a row may reach the scheduler's queue either way round.
    assert sorted(s.place if s else -1 for s in behind) == [0, 1]
    assert all(s is not None and s.predicted_start_unix is not None for s in behind)
    results = ray.get(refs, timeout=30)
    assert [r.status for r in results] == ["succeeded"] * 3
    done = pool.get(first.task_id)
    assert done is not None and done.phase == TaskPhase.FINISHED and done.result == results[0]
    assert pool.get(first.task_id, tenant="acme") == done
    assert pool.get(first.task_id, tenant="other") is None  # another tenant's task is not found
    assert pool.get("no-such-task") is None


def test_get_shows_a_paused_task_and_the_approval_it_waits_for(pool: AgentPool) -> None:
    task = AgentTask(
        tenant="initech",
        prompt='sim: tool wire_money {"amount": 500, "to": "bob", "api_key": "sk-ant-api03-secret"}\nsim: answer paid',
        tools=["wire_money"],
    )
    ref = pool.submit([task])[0]
    wait_for(lambda: (s := pool.get(task.task_id)) is not None and s.phase == TaskPhase.AWAITING_APPROVAL)
    state = pool.get(task.task_id)
    assert state is not None and state.approval is not None and state.approval["tools"] == ["wire_money"]
    assert "sk-ant-api03-secret" not in str(state.approval)  # credentials are redacted
    assert state.iteration == 1
    pool.approve(task.task_id, True)
    assert ray.get(ref, timeout=30).status == "succeeded"


def test_events_follow_a_run_live_and_resume_after_any_entry(pool: AgentPool, redis_client: redis.Redis) -> None:
    task = AgentTask(
        tenant="acme",
        prompt='sim: tool nap {"seconds": 0.5}\nsim: tool nap {"seconds": 0.5}\nsim: answer done',
        tools=["nap"],
    )
    seen: list[EventEntry] = []
    ref = pool.submit([task])[0]
    wait_for(lambda: pool.get(task.task_id) is not None)
    follower = threading.Thread(target=lambda: seen.extend(pool.events(task.task_id)))
    follower.start()  # follows while the task runs, and returns once it has ended
    result = ray.get(ref, timeout=30)
    follower.join(timeout=30)
    assert not follower.is_alive()
    kinds = [e.event for e in seen]
    assert kinds[0] == EventType.TASK_ADMITTED and kinds[-1] == EventType.TASK_END
    assert kinds.count(EventType.TOOL_RESULT) == 2 and kinds.count(EventType.LLM_CALL) == result.iterations == 3
    # The same entries as the tenant's stream has of this task, in order, none repeated.
    tenant_stream = redis_client.xrange(f"{pool.config.key_prefix}:{{acme}}:events")
    mine = [(f["event"], f["ts"]) for _, f in tenant_stream if f["task_id"] == task.task_id]
    assert [(e.event.value, f"{e.ts:.6f}") for e in seen] == mine
    # A reader resumes after any entry id with nothing lost or repeated.
    for cut in range(len(seen)):
        rest = list(pool.events(task.task_id, tenant="acme", after=seen[cut].id))
        assert rest == seen[cut + 1 :]
    assert list(pool.events("no-such-task")) == []


def test_a_streamed_task_sends_its_text_as_it_comes_with_the_same_result(pool: AgentPool) -> None:
    answer = " ".join(f"word{i}" for i in range(300))
    streamed = AgentTask(tenant="acme", prompt=f"sim: answer {answer}", stream=True)
    plain = AgentTask(tenant="acme", prompt=f"sim: answer {answer}")
    first, second = pool.run([streamed, plain])
    assert first.answer == second.answer == answer
    assert first.usage == second.usage  # the same tokens and cost, streamed or not
    deltas = [e for e in pool.events(streamed.task_id, tenant="acme") if e.event == EventType.TEXT_DELTA]
    assert "".join(e.data["text"] for e in deltas) == answer
    assert 5 <= len(deltas) <= len(answer) // 200 + 2  # coalesced from 16-character pieces
    assert not any(e.event == EventType.TEXT_DELTA for e in pool.events(plain.task_id, tenant="acme"))
