"""The batch lane inside an agent worker (no Ray): its tasks' LLM calls, grouped into
Message Batches (`BatchLaneConfig`), each answer handed back to the agent loop that asked.

One `BatchLane` per worker process. A call waits in the worker's next batch, created after
`window_s` (sooner when `max_requests` or `max_bytes` is reached); a poller follows each
batch until it ends and resolves its calls by `custom_id`. A call whose task gives up
(cancelled, or out of time for the batch lane) leaves its batch, and a batch nobody waits
for any more is cancelled. What the batch lane cannot answer (an errored, expired or
cancelled request, the Batches API unreachable) raises `LaneMissed`: the caller sends the
call on the real-time lane, with its retries and fallbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic

from agentpool.actors.response import parse_message
from agentpool.errors import MalformedResponse
from agentpool.lanes import BatchLaneConfig

log = logging.getLogger(__name__)


class LaneMissed(Exception):
    """The batch lane did not answer this call; it goes on the real-time lane."""


@dataclass
class _Call:
    custom_id: str
    params: dict[str, Any]
    size: int
    future: asyncio.Future[dict[str, Any]]
    batch_id: str | None = None
    waiting: bool = True


@dataclass
class _Batch:
    calls: dict[str, _Call] = field(default_factory=dict)
    cancelled: bool = False


class BatchLane:
    """Groups one worker's batch-lane calls into Message Batches and hands back the answers."""

    def __init__(
        self,
        client: Callable[[], anthropic.AsyncAnthropic],
        config: BatchLaneConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._config = config
        self._clock = clock
        self._sleep = sleep
        self._queued: list[_Call] = []
        self._batches: dict[str, _Batch] = {}
        self._sender: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Calls sent, answered, missed; batches created and cancelled.
        self.stats: Counter[str] = Counter()

    async def call(self, request: dict[str, Any], model: str, *, give_up_at: float) -> dict[str, Any]:
        """The answer to `request` on `model` from a batch: the message, checked as the
        real-time lane checks it.

        Raises:
            LaneMissed: If no answer came by `give_up_at` (this lane's clock), or the batch
                could not answer it.
        """
        params = {**request, "model": model}
        params.pop("stream", None)
        size = len(json.dumps(params, separators=(",", ":"), default=str))
        call = _Call(f"c{uuid.uuid4().hex}", params, size, asyncio.get_running_loop().create_future())
        self._queued.append(call)
        self.stats["calls"] += 1
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send())
        try:
            async with asyncio.timeout(max(0.0, give_up_at - self._clock())):
                message = await asyncio.shield(call.future)
        except TimeoutError:
            self._leave(call)
            self.stats["missed"] += 1
            raise LaneMissed("the task's time for the batch lane ran out") from None
        except LaneMissed:
            self.stats["missed"] += 1
            raise
        except BaseException:  # cancelled with its task
            self._leave(call)
            raise
        self.stats["answered"] += 1
        return message

    def _leave(self, call: _Call) -> None:
        call.waiting = False
        if call in self._queued:
            self._queued.remove(call)
        batch = self._batches.get(call.batch_id or "")
        if batch is not None and not batch.cancelled and not any(c.waiting for c in batch.calls.values()):
            batch.cancelled = True  # nobody waits for it: the poller cancels it
        if not call.future.done():
            call.future.cancel()

    async def _send(self) -> None:
        """Sends what is queued as batches, one window after the first call came."""
        await self._sleep(self._config.window_s)
        while self._queued:
            take: list[_Call] = []
            size = 0
            while self._queued and len(take) < self._config.max_requests:
                if take and size + self._queued[0].size > self._config.max_bytes:
                    break
                call = self._queued.pop(0)
                take.append(call)
                size += call.size
            await self._create([c for c in take if c.waiting])

    async def _create(self, calls: list[_Call]) -> None:
        if not calls:
            return
        try:
            created = await self._client().messages.batches.create(
                requests=[{"custom_id": c.custom_id, "params": c.params} for c in calls]  # type: ignore[typeddict-item]
            )
        except (anthropic.APIError, OSError) as exc:
            log.warning("the batch lane could not create a batch (%s): its calls go real-time", type(exc).__name__)
            self._miss(calls, f"the Batches API refused the batch: {type(exc).__name__}")
            return
        batch = _Batch({c.custom_id: c for c in calls})
        for call in calls:
            call.batch_id = created.id
        self._batches[created.id] = batch
        self.stats["batches"] += 1
        poller = asyncio.ensure_future(self._follow(created.id, batch))
        self._tasks.add(poller)
        poller.add_done_callback(self._tasks.discard)

    async def _follow(self, batch_id: str, batch: _Batch) -> None:
        """Polls the batch until it ends, then hands each result to its call."""
        client = self._client()
        try:
            while True:
                await self._sleep(self._config.poll_s)
                if batch.cancelled:
                    with contextlib.suppress(anthropic.APIError, OSError):
                        await client.messages.batches.cancel(batch_id)
                        self.stats["batches_cancelled"] += 1
                    return
                state = await client.messages.batches.retrieve(batch_id)
                if state.processing_status == "ended":
                    break
            async for line in await client.messages.batches.results(batch_id):
                call = batch.calls.get(line.custom_id)
                if call is None or call.future.done():
                    continue
                result = line.result
                if result.type == "succeeded":
                    try:
                        message = parse_message(result.message.to_json().encode(), model=str(call.params["model"]))
                    except MalformedResponse as exc:
                        call.future.set_exception(LaneMissed(f"malformed batch answer: {exc}"))
                    else:
                        call.future.set_result(message)
                else:
                    call.future.set_exception(LaneMissed(f"the batch request {result.type}"))
        except (anthropic.APIError, OSError) as exc:
            log.warning("the batch lane lost batch %s (%s): its calls go real-time", batch_id, type(exc).__name__)
        finally:
            self._miss(list(batch.calls.values()), "the batch ended without this call's answer")
            self._batches.pop(batch_id, None)

    def _miss(self, calls: list[_Call], why: str) -> None:
        for call in calls:
            if not call.future.done():
                call.future.set_exception(LaneMissed(why))
                call.future.exception()  # retrieved: a call that left does not log it

    async def close(self) -> None:
        """Stops following batches (the worker is stopping)."""
        for task in [*self._tasks, *([self._sender] if self._sender else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
