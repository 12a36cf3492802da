"""The relay: where the calls of `AgentPool.submit` wait, so the scheduler holds none.

`submit` returns one ref per task, each resolving when its task ends. Each ref is a pending
`run` call, which costs Ray about 54 KB in the process it waits in: in the scheduler, a
100,000-task batch would hold 5 GB there. The relay holds them instead, for a few hundred
bytes of its own per task (a future and an entry in its `CompletionBook`).

The tasks themselves come apart from the calls that wait for them: `submit` sends them a
chunk per call (`accept`, up to `CHUNK`), and each task's `run` call carries only its id
and tenant, so that what a waiting call keeps (its arguments among it) is small and each
task is deserialized once, in a list. `accept` hands its chunk to the scheduler as one
detached submission (`Scheduler.enqueue(..., reply=True)`), one chunk in flight at a time,
and returns once the scheduler has it (in Redis). Each `run` call returns when the scheduler
sends the task's record back (`deliver`, the records ending in one turn of the scheduler's
loop in one call). A record that comes before its task's `run` call (a rejection at
admission, answered while the chunk's calls are still on their way) is kept for
`_EARLY_KEEP_S`. The scheduler keeps only its queue's window in memory; the rest of the
batch waits in the Redis backlog.

A record the relay did not get (the scheduler died between writing it and sending it, or
the relay was restarting) is found in Redis: the relay looks up the records of the tasks it
waits for, a page at a time, so each is looked up about every `_SWEEP_ROUND_S` seconds.
If the relay dies, Ray restarts it and sends the calls again: an `accept` that had not
returned (its chunk perhaps not in Redis yet) comes again with its tasks, and a task
submitted again is the same task (its id is the idempotency key); a `run` call comes again
and finds its record in Redis once the task has ended. While Redis is away, records still
come back (the scheduler sends them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, cast

import ray
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentpool import heap
from agentpool.background import withdraw_calls
from agentpool.cluster.clients import async_client
from agentpool.cluster.completions import PAGE, CompletionBook
from agentpool.cluster.keys import Keys
from agentpool.models import AgentResult, AgentTask, ErrorInfo, agent_fields
from agentpool.vocabulary import TaskStatus

log = logging.getLogger("agentpool.relay")

#: Retry delays while the scheduler or Redis is away: first, longest; and when to give up.
_RETRY_FIRST_S, _RETRY_MAX_S, _GIVE_UP_S = 0.1, 2.0, 300.0
#: The tasks a client sends per `accept`, and the relay hands to the scheduler per call.
CHUNK = 1000
#: How long a record that came before any call waits for it is kept (after that, a call
#: that comes finds it in Redis).
_EARLY_KEEP_S = 60.0
#: The sweep looks every awaited record up about this often, a page at least every second.
_SWEEP_ROUND_S = 30.0


def _failed(task: AgentTask, why: str) -> AgentResult:
    return AgentResult(
        task_id=task.task_id,
        **agent_fields(task),
        tenant=task.tenant,
        status=TaskStatus.FAILED,
        error=ErrorInfo(type="RelayError", message=why[:4000], retryable=True),
    )


@ray.remote
class Relay:
    """Named async actor; one per pool (`<pool>-relay`)."""

    def __init__(self, scheduler_name: str, namespace: str, redis_url: str, key_prefix: str) -> None:
        self._scheduler_name = scheduler_name
        self._scheduler: Any = None
        self._namespace = namespace
        self._url = redis_url
        self._redis: aioredis.Redis | None = None
        self._book = CompletionBook(Keys(key_prefix))
        #: The calls waiting for each task's record (more than one: submitted again).
        self._waiters: dict[str, list[asyncio.Future[AgentResult]]] = {}
        #: Records that came before any call for them: task_id -> (when, record), oldest first.
        self._early: dict[str, tuple[float, AgentResult]] = {}
        #: One chunk at a time goes to the scheduler, so that it admits at most a chunk at once.
        self._sending = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None
        self._callers: set[asyncio.Task[Any]] = set()
        heap.settle()

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = async_client(self._url, decode_responses=True, health_check_interval=30)
        return self._redis

    @ray.method(enable_task_events=False)  # see `Scheduler.run`
    async def accept(self, tasks: list[AgentTask], traceparents: list[str]) -> None:
        """Takes a chunk of submitted tasks, whose callers wait with `run`; returns once the
        scheduler has them, so that a relay that dies before then is sent them again."""
        async with self._sending:
            await self._submit(tasks, traceparents)

    @ray.method(enable_task_events=False)  # see `Scheduler.run`
    async def run(self, task_id: str, tenant: str) -> AgentResult:
        """Returns the record of a task sent with `accept`, once it has one."""
        early = self._early.pop(task_id, None)
        if early is not None:
            return early[1]
        future: asyncio.Future[AgentResult] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(task_id, [])
        waiters.append(future)  # each call its own future: cancelling one ends no other
        if len(waiters) == 1:
            self._book.watch(task_id, tenant)
            if self._sweeper is None or self._sweeper.done():
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        caller = asyncio.current_task()
        if caller is not None:
            self._callers.add(caller)
        try:
            return await future
        finally:
            if caller is not None:
                self._callers.discard(caller)
            if not future.done():  # cancelled: the others waiting for the task go on waiting
                self._drop(task_id, future)

    def _drop(self, task_id: str, future: asyncio.Future[AgentResult]) -> None:
        waiters = self._waiters.get(task_id, [])
        if future in waiters:
            waiters.remove(future)
        if not waiters and self._waiters.pop(task_id, None) is not None:
            self._book.forget(task_id)

    def waiting(self) -> int:
        """Calls waiting for their task's record."""
        return sum(len(waiters) for waiters in self._waiters.values())

    async def withdraw(self) -> int:
        """Ends every `run` call still waiting, with a cancellation (the tasks go on): the
        pool calls it before it stops the relay. Returns how many."""
        return await withdraw_calls(self._callers)

    async def _submit(self, tasks: list[AgentTask], traceparents: list[str]) -> None:
        gave_up = time.monotonic() + _GIVE_UP_S
        delay = _RETRY_FIRST_S
        while True:
            try:
                if self._scheduler is None:
                    self._scheduler = ray.get_actor(self._scheduler_name, namespace=self._namespace)
                replies = await self._scheduler.enqueue.remote(tasks, traceparents, reply=True)
                break
            except (ray.exceptions.RayError, ValueError) as exc:
                self._scheduler = None
                if time.monotonic() > gave_up:
                    self._deliver([_failed(t, f"the scheduler could not be reached: {exc}") for t in tasks])
                    return
                log.warning("submitting %d tasks failed (%s); trying again", len(tasks), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
        # A record that exists already (a rejection, or a task that ran before) comes back now.
        self._deliver([r["record"] for r in replies if "record" in r])

    @ray.method(enable_task_events=False)  # see `Scheduler.run`
    def deliver(self, results: list[AgentResult]) -> None:
        """Records of ended tasks (from the scheduler): the calls waiting for them return."""
        self._deliver(results)

    def _deliver(self, results: list[AgentResult]) -> None:
        now = time.monotonic()
        for result in results:
            waiters = self._waiters.pop(result.task_id, None)
            if waiters is None:
                self._early.pop(result.task_id, None)  # kept in the order they came
                self._early[result.task_id] = (now, result)
                continue
            self._book.forget(result.task_id)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(result)
        while self._early:  # oldest first
            task_id, (at, _) = next(iter(self._early.items()))
            if now - at < _EARLY_KEEP_S:
                break
            del self._early[task_id]

    async def _sweep(self) -> None:
        """Looks up in Redis, a page at a time, the records of the tasks still awaited."""
        delay = _RETRY_FIRST_S
        while len(self._book):
            awaited = self._book.awaited()
            pages = max(1, -(-len(awaited) // PAGE))
            for start in range(0, len(awaited), PAGE):
                await asyncio.sleep(min(1.0, _SWEEP_ROUND_S / pages))
                try:
                    self._deliver(await self._lookup(awaited[start : start + PAGE]))
                    delay = _RETRY_FIRST_S
                except (RedisError, OSError) as exc:
                    log.warning("looking up records failed (%s); trying again", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX_S)

    async def _lookup(self, task_ids: list[str]) -> list[AgentResult]:
        out: list[AgentResult] = []
        for start in range(0, len(task_ids), PAGE):
            lookups = self._book.lookups(task_ids[start : start + PAGE])
            if not lookups:
                continue
            # One MGET per tenant (its keys share a slot), in a pipeline: the tenants may be
            # in several slots of a Redis Cluster (one round trip per node).
            pipe = self.redis.pipeline(transaction=False)
            for lookup in lookups:
                pipe.mget(lookup.keys)
            out += self._book.found(lookups, cast(list[list[str | None]], await pipe.execute()))
        return out

    def pid(self) -> int:
        return os.getpid()
