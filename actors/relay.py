"""The relay: where the calls of `AgentPool.submit` wait, so the scheduler holds none.

`submit` returns one ref per task, each resolving when its task ends. Each ref is a pending
`run` call, which costs Ray about 54 KB in the process it waits in: in the scheduler, a
100,000-task batch would hold 5 GB there. The relay holds them instead, for a few hundred
bytes of its own per task (a future and an entry in its `CompletionBook`). It hands the
calls that arrive in one turn of its event loop to the scheduler as one detached
submission (`Scheduler.enqueue(..., reply=True)`, one Ray call per chunk of 1,000), and
resolves each call when the scheduler sends the task's record back (`deliver`, the records
ending in one turn of the scheduler's loop in one call). The scheduler keeps only its
queue's window in memory; the rest of the batch waits in the Redis backlog.

A record the relay did not get (the scheduler died between writing it and sending it, or
the relay was restarting) is found in Redis: the relay looks up the records of the tasks it
waits for, a page at a time, so each is looked up about every `_SWEEP_ROUND_S` seconds.
If the relay dies, Ray restarts it and sends the calls again; a task submitted again is the
same task (its id is the idempotency key), and one that ended meanwhile is answered from
its record. While Redis is away, records still come back (the scheduler sends them).
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
#: The tasks handed to the scheduler per call.
_CHUNK = 1000
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
        self._futures: dict[str, asyncio.Future[AgentResult]] = {}
        #: Further calls for a task already waiting (the same task submitted again).
        self._also: dict[str, list[asyncio.Future[AgentResult]]] = {}
        self._outgoing: list[tuple[AgentTask, str]] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._callers: set[asyncio.Task[Any]] = set()
        heap.settle()

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = async_client(self._url, decode_responses=True, health_check_interval=30)
        return self._redis

    async def run(self, task: AgentTask, traceparent: str) -> AgentResult:
        """Submits one task (batched with the others arriving now) and returns its record."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AgentResult] = loop.create_future()
        if task.task_id in self._futures:  # submitted again while it waits: one more waiter
            self._also.setdefault(task.task_id, []).append(future)
        else:
            self._futures[task.task_id] = future
            self._outgoing.append((task, traceparent))
            if len(self._outgoing) == 1:
                loop.call_soon(self._send)
        del task, traceparent  # this frame waits long: it keeps nothing of the task
        caller = asyncio.current_task()
        if caller is not None:
            self._callers.add(caller)
        try:
            return await future  # each call its own future: cancelling one ends no other
        finally:
            if caller is not None:
                self._callers.discard(caller)

    def waiting(self) -> int:
        """Calls waiting for their task's record."""
        return len(self._futures) + sum(len(also) for also in self._also.values())

    async def withdraw(self) -> int:
        """Ends every `run` call still waiting, with a cancellation (the tasks go on): the
        pool calls it before it stops the relay. Returns how many."""
        return await withdraw_calls(self._callers)

    def _send(self) -> None:
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_all())

    async def _send_all(self) -> None:
        """Hands the calls waiting to be sent to the scheduler, a chunk at a time: one
        chunk in flight, so the scheduler admits at most a chunk at once."""
        while self._outgoing:
            batch, self._outgoing = self._outgoing[:_CHUNK], self._outgoing[_CHUNK:]
            await self._submit(batch)

    async def _submit(self, batch: list[tuple[AgentTask, str]]) -> None:
        tasks = [task for task, _ in batch]
        for task in tasks:
            if task.task_id not in self._book and task.task_id in self._futures:
                self._book.watch(task)
        gave_up = time.monotonic() + _GIVE_UP_S
        delay = _RETRY_FIRST_S
        while True:
            try:
                if self._scheduler is None:
                    self._scheduler = ray.get_actor(self._scheduler_name, namespace=self._namespace)
                replies = await self._scheduler.enqueue.remote(tasks, [tp for _, tp in batch], reply=True)
                break
            except (ray.exceptions.RayError, ValueError) as exc:
                self._scheduler = None
                if time.monotonic() > gave_up:
                    self.deliver([_failed(t, f"the scheduler could not be reached: {exc}") for t in tasks])
                    return
                log.warning("submitting %d tasks failed (%s); trying again", len(tasks), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
        # A record that exists already (a rejection, or a task that ran before) comes back now.
        self.deliver([r["record"] for r in replies if "record" in r])
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def deliver(self, results: list[AgentResult]) -> None:
        """Records of ended tasks (from the scheduler): the calls waiting for them return."""
        for result in results:
            self._book.forget(result.task_id)
            future = self._futures.pop(result.task_id, None)
            for waiter in [future, *self._also.pop(result.task_id, [])]:
                if waiter is not None and not waiter.done():
                    waiter.set_result(result)

    async def _sweep(self) -> None:
        """Looks up in Redis, a page at a time, the records of the tasks still awaited."""
        delay = _RETRY_FIRST_S
        while len(self._book):
            awaited = self._book.awaited()
            pages = max(1, -(-len(awaited) // PAGE))
            for start in range(0, len(awaited), PAGE):
                await asyncio.sleep(min(1.0, _SWEEP_ROUND_S / pages))
                try:
                    self.deliver(await self._lookup(awaited[start : start + PAGE]))
                    delay = _RETRY_FIRST_S
                except (RedisError, OSError) as exc:
                    log.warning("looking up records failed (%s); trying again", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX_S)

    async def _lookup(self, task_ids: list[str]) -> list[AgentResult]:
        out: list[AgentResult] = []
        for start in range(0, len(task_ids), PAGE):
            page = self._book.lookups(task_ids[start : start + PAGE])
            if not page:
                continue
            # GETs in a pipeline, not MGET: the tasks' tenants may be in several slots of a
            # Redis Cluster (one round trip per node). decode_responses=True: str or None.
            pipe = self.redis.pipeline(transaction=False)
            for _, key in page:
                pipe.get(key)
            raws = cast(list[str | None], await pipe.execute())
            out += self._book.found([t for t, _ in page], raws)
        return out

    def pid(self) -> int:
        return os.getpid()
