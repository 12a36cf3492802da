"""The scheduler's calls to its workers: those for one worker in one turn of the scheduler's
event loop go in one Ray call.

A lone dispatch is one `run` call, the shortest path at low load. Several go in one
`run_batch` call whose outcomes stream back as their tasks end (a Ray streaming generator),
so under load the scheduler submits one call per worker and turn instead of one per task:
Ray's submission path was a third of the scheduler's CPU. If the worker dies or cannot be
reached, every task of the call not yet answered gets that error, as a call of its own would.
Both ways the messages go `protocol.pack`ed (Ray's own pickling of them costs more).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from agentpool.background import Background
from agentpool.protocol import Dispatch, Outcome, pack, unpack_outcomes

log = logging.getLogger("agentpool.scheduler")

Pending = list[tuple[Dispatch, "asyncio.Future[Outcome]"]]


class WorkerCalls:
    """Sends each worker its dispatches of one turn together (`send`)."""

    def __init__(self, handle: Callable[[int], Any]) -> None:
        #: The worker's actor handle now (the fleet replaces a restarted worker's).
        self._handle = handle
        self._outgoing: dict[int, Pending] = {}
        self._streams = Background()
        #: Calls made, and the dispatches they carried.
        self.calls = 0
        self.dispatches = 0

    async def send(self, worker: int, dispatch: Dispatch) -> Outcome:
        """Runs `dispatch` on `worker` and returns its outcome.

        Raises:
            ray.exceptions.RayError: As the call of a dispatch of its own would.
        """
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        pending = self._outgoing.setdefault(worker, [])
        pending.append((dispatch, future))
        if len(pending) == 1:
            asyncio.get_running_loop().call_soon(self._send, worker)
        return await future

    def _send(self, worker: int) -> None:
        pending = self._outgoing.pop(worker, [])
        pending = [(d, f) for d, f in pending if not f.done()]
        if not pending:
            return
        self.calls += 1
        self.dispatches += len(pending)
        try:
            handle = self._handle(worker)
            if len(pending) == 1:
                ((dispatch, future),) = pending
                self._streams.spawn(self._one(handle.run.remote(pack(dispatch)), future))
            else:
                stream = handle.run_batch.options(num_returns="streaming").remote(pack([d for d, _ in pending]))
                self._streams.spawn(self._stream(stream, [f for _, f in pending]))
        except Exception as exc:  # the call could not even be made: each task hears why
            _fail_all([f for _, f in pending], exc)

    @staticmethod
    async def _one(ref: Any, future: asyncio.Future[Outcome]) -> None:
        try:
            ((_, outcome),) = unpack_outcomes(await ref)
        except BaseException as exc:
            _fail_all([future], exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if not future.done():
                future.set_result(outcome)

    @staticmethod
    async def _stream(stream: Any, futures: list[asyncio.Future[Outcome]]) -> None:
        try:
            async for ref in stream:
                for index, outcome in unpack_outcomes(await ref):
                    if not futures[index].done():
                        futures[index].set_result(outcome)
        except BaseException as exc:
            _fail_all(futures, exc)
            if not isinstance(exc, Exception):
                raise
        unanswered = [f for f in futures if not f.done()]
        if unanswered:  # a worker of another version, say: never leave a task waiting
            log.error("a worker's stream ended with %d of its %d tasks unanswered", len(unanswered), len(futures))
            _fail_all(unanswered, RuntimeError("the worker's stream ended without this task's outcome"))


def _fail_all(futures: list[asyncio.Future[Outcome]], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
