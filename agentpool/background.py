"""Background asyncio tasks that stay alive until they end.

The event loop keeps only weak references to the tasks it runs: a task nobody holds may be
collected mid-flight. `Background` holds each one until it is done, then lets it go (and
calls `then`, if given)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Background:
    """A set of running tasks, each held until it ends."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(
        self, coro: Coroutine[Any, Any, T], then: Callable[[asyncio.Task[T]], object] | None = None
    ) -> asyncio.Task[T]:
        """Runs `coro` on the running loop; `then(task)` runs once it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if then is not None:
            task.add_done_callback(then)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self) -> None:
        """Until every task running now has ended (their errors are theirs to report)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


#: How long `withdraw` lets the replies of the calls it ended leave before its own.
_REPLY_GRACE_S = 0.3


async def withdraw_calls(callers: set[asyncio.Task[Any]]) -> int:
    """Ends the actor calls still waiting (their tasks, `callers`) with a cancellation, and
    gives their replies a moment to leave before the caller's own: an actor stopped with
    calls unanswered makes Ray print a line per call. Returns how many."""
    waiting = list(callers)
    for caller in waiting:
        caller.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    if waiting:
        await asyncio.sleep(_REPLY_GRACE_S)
    return len(waiting)
