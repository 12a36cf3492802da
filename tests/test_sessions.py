"""Sessions on a real pool: turns kept across tasks, one run at a time per session under each
`on_busy` strategy, a worker killed mid-turn, compaction the Messages API accepts, and a
deletion that leaves nothing of the session in Redis."""

from __future__ import annotations

import itertools
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import ray
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpool import AgentPool, AgentTask, EventType, OnBusy, PoolConfig, SessionPolicy, SimulatorConfig, TenantPolicy
from agentpool.conversation import SUMMARY_HEADER, history_problem
from tests.toolkit import tally_count

pytestmark = pytest.mark.usefixtures("ray_session")


def wait_for(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pool(redis_url: str) -> Iterator[AgentPool]:
    compacting = SessionPolicy(compact_above_tokens=300, keep_recent_tokens=60, compaction_model="claude-haiku-4-5")
    config = PoolConfig(
        name=f"s{uuid.uuid4().hex[:8]}",
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        tool_modules=["tests.toolkit"],
        simulator=SimulatorConfig(latency_ms=2, latency_sigma=0),
        num_workers=2,
        worker_concurrency=8,
        run_lease_s=5,  # a killed worker's turn resumes once its lease lapses
        tenants={
            "brief": TenantPolicy(sessions=compacting),
            "tiny": TenantPolicy(sessions=SessionPolicy(max_messages=2, compact_above_tokens=None)),
        },
    )
    with AgentPool.start(config) as p:
        yield p


def sid() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


def texts(messages: list[dict[str, Any]]) -> list[str]:
    """Each message as one line: its role and its text, tool uses and results."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append(f"{m['role']}: {content}")
            continue
        parts = [b.get("text") or b.get("name") or str(b.get("content")) for b in content]
        out.append(f"{m['role']}: {' | '.join(str(p) for p in parts)}")
    return out


def nap_prompt(label: str, seconds: float) -> str:
    return f'sim: tool nap {{"seconds": {seconds}}}\nsim: answer {label} done'


def llm_calls(pool: AgentPool, task_id: str, tenant: str = "acme") -> int:
    return sum(1 for e in pool.events(task_id, tenant=tenant, follow=False) if e.event == EventType.LLM_CALL)


def test_a_session_keeps_its_turns_and_the_history_prefix_is_read_from_the_cache(pool: AgentPool) -> None:
    session = sid()
    turns = ["sim: answer Hello Ada", "sim: answer You are Ada", "sim: answer Still Ada"]
    results = [pool.run([AgentTask(tenant="acme", prompt=p, session_id=session)])[0] for p in turns]
    assert [r.status for r in results] == ["succeeded"] * 3
    assert [r.session_id for r in results] == [session] * 3
    exported = pool.sessions.export("acme", session)
    assert exported is not None and exported["version"] == 3 and exported["turns"] == 3
    assert texts(exported["messages"]) == [
        "user: sim: answer Hello Ada",
        "assistant: Hello Ada",
        "user: sim: answer You are Ada",
        "assistant: You are Ada",
        "user: sim: answer Still Ada",
        "assistant: Still Ada",
    ]
    assert exported["tasks"] == [r.task_id for r in results]
    assert history_problem(exported["messages"]) is None
    # The second task wrote the history's prefix to the provider's cache; the third read it.
    assert results[1].usage.cache_creation_input_tokens > 0
    assert results[2].usage.cache_read_input_tokens >= results[1].usage.cache_creation_input_tokens
    assert pool.sessions.list("acme")[0]["session_id"] == session


def test_a_session_over_its_limits_fails_and_keeps_its_history(pool: AgentPool) -> None:
    session = sid()
    first = pool.run([AgentTask(tenant="tiny", prompt="sim: answer one", session_id=session)])[0]
    second = pool.run([AgentTask(tenant="tiny", prompt="sim: answer two", session_id=session)])[0]
    assert first.status == "succeeded" and second.status == "failed" and second.error is not None
    assert second.error.type == "SessionFull" and second.error.reason == "session_full"
    assert "2 messages" in second.error.message and second.session_id == session
    exported = pool.sessions.export("tiny", session)
    assert exported is not None and exported["turns"] == 1 and exported["tasks"] == [first.task_id, second.task_id]


def test_a_caller_brings_its_own_history(pool: AgentPool) -> None:
    history = [
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "calculator", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}]},
        {"role": "assistant", "content": "It is 42."},
    ]
    with_history = pool.run([AgentTask(tenant="acme", prompt="And doubled?", messages=history)])[0]
    alone = pool.run([AgentTask(tenant="acme", prompt="And doubled?")])[0]
    assert with_history.status == alone.status == "succeeded"
    # The history was sent, and its end marked for the prompt cache.
    assert with_history.usage.cache_creation_input_tokens > 0 == alone.usage.cache_creation_input_tokens
    assert with_history.usage.total_tokens > alone.usage.total_tokens
    assert with_history.session_id is None


def test_reject_refuses_while_the_session_runs(pool: AgentPool) -> None:
    session = sid()
    first = AgentTask(tenant="acme", prompt=nap_prompt("first", 1.5), tools=["nap"], session_id=session)
    ref = pool.submit([first])[0]
    wait_for(lambda: (s := pool.get(first.task_id, tenant="acme")) is not None and s.phase == "running")
    busy = pool.run([AgentTask(tenant="acme", prompt="sim: answer no", session_id=session, on_busy="reject")])[0]
    assert busy.status == "rejected" and busy.error is not None
    assert busy.error.reason == "session_busy" and busy.error.type == "SessionBusy"
    assert busy.retry_after_s is not None and busy.retry_after_s > 0
    assert ray.get(ref).status == "succeeded"
    exported = pool.sessions.export("acme", session)
    assert exported is not None and exported["turns"] == 1  # the rejected task added nothing
    assert busy.task_id in exported["tasks"]  # but it is the session's (a deletion takes it)


def test_enqueue_runs_the_session_tasks_one_at_a_time_in_order(pool: AgentPool) -> None:
    session = sid()
    tasks = [
        AgentTask(tenant="acme", prompt=nap_prompt(f"t{i}", 0.3), tools=["nap"], session_id=session) for i in range(4)
    ]
    refs = pool.submit(tasks)
    waiting = tasks[2].task_id
    wait_for(lambda: (s := pool.get(waiting, tenant="acme")) is not None and s.place is not None)
    results = ray.get(refs)
    assert [r.status for r in results] == ["succeeded"] * 4
    # One at a time: each made its first call after the one before it ended.
    spans = []
    for task in tasks:
        entries = list(pool.events(task.task_id, tenant="acme", follow=False))
        first = min(e.ts for e in entries if e.event == EventType.LLM_CALL)
        spans.append((first, max(e.ts for e in entries if e.event == EventType.TASK_END)))
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))
    assert all(r.timings.queued_ms >= 250 for r in results[1:]), [r.timings for r in results]  # the wait counts
    exported = pool.sessions.export("acme", session)
    assert exported is not None and exported["turns"] == 4
    answers = [line for line in texts(exported["messages"]) if line.startswith("assistant: t")]
    assert answers == [f"assistant: t{i} done" for i in range(4)]
    assert history_problem(exported["messages"]) is None
    waited = [e for e in pool.events(tasks[1].task_id, tenant="acme", follow=False) if e.event == "session_wait"]
    assert waited and waited[0].data["behind"] == tasks[0].task_id


@pytest.mark.parametrize("strategy", [OnBusy.INTERRUPT, OnBusy.ROLLBACK])
def test_interrupt_and_rollback_stop_the_running_task(pool: AgentPool, strategy: OnBusy) -> None:
    session = sid()
    pool.run([AgentTask(tenant="acme", prompt="sim: answer before", session_id=session)])
    label = uuid.uuid4().hex[:8]
    running = AgentTask(
        tenant="acme",
        prompt=f'sim: tool tally {{"label": "{label}"}}\nsim: tool nap {{"seconds": 5}}\nsim: answer never',
        tools=["tally", "nap"],
        session_id=session,
    )
    ref = pool.submit([running])[0]
    wait_for(lambda: tally_count(label) == 1 and llm_calls(pool, running.task_id) == 2)  # napping now
    started = time.monotonic()
    newer = pool.run([AgentTask(tenant="acme", prompt="sim: answer newer", session_id=session, on_busy=strategy)])[0]
    assert newer.status == "succeeded" and time.monotonic() - started < 4  # it did not wait out the nap
    stopped = ray.get(ref)
    assert stopped.status == "cancelled" and stopped.error is not None and stopped.error.reason == "interrupted"
    time.sleep(0.3)
    assert llm_calls(pool, running.task_id) == 2  # no LLM call after the interruption
    exported = pool.sessions.export("acme", session)
    assert exported is not None and history_problem(exported["messages"]) is None
    lines = texts(exported["messages"])
    if strategy == OnBusy.INTERRUPT:  # its prompt and the tool round that completed stay
        assert lines[:2] == ["user: sim: answer before", "assistant: before"]
        assert lines[2].startswith("user: sim: tool tally") and lines[3] == "assistant: tally"
        assert lines[4].startswith("user: ") and lines[5:] == ["user: sim: answer newer", "assistant: newer"]
    else:  # its turn is gone
        assert lines == ["user: sim: answer before", "assistant: before", "user: sim: answer newer", "assistant: newer"]


def test_a_worker_killed_mid_turn_stores_the_turn_once(pool: AgentPool, redis_client: redis.Redis) -> None:
    session = sid()
    pool.run([AgentTask(tenant="acme", prompt="sim: answer one", session_id=session)])
    label = uuid.uuid4().hex[:8]
    task = AgentTask(
        tenant="acme",
        prompt=f'sim: tool tally {{"label": "{label}"}}\nsim: tool nap {{"seconds": 2}}\nsim: answer two',
        tools=["tally", "nap"],
        session_id=session,
    )
    ref = pool.submit([task])[0]
    wait_for(lambda: tally_count(label) == 1 and llm_calls(pool, task.task_id) == 2)
    wait_for(lambda: redis_client.exists(f"{pool.config.key_prefix}:{{acme}}:checkpoint:{task.task_id}"))
    running = pool.get(task.task_id, tenant="acme")
    assert running is not None and running.phase == "running"
    for i in range(pool.config.num_workers):
        worker = ray.get_actor(pool.config.worker_name(i), namespace="agentpool")
        if ray.get(worker.ping.remote()) > 0:
            os.kill(ray.get(worker.pid.remote()), signal.SIGKILL)
    result = ray.get(ref, timeout=90)
    assert result.status == "succeeded" and result.resumes == 1 and result.answer == "two"
    assert tally_count(label) == 1
    exported = pool.sessions.export("acme", session)
    assert exported is not None and exported["turns"] == 2 and history_problem(exported["messages"]) is None
    lines = texts(exported["messages"])
    assert lines[:2] == ["user: sim: answer one", "assistant: one"] and lines[-1] == "assistant: two"
    assert len(lines) == 2 + 6  # prompt, tally round, nap round, answer: once
    wait_for(lambda: pool.status()["workers"]["restarting"] == 0, timeout_s=60)


def test_compaction_summarises_older_turns_into_a_history_the_api_accepts(pool: AgentPool) -> None:
    session = sid()
    words = " ".join(f"fact{i}" for i in range(60))
    for i in range(4):
        prompt = f'sim: tool calculator {{"expression": "{i}+1"}}\nsim: answer noted {i} {words}'
        result = pool.run([AgentTask(tenant="brief", prompt=prompt, tools=["calculator"], session_id=session)])[0]
        assert result.status == "succeeded", result.error
    exported = pool.sessions.export("brief", session)
    assert exported is not None and exported["compactions"] >= 1
    first = exported["messages"][0]["content"][0]["text"]
    assert first.startswith(SUMMARY_HEADER)
    assert history_problem(exported["messages"]) is None
    compactions = [
        e
        for t in exported["tasks"]
        for e in pool.events(t, tenant="brief", follow=False)
        if e.event == EventType.SESSION_COMPACTED
    ]
    assert compactions and compactions[0].data["tokens_after"] < compactions[0].data["tokens_before"]
    assert compactions[0].data["model"] == "claude-haiku-4-5" and compactions[0].data["cost_usd"] > 0
    # The summary's cost is the task's.
    task_id = compactions[0].task_id
    record = pool.get(task_id, tenant="brief")
    assert record is not None and record.result is not None
    llm_cost = sum(
        e.data["cost_usd"] for e in pool.events(task_id, tenant="brief", follow=False) if e.event == EventType.LLM_CALL
    )
    assert record.result.usage.cost_usd == pytest.approx(llm_cost + compactions[0].data["cost_usd"])
    # The summaries are in the cost report too, under their model (haiku; the turns ran on sonnet).
    summaries = sum(e.data["cost_usd"] for e in compactions)
    deadline = time.monotonic() + 10
    while (report := pool.cost(days=1, tenant="brief"))["by_model"].get("claude-haiku-4-5", {}).get("spend_usd", 0) < (
        summaries - 1e-9
    ):
        assert time.monotonic() < deadline, report["by_model"]
        time.sleep(0.05)
    assert report["by_model"]["claude-haiku-4-5"]["spend_usd"] == pytest.approx(summaries)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.sampled_from([OnBusy.ENQUEUE, OnBusy.REJECT, OnBusy.INTERRUPT, OnBusy.ROLLBACK]), min_size=3, max_size=6
    )
)
def test_concurrent_tasks_of_a_session_never_interleave(pool: AgentPool, strategies: list[OnBusy]) -> None:
    session = sid()
    tasks = [
        AgentTask(
            tenant="acme",
            prompt=f'sim: tool nap {{"seconds": 0.2}}\nsim: answer turn{i}',
            tools=["nap"],
            session_id=session,
            on_busy=s,
        )
        for i, s in enumerate(strategies)
    ]
    results = ray.get(pool.submit(tasks))
    exported = pool.sessions.export("acme", session)
    assert exported is not None and history_problem(exported["messages"]) is None
    lines = texts(exported["messages"])
    # Each stored turn is whole and in one piece: its prompt, its nap round, its answer.
    succeeded = [int(line.removeprefix("assistant: turn")) for line in lines if line.startswith("assistant: turn")]
    assert sorted(succeeded) == sorted(i for i, r in enumerate(results) if r.status == "succeeded")
    for i in succeeded:
        at = lines.index(f"assistant: turn{i}")
        assert lines[at - 3] == f'user: sim: tool nap {{"seconds": 0.2}}\nsim: answer turn{i}'
    # Enqueued tasks that succeeded ran in the order they came.
    enqueued = [i for i in succeeded if strategies[i] == OnBusy.ENQUEUE]
    assert enqueued == sorted(enqueued)
    # A turn is stored per success, and per task an `interrupt` cut short (its complete part).
    interrupted = sum(1 for r in results if r.error is not None and r.error.reason == "interrupted")
    assert len(succeeded) <= exported["turns"] <= len(succeeded) + interrupted
    assert exported["version"] == exported["turns"]


def test_deleting_a_session_leaves_nothing_of_it_in_redis(pool: AgentPool, redis_client: redis.Redis) -> None:
    session = sid()
    marker = f"zebra{uuid.uuid4().hex[:8]}"
    label = uuid.uuid4().hex[:8]
    done = [
        pool.run([AgentTask(tenant="acme", prompt=f"sim: answer {marker} one", session_id=session)])[0],
        pool.run(
            [
                AgentTask(
                    tenant="acme",
                    prompt=f'sim: tool tally {{"label": "{label}"}}\nsim: answer {marker} two',
                    tools=["tally"],
                    session_id=session,
                )
            ]
        )[0],
    ]
    running = AgentTask(tenant="acme", prompt=nap_prompt(marker, 10), tools=["nap"], session_id=session)
    waiting = AgentTask(tenant="acme", prompt=f"sim: answer {marker} three", session_id=session)
    refs = pool.submit([running, waiting])
    wait_for(lambda: (s := pool.get(running.task_id, tenant="acme")) is not None and s.phase == "running")
    other = pool.run([AgentTask(tenant="acme", prompt="sim: answer keep me", session_id=sid())])[0]
    report = pool.sessions.delete("acme", session)
    assert [r.status for r in ray.get(refs)] == ["cancelled", "cancelled"]
    assert report["tasks"] == 4 and report["cancelled"] == 2 and report["messages_deleted"] == 6
    assert report["keys_deleted"] > 0 and report["stream_entries_deleted"] > 0
    ids = {session, *(r.task_id for r in done), running.task_id, waiting.task_id}
    prefix = pool.config.key_prefix
    for key in redis_client.scan_iter(match=f"{prefix}:*", count=1000):
        assert not any(i in key for i in ids), key
        kind = redis_client.type(key)
        if kind == "stream":
            for _, fields in redis_client.xrange(key):
                assert fields.get("task_id") not in ids and marker not in str(fields), key
        elif kind == "string":
            assert marker not in (redis_client.get(key) or ""), key
        elif kind == "hash":
            assert marker not in str(redis_client.hgetall(key)), key
        elif kind in ("zset", "set", "list"):
            members = (
                redis_client.zrange(key, 0, -1)
                if kind == "zset"
                else redis_client.smembers(key)
                if kind == "set"
                else redis_client.lrange(key, 0, -1)
            )
            assert not ids & set(members), key
    assert pool.sessions.export("acme", session) is None
    assert pool.get(other.task_id, tenant="acme") is not None  # another session keeps its own
    assert pool.sessions.delete_all("acme")["sessions"] >= 1
    assert pool.sessions.list("acme") == []
