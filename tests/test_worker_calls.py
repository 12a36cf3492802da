"""The scheduler's calls to its workers (`scheduler.calls.WorkerCalls`) on real Ray actors:
the dispatches of one turn go to a worker in one call, each gets its own outcome as its task
ends, and a worker that dies answers every task it had not answered with the error."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import ray

from agentpool.models import AgentResult, AgentTask
from agentpool.protocol import Dispatch, RunFailed, pack, unpack
from agentpool.scheduler.calls import WorkerCalls

pytestmark = pytest.mark.usefixtures("ray_session")


@ray.remote
class EchoWorker:
    """Answers a dispatch after the delay its prompt names: `run` and `run_batch` as the real
    worker has them (the batch streams its outcomes as they end); `boom` raises, `die` exits."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def run(self, dispatch: bytes) -> bytes:
        self.calls.append(1)
        return pack([(0, await self._run(unpack(dispatch, Dispatch)))])

    async def run_batch(self, packed: bytes) -> AsyncIterator[bytes]:
        dispatches = unpack(packed, list)
        self.calls.append(len(dispatches))
        running = {asyncio.ensure_future(self._run(d)): i for i, d in enumerate(dispatches)}
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            out = []
            for run in done:
                index = running.pop(run)
                error = run.exception()
                out.append((index, run.result() if error is None else RunFailed(type(error).__name__, str(error))))
            yield pack(out)

    async def _run(self, dispatch: Dispatch) -> AgentResult:
        word, _, delay = dispatch.task.prompt.partition(" ")
        await asyncio.sleep(float(delay or 0))
        if word == "boom":
            raise ValueError("a bug")
        if word == "die":
            os._exit(1)
        return AgentResult(task_id=dispatch.task.task_id, tenant="t", status="succeeded", answer=dispatch.task.prompt)

    def batches(self) -> list[int]:
        return self.calls


def _dispatch(prompt: str) -> Dispatch:
    return Dispatch(task=AgentTask(tenant="t", prompt=prompt), trace_id="0" * 32, traceparent="", admitted_at_unix=0.0)


async def _send_all(calls: WorkerCalls, prompts: list[str]) -> list[Any]:
    sends = [calls.send(0, _dispatch(p)) for p in prompts]
    return list(await asyncio.gather(*sends, return_exceptions=True))


def test_one_call_per_turn_and_each_task_gets_its_own_outcome_as_it_ends() -> None:
    worker = EchoWorker.remote()
    calls = WorkerCalls(lambda index: worker)

    async def scenario() -> tuple[list[Any], list[Any]]:
        alone = await _send_all(calls, ["solo"])
        # Out of order on purpose: outcomes go to their own tasks, not by position in time.
        together = await _send_all(calls, ["slow 0.3", "fast 0", "boom 0.05", "mid 0.1"])
        return alone, together

    alone, together = asyncio.run(scenario())
    assert [r.answer for r in alone] == ["solo"]
    assert [getattr(r, "answer", None) for r in together] == ["slow 0.3", "fast 0", None, "mid 0.1"]
    assert together[2] == RunFailed("ValueError", "a bug")
    assert ray.get(worker.batches.remote()) == [1, 4]  # a lone dispatch is a plain call
    assert (calls.calls, calls.dispatches) == (2, 5)


def test_a_worker_that_dies_mid_stream_answers_its_unanswered_tasks_with_the_error() -> None:
    worker = EchoWorker.options(max_restarts=0).remote()
    calls = WorkerCalls(lambda index: worker)
    outcomes = asyncio.run(_send_all(calls, ["quick 0", "die 0.2", "late 5"]))
    assert outcomes[0].answer == "quick 0"  # answered before the worker died
    assert all(isinstance(o, ray.exceptions.RayActorError) for o in outcomes[1:]), outcomes
