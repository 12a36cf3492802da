"""The tool-executor pool with misbehaving tools beside healthy ones: real executors, the real
tool board, real Redis, and agent tasks through the public API."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import redis
import redis.asyncio as aioredis
from typer.testing import CliRunner

from agentpool import AgentPool, AgentTask, BreakerConfig, ExecutorGroupConfig, PoolConfig, SimulatorConfig
from agentpool.actors.tool_calls import ToolCalls
from agentpool.cli import app
from agentpool.cluster.keys import Keys
from agentpool.cluster.tool_records import ToolRecords
from agentpool.launch import actor_env, base_niceness
from agentpool.protocol import ToolCall

pytestmark = pytest.mark.usefixtures("ray_session")

CHAOS = ["hang_sync", "hang_async", "crash_process", "chaos_echo", "flaky", "append_line", "append_line_once"]
CHAOS += ["count_runs", "one_at_a_time", "spin", "segfault"]


@pytest.fixture(scope="module")
def pool(redis_url: str) -> Iterator[AgentPool]:
    config = PoolConfig(
        name=f"p{uuid.uuid4().hex[:8]}",
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        tool_modules=["agentpool.chaos_tools"],
        simulator=SimulatorConfig(latency_ms=2, latency_sigma=0),
        num_workers=2,
        worker_concurrency=16,
        executor_groups={"chaos": ExecutorGroupConfig(executors=2, concurrency=8, max_stuck_threads=2)},
        breaker=BreakerConfig(window_size=10, minimum_calls=10, open_wait_s=60),
        bulkhead_wait_s=0.2,
    )
    with AgentPool.start(config) as p:
        yield p


def _task(prompt: str, **kw: Any) -> AgentTask:
    return AgentTask(tenant="acme", prompt=prompt, tools=["calculator", *CHAOS], **kw)


def _executors(pool: AgentPool, group: str, n: int) -> list[Any]:
    return [ray.get_actor(f"{pool.config.name}-tools-{group}-{i}", namespace="agentpool") for i in range(n)]


def _niceness_of_threads(actor: Any) -> set[int]:
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread niceness is read from /proc")
def test_tools_run_at_their_groups_niceness_and_the_control_plane_at_zero(pool: AgentPool) -> None:
    """On a local Ray this package started, the pool's processes start without a runtime
    env (they start twice as fast) and the executors lower their own priority, every thread."""
    assert base_niceness() == 0 and actor_env(0) == {} and actor_env(19) == {}
    assert _niceness_of_threads(_executors(pool, "chaos", 1)[0]) == {19}
    assert _niceness_of_threads(_executors(pool, "default", 1)[0]) == {19}
    scheduler = ray.get_actor(f"{pool.config.name}-scheduler", namespace="agentpool")
    assert _niceness_of_threads(scheduler) == {0}


def test_hanging_tools_cost_only_their_timeout(pool: AgentPool) -> None:
    started = time.monotonic()
    sync_hang, async_hang, healthy = pool.run(
        [
            _task('sim: tool hang_sync {"seconds": 600}\nsim: answer gave up', timeout_s=20),
            _task('sim: tool hang_async {"seconds": 600}\nsim: answer gave up', timeout_s=20),
            _task('sim: tool calculator {"expression": "6*7"}\nsim: answer 42'),
        ]
    )
    assert time.monotonic() - started < 5
    for result in (sync_hang, async_hang):
        assert result.status == "succeeded" and result.answer == "gave up"
        (call,) = result.tool_calls
        assert call.error_kind == "timeout" and call.duration_ms < 1500
    assert healthy.status == "succeeded" and healthy.tool_calls[0].error_kind is None


def test_a_task_timeout_holds_while_its_tool_hangs(pool: AgentPool) -> None:
    (result,) = pool.run([_task('sim: tool hang_sync {"seconds": 600}', timeout_s=0.3)])
    assert result.status == "timed_out" and result.timings.run_ms < 1300


def test_process_isolated_tools_are_killed_at_their_timeout_and_crash_alone(pool: AgentPool) -> None:
    executors = _executors(pool, "chaos", 2)
    before = ray.get([e.ping.remote() for e in executors])
    spin, segv, healthy = pool.run(
        [
            _task('sim: tool spin {"seconds": 600}\nsim: answer stopped', timeout_s=20),
            _task("sim: tool segfault {}\nsim: answer survived", timeout_s=20),
            _task('sim: tool chaos_echo {"text": "hi"}\nsim: answer fine'),
        ]
    )
    assert spin.status == "succeeded" and spin.answer == "stopped"
    assert spin.tool_calls[0].error_kind == "timeout" and spin.tool_calls[0].duration_ms < 1500
    assert segv.status == "succeeded" and segv.answer == "survived"
    assert segv.tool_calls[0].error_kind == "crashed"
    assert healthy.status == "succeeded" and healthy.tool_calls[0].error_kind is None
    after = ray.get([e.ping.remote() for e in executors])
    # The same executor processes: the spinning child was killed rather than left with a
    # thread, and the segfault took only its own child.
    assert [p["pid"] for p in after] == [p["pid"] for p in before]
    assert all(p["sandbox_pid"] is not None for p in after)
    assert sum(p["sandbox_killed"] for p in after) >= 1


def test_an_executor_full_of_stuck_threads_is_replaced_without_losing_calls(pool: AgentPool) -> None:
    executors = _executors(pool, "chaos", 2)
    pids_before = {p["pid"] for p in ray.get([e.ping.remote() for e in executors])}
    hangs = [_task('sim: tool hang_sync {"seconds": 600}\nsim: answer ok', timeout_s=20) for _ in range(6)]
    echoes = [_task(f'sim: tool chaos_echo {{"text": "e{i}", "delay_s": 0.3}}\nsim: answer ok') for i in range(6)]
    results = pool.run(hangs + echoes)
    assert all(r.status == "succeeded" for r in results)
    assert {r.tool_calls[0].error_kind for r in results[:6]} == {"timeout"}, [r.tool_calls[0] for r in results[:6]]
    assert [r.tool_calls[0].error_kind for r in results[6:]] == [None] * 6
    deadline = time.monotonic() + 30
    pids: set[int] = set()
    while time.monotonic() < deadline:  # a process restart is real time, not state to fake
        try:
            pids = {p["pid"] for p in ray.get([e.ping.remote() for e in executors], timeout=5)}
        except ray.exceptions.RayError:
            continue
        if not pids & pids_before:
            break
        time.sleep(0.2)
    assert pids and not pids & pids_before  # both executors were replaced by new processes
    (after,) = pool.run([_task('sim: tool chaos_echo {"text": "after"}\nsim: answer ok')])
    assert after.tool_calls[0].error_kind is None


def test_a_tool_that_kills_its_process_costs_only_that_call(pool: AgentPool) -> None:
    results = pool.run(
        [
            _task("sim: tool crash_process {}\nsim: answer survived"),
            *(_task(f'sim: tool chaos_echo {{"text": "n{i}", "delay_s": 0.5}}\nsim: answer ok') for i in range(4)),
            _task('sim: tool calculator {"expression": "2+2"}\nsim: answer 4'),
        ]
    )
    crashed, *others = results
    assert crashed.status == "succeeded" and crashed.answer == "survived"
    assert crashed.tool_calls[0].error_kind == "crashed"
    # Idempotent calls caught in the same process got one more try elsewhere.
    assert [r.tool_calls[0].error_kind for r in others] == [None] * 5


def test_transient_failures_of_an_idempotent_tool_are_retried(pool: AgentPool) -> None:
    key = uuid.uuid4().hex
    (result,) = pool.run([_task(f'sim: tool flaky {{"key": "{key}", "failures": 2}}\nsim: answer ok')])
    call = result.tool_calls[0]
    assert call.error_kind is None


def test_a_failing_tool_opens_its_breaker_for_every_worker(pool: AgentPool, redis_url: str) -> None:
    prompt = 'sim: tool flaky {{"key": "{k}", "failures": 100}}\nsim: answer ok'
    first = pool.run([_task(prompt.format(k=uuid.uuid4().hex)) for _ in range(10)])
    assert [r.tool_calls[0].error_kind for r in first] == ["error"] * 10
    started = time.monotonic()
    later = pool.run([_task(prompt.format(k=uuid.uuid4().hex)) for _ in range(4)])
    assert [r.tool_calls[0].error_kind for r in later] == ["breaker_open"] * 4
    assert time.monotonic() - started < 3  # refused at once, on both workers
    status = pool.status()["tools"]
    assert status["tools"]["flaky"]["breaker"]["state"] == "open"
    outcomes = status["tools"]["flaky"]["outcomes"]
    assert outcomes["error"] == 10 and outcomes["breaker_open"] == 4
    events = redis.Redis.from_url(redis_url, decode_responses=True).xrange(Keys(pool.config.key_prefix).events("acme"))
    opened = [f for _, f in events if f["event"] == "breaker_state" and '"tool":"flaky"' in f["data"]]
    assert len(opened) == 1 and '"to":"open"' in opened[0]["data"]
    table = CliRunner().invoke(app, ["status", "--name", pool.config.name])
    assert table.exit_code == 0, table.output
    (row,) = [line for line in table.output.splitlines() if "flaky" in line]
    assert "open" in row and "breaker_open 4" in row


# --- the worker's call path, driven directly: re-runs of the same call --------------------


async def _tool_calls(pool: AgentPool, client: aioredis.Redis) -> ToolCalls:
    """A worker's tool-call path, here in the test process, against the pool's real actors."""
    default = _executors(pool, "default", 1)
    return ToolCalls(
        catalog=await default[0].catalog.remote(),
        groups={"default": default, "chaos": _executors(pool, "chaos", 2)},
        board=ray.get_actor(f"{pool.config.name}-tools", namespace="agentpool"),
        records=ToolRecords(lambda: client, Keys(pool.config.key_prefix)),
        bulkhead_wait_s=pool.config.bulkhead_wait_s,
    )


@pytest.fixture
async def calls(pool: AgentPool) -> AsyncIterator[tuple[ToolCalls, aioredis.Redis, Keys]]:
    client = aioredis.Redis.from_url(pool.redis_url, decode_responses=True)
    yield await _tool_calls(pool, client), client, Keys(pool.config.key_prefix)
    await client.aclose()


async def _no_events(event: str, **fields: Any) -> None:
    return None


def _call(name: str, args: dict[str, Any], task_id: str | None = None) -> ToolCall:
    return ToolCall(
        task_id=task_id or uuid.uuid4().hex,
        tenant="acme",
        tool_use_id=f"toolu_{uuid.uuid4().hex}",
        name=name,
        arguments=args,
    )


async def test_a_rerun_never_repeats_a_side_effect(
    calls: tuple[ToolCalls, aioredis.Redis, Keys], tmp_path: Path
) -> None:
    tool_calls, client, keys = calls
    allowed = set(CHAOS)
    effects = tmp_path / "effects.txt"
    call = _call("append_line", {"path": str(effects), "line": "pay 10"})
    first = await tool_calls.run(call, allowed, _no_events)
    again = await tool_calls.run(call, allowed, _no_events)  # the task ran again, same tool_use_id
    assert first.content == again.content == "appended" and again.source == "record"
    assert effects.read_text().splitlines() == ["pay 10"]
    # An earlier run started the call and died before recording its outcome.
    lost = _call("append_line", {"path": str(effects), "line": "pay 20"})
    await client.set(keys.tool_call("acme", lost.task_id, lost.tool_use_id), "started")
    unknown = await tool_calls.run(lost, allowed, _no_events)
    assert unknown.error_kind == "outcome_unknown" and effects.read_text().splitlines() == ["pay 10"]
    # A tool that takes an idempotency key runs again with the same key and dedupes itself.
    keyed = _call("append_line_once", {"path": str(effects), "line": "pay 30"})
    await client.set(keys.tool_call("acme", keyed.task_id, keyed.tool_use_id), "started")
    assert (await tool_calls.run(keyed, allowed, _no_events)).content == "appended"
    retry = _call("append_line_once", {"path": str(effects), "line": "pay 30"})
    retry = retry.model_copy(update={"task_id": keyed.task_id, "tool_use_id": keyed.tool_use_id})
    await client.delete(keys.tool_call("acme", keyed.task_id, keyed.tool_use_id))
    assert (await tool_calls.run(retry, allowed, _no_events)).content == "already appended"
    assert effects.read_text().splitlines() == ["pay 10", f"{keyed.idempotency_key} pay 30"]


async def test_cacheable_results_come_from_redis(calls: tuple[ToolCalls, aioredis.Redis, Keys], tmp_path: Path) -> None:
    tool_calls, _, _ = calls
    runs = tmp_path / "runs.txt"
    first = await tool_calls.run(_call("count_runs", {"path": str(runs)}), set(CHAOS), _no_events)
    second = await tool_calls.run(_call("count_runs", {"path": str(runs)}), set(CHAOS), _no_events)
    assert first.content == second.content == "1" and second.source == "cache"
    assert runs.read_text().splitlines() == ["run"]


async def test_a_full_bulkhead_refuses_at_once(calls: tuple[ToolCalls, aioredis.Redis, Keys]) -> None:
    tool_calls, _, _ = calls
    # Round robin over the group's two executors: the first and third call meet in one.
    outcomes = await asyncio.gather(
        *(tool_calls.run(_call("one_at_a_time", {"delay_s": 1.0}), set(CHAOS), _no_events) for _ in range(3))
    )
    kinds = sorted(str(o.error_kind) for o in outcomes)
    assert kinds == ["None", "None", "bulkhead_full"]
    refused = next(o for o in outcomes if o.error_kind == "bulkhead_full")
    assert refused.duration_ms < 900


async def test_without_redis_side_effects_are_refused_and_idempotent_tools_still_run(
    pool: AgentPool, tmp_path: Path
) -> None:
    dead = aioredis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)  # nothing listens there
    tool_calls = await _tool_calls(pool, dead)
    effects = tmp_path / "effects.txt"
    refused = await tool_calls.run(_call("append_line", {"path": str(effects), "line": "x"}), set(CHAOS), _no_events)
    assert refused.error_kind == "unavailable" and not effects.exists()
    counted = await tool_calls.run(_call("count_runs", {"path": str(tmp_path / "runs")}), set(CHAOS), _no_events)
    assert counted.error_kind is None and counted.content == "1"
    await dead.aclose()
