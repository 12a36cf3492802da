"""The Redis store against a real redis-server: exactly-once final records, streams, readers."""

from __future__ import annotations

import asyncio
import json

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpool import events
from agentpool.cluster.budgets import BudgetLedger
from agentpool.cluster.connection import LINGER_S, Posting
from agentpool.cluster.keys import Keys
from agentpool.cluster.reader import ResultsReader
from agentpool.cluster.store import ResultStore
from agentpool.models import AgentResult, Usage
from agentpool.vocabulary import TaskStatus


def result(task_id: str, tenant: str = "acme", status: str = "succeeded", answer: str = "a") -> AgentResult:
    return AgentResult(task_id=task_id, tenant=tenant, status=status, answer=answer)  # type: ignore[arg-type]


def test_key_layout_matches_the_contract() -> None:
    k = Keys()
    assert k.result("acme", "t1") == "agentpool:{acme}:result:t1"
    assert k.results("acme") == "agentpool:{acme}:results"
    assert k.events("acme") == "agentpool:{acme}:events"
    assert k.checkpoint("acme", "t1") == "agentpool:{acme}:checkpoint:t1"
    assert k.usage("acme", "2026-11-21") == "agentpool:{acme}:usage:2026-11-21"


async def test_same_task_twice_gives_one_record_and_one_entry(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    store = ResultStore(redis_url, keys=Keys(key_prefix), result_ttl_s=60)
    first, created1 = await store.write_result(result("t1", answer="first"))
    second, created2 = await store.write_result(result("t1", answer="second"))
    assert (created1, created2) == (True, False)
    assert second.answer == "first" == first.answer
    assert redis_client.xlen(Keys(key_prefix).results("acme")) == 1
    assert 0 < redis_client.ttl(Keys(key_prefix).result("acme", "t1")) <= 60
    await store.close()


async def test_an_event_goes_to_its_tenants_stream_and_its_tasks_in_one_command(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    """Each event is one EVAL (`POST_TWICE`), not two XADDs and an EXPIRE: the same entry in
    both streams, in order; the task's stream trimmed to about its own length and given its
    TTL; and a stream without a MAXLEN is not trimmed."""
    keys = Keys(key_prefix)
    store = ResultStore(redis_url, keys=keys, stream_maxlen=100_000, task_events_ttl_s=600, task_events_maxlen=100)
    for i in range(1000):
        store.post("acme", events.LeaseWait(holder=f"run {i}"), task_id="t1", trace_id="x")
    await store.flush()
    tenant = [fields for _, fields in redis_client.xrange(keys.events("acme"))]
    task = [fields for _, fields in redis_client.xrange(keys.task_events("acme", "t1"))]
    assert len(tenant) == 1000 and [json.loads(f["data"])["holder"] for f in tenant[:2]] == ["run 0", "run 1"]
    assert 100 <= len(task) < 1000 and task == tenant[-len(task) :]  # trimmed by whole nodes: about 100
    assert 0 < redis_client.ttl(keys.task_events("acme", "t1")) <= 600
    assert store.events_dropped == 0
    await store.close()
    # Untrimmed (a stream without a MAXLEN): every entry stays.
    untrimmed, other = f"{key_prefix}:{{acme}}:a", f"{key_prefix}:{{acme}}:b"
    pipe = redis_client.pipeline(transaction=False)
    for i in range(300):
        Posting(untrimmed, {"i": str(i)}, None, other, 100, 60).add_to(pipe)
    pipe.execute()
    assert redis_client.xlen(untrimmed) == 300 and redis_client.xlen(other) < 300


async def test_a_record_goes_with_its_events_and_usage_in_one_step(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    """The events queued before a record are in the stream before its own last events, which
    are added only by the write that creates the record; what goes with it (usage) is
    applied with it; many tasks ending at once share round trips and each gets its answer."""
    keys = Keys(key_prefix)
    store = ResultStore(redis_url, keys=keys)
    ledger = BudgetLedger(lambda: store.redis, keys, reservation_ttl_s=60)
    usage = Usage(input_tokens=10, output_tokens=5, cost_usd=0.25)
    store.post("acme", events.LeaseWait(holder="another run"), task_id="t1", trace_id="x")
    end = events.TaskEnd(status=TaskStatus.SUCCEEDED)
    first = await store.write_result(
        result("t1"), events=[end], also=[ledger.settle_write("acme", None, usage, calls=2)]
    )
    again = await store.write_result(result("t1", answer="other"), events=[end])
    assert (first[1], again[1]) == (True, False) and again[0].answer == "a"
    stream = [fields["event"] for _, fields in redis_client.xrange(keys.events("acme"))]
    assert stream == ["lease_wait", "task_end"]
    spent = await ledger.spent("acme")
    assert (spent["input_tokens"], spent["output_tokens"], spent["calls"], spent["cost_usd"]) == (10, 5, 2, 0.25)
    outs = await asyncio.gather(*(store.write_result(result(f"m{i}"), events=[end]) for i in range(200)))
    assert all(created for _, created in outs)
    assert redis_client.xlen(keys.results("acme")) == 201
    assert redis_client.xlen(keys.events("acme")) == 202
    await store.close()


async def test_concurrent_writers_race_to_one_record(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    stores = [ResultStore(redis_url, keys=Keys(key_prefix)) for _ in range(5)]
    outs = await asyncio.gather(*(s.write_result(result("race", answer=str(i))) for i, s in enumerate(stores * 4)))
    assert sum(created for _, created in outs) == 1
    assert len({stored.answer for stored, _ in outs}) == 1
    assert redis_client.xlen(Keys(key_prefix).results("acme")) == 1
    for s in stores:
        await s.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=30),
    tenants=st.lists(st.sampled_from(["acme", "beta"]), min_size=30, max_size=30),
)
def test_writes_are_idempotent_per_task_id(redis_url: str, ids: list[str], tenants: list[str]) -> None:
    import uuid

    keys = Keys(f"h{uuid.uuid4().hex[:8]}")

    async def go() -> None:
        store = ResultStore(redis_url, keys=keys)
        for task_id, tenant in zip(ids, tenants[: len(ids)], strict=True):
            await store.write_result(result(task_id, tenant=tenant))
        await store.close()

    asyncio.run(go())
    client = redis.Redis.from_url(redis_url)
    written = {(t, i) for i, t in zip(ids, tenants[: len(ids)], strict=True)}
    for tenant in ("acme", "beta"):
        # one entry per distinct (tenant, task_id), and never another tenant's task in a stream
        assert client.xlen(keys.results(tenant)) == len({i for t, i in written if t == tenant})
    client.close()


async def test_events_are_structured(redis_url: str, key_prefix: str, redis_client: redis.Redis) -> None:
    store = ResultStore(redis_url, keys=Keys(key_prefix))
    await store.emit("acme", events.OutputInvalid(iteration=1, problem="m"), task_id="t1", trace_id="abc")
    await store.flush()
    ((_, fields),) = redis_client.xrange(Keys(key_prefix).events("acme"))
    assert fields["event"] == "output_invalid" and fields["trace_id"] == "abc" and fields["task_id"] == "t1"
    assert json.loads(fields["data"]) == {"iteration": 1, "problem": "m"}
    await store.close()


async def test_events_leave_in_order_and_wait_while_redis_is_away(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    store = ResultStore(redis_url, keys=Keys(key_prefix))
    for i in range(1200):  # more than one pipeline's worth, emitted in one turn of the loop
        await store.emit("acme", events.LeaseWait(holder=None), task_id=f"t{i}", trace_id="x")
    await store.flush()
    entries = redis_client.xrange(Keys(key_prefix).events("acme"))
    assert [f["task_id"] for _, f in entries] == [f"t{i}" for i in range(1200)]
    await store.close()
    away = ResultStore("redis://127.0.0.1:9/0", keys=Keys(key_prefix))  # nothing listens there
    await away.emit("acme", events.LeaseWait(holder=None), task_id="kept", trace_id="x")
    await away.flush()  # does not raise: the event stays queued for the next flush
    assert away.pending_events == 1 and away.events_dropped == 0
    await away.close()


async def test_reader_pages_through_everything(redis_url: str, key_prefix: str) -> None:
    store = ResultStore(redis_url, keys=Keys(key_prefix))
    for i in range(2500):
        await store.write_result(result(f"t{i}"))
    await store.close()
    reader = ResultsReader(redis_url, "acme", keys=Keys(key_prefix))
    ids = [r.task_id for r in reader.read()]
    assert ids == [f"t{i}" for i in range(2500)]
    assert [r.task_id for r in reader.read(count=3)] == ["t0", "t1", "t2"]
    assert reader.get("t7").task_id == "t7" and reader.get("missing") is None


async def test_follow_is_at_least_once_per_group(redis_url: str, key_prefix: str) -> None:
    store = ResultStore(redis_url, keys=Keys(key_prefix))
    for i in range(5):
        await store.write_result(result(f"t{i}"))
    reader = ResultsReader(redis_url, "acme", keys=Keys(key_prefix))
    stream = reader.follow(group="g", consumer="c1", block_ms=100, idle_timeout_s=0.2)
    got = [next(stream).task_id for _ in range(3)]  # the third is delivered but not yet acked
    stream.close()
    # consumer c1 comes back: its unacknowledged entry is redelivered first, then the rest
    again = [r.task_id for r in reader.follow(group="g", consumer="c1", block_ms=100, idle_timeout_s=0.2)]
    assert got == ["t0", "t1", "t2"] and again == ["t2", "t3", "t4"]
    # a different group sees everything
    other = [r.task_id for r in reader.follow(group="g2", block_ms=100, idle_timeout_s=0.2)]
    assert other == [f"t{i}" for i in range(5)]
    await store.close()


async def test_an_admission_the_store_cannot_make_raises_instead_of_hanging() -> None:
    """A URL redis-py cannot use (not an outage) used to leave the admitting call waiting forever."""
    import pytest

    from agentpool.errors import StoreError
    from agentpool.models import AgentTask

    store = ResultStore("notaurl", keys=Keys("x"))
    task = AgentTask(tenant="acme", prompt="hi")
    with pytest.raises(StoreError, match="admission could not be recorded"):
        await asyncio.wait_for(store.admit(task, "{}"), 5)


async def test_a_workers_events_linger_for_its_record_and_a_schedulers_do_not(
    redis_url: str, key_prefix: str, redis_client: redis.Redis
) -> None:
    """With `linger_events` (a worker's store) an event waits up to `LINGER_S` and goes with a
    write that comes meanwhile, in the same pipeline and before it; without (the scheduler's,
    whose `task_admitted` must reach a task's stream before the worker's events) it leaves
    in the next turn of the loop."""
    keys = Keys(key_prefix)
    stream = keys.events("acme")
    sent: list[int] = []

    class Counted(ResultStore):
        async def _send_queued(self) -> None:
            sent.append(len(self._events))
            await super()._send_queued()

    worker = Counted(redis_url, keys=keys, linger_events=True)
    worker.post("acme", events.LeaseWait(holder=None), task_id="t1", trace_id="x")
    for _ in range(3):
        await asyncio.sleep(0)
    assert sent == [] and redis_client.xlen(stream) == 0, "lingering: nothing sent yet"
    await worker.write_result(result("t1"), events=[events.TaskEnd(status=TaskStatus.SUCCEEDED)])
    assert sent == [1], "the event went with the record, in one pipeline"
    assert [f["event"] for _, f in redis_client.xrange(stream)] == ["lease_wait", "task_end"]
    worker.post("acme", events.LeaseWait(holder=None), task_id="t2", trace_id="x")
    await asyncio.sleep(LINGER_S * 5)
    assert sent == [1, 1] and redis_client.xlen(stream) == 3, "alone, it leaves after LINGER_S"
    await worker.close()

    sent.clear()
    scheduler = Counted(redis_url, keys=keys)
    scheduler.post("acme", events.LeaseWait(holder=None), task_id="t3", trace_id="x")
    for _ in range(3):
        await asyncio.sleep(0)
    assert sent == [1], "not lingering: sent in the next turns of the loop"
    await scheduler.flush()
    assert redis_client.xlen(stream) == 4
    await scheduler.close()
