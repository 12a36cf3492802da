"""No accepted task ends without a record: an exception injected at each stage of the
scheduler's path still resolves every ref (and every `enqueue`) with a `failed` record that
says why, and leaves the scheduler serving the next task.

The scheduler here is the product's own, with one method per stage wrapped to raise for
tasks that ask for it (`metadata={"fault": "stage[,stage]"}`); everything else is real.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

import agentpool.scheduler.scheduler as scheduler_module
from agentpool import AgentPool, AgentResult, AgentTask
from agentpool.models import TaskStatus
from tests.pools import small_config

pytestmark = pytest.mark.usefixtures("ray_session")

Base: Any = scheduler_module.Scheduler.__ray_actor_class__


class InjectedFault(RuntimeError):
    """What a stage raises when a task asks for it."""


def _maybe(task: AgentTask, stage: str) -> None:
    if stage in str(task.metadata.get("fault", "")).split(","):
        raise InjectedFault(f"injected at {stage}")


class FaultyScheduler(Base):  # type: ignore[misc]
    """The real scheduler, raising at a stage a task names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        admit, write = self._store.admit, self._store.write_result

        async def faulty_admit(task: AgentTask, entry: str) -> Any:
            _maybe(task, "store_admit")
            return await admit(task, entry)

        async def faulty_write(result: AgentResult, **kwargs: Any) -> Any:
            if result.status != "succeeded":  # the worker's own record goes through untouched
                task = self._jobs[result.task_id].task if result.task_id in self._jobs else None
                if task is not None:
                    _maybe(task, "store_write")
            return await write(result, **kwargs)

        self._store.admit = faulty_admit
        self._store.write_result = faulty_write

    def _admits_in_batch(self, task: AgentTask, ahead: int, *, reply: bool) -> bool:
        # A task naming a stage takes a job's own path, where the stages are; a task naming
        # `batch` fails at the one-step admission of `enqueue`, whose tasks then take it too.
        if "batch" in str(task.metadata.get("fault", "")):
            return True
        return not task.metadata.get("fault") and super()._admits_in_batch(task, ahead, reply=reply)

    async def _admit_batch(self, tasks: list[AgentTask], *args: Any) -> Any:
        for task in tasks:
            _maybe(task, "batch")
        return await super()._admit_batch(tasks, *args)

    def _start(self, task: AgentTask, context: str, **kwargs: Any) -> Any:
        _maybe(task, "start")
        return super()._start(task, context, **kwargs)

    async def _admission_check(self, job: Any) -> Any:
        _maybe(job.task, "admission")
        if "reject" in str(job.task.metadata.get("fault", "")):
            from agentpool.errors import Overloaded

            return Overloaded("test rejection", tenant=job.task.tenant, reason="overload", retry_after_s=1.0)
        return await super()._admission_check(job)

    def _enqueue(self, job: Any) -> None:
        _maybe(job.task, "enqueue")
        super()._enqueue(job)

    async def _through(self, job: Any) -> Any:
        _maybe(job.task, "through")
        return await super()._through(job)

    async def _run_on(self, worker: int, job: Any) -> Any:
        _maybe(job.task, "run_on")
        return await super()._run_on(worker, job)

    async def _reject(self, task: AgentTask, *args: Any) -> Any:
        _maybe(task, "reject")
        return await super()._reject(task, *args)

    async def _fail(self, task: AgentTask, *args: Any) -> Any:
        _maybe(task, "fail")
        return await super()._fail(task, *args)

    def _observe_end(self, job: Any, result: Any) -> None:
        _maybe(job.task, "observe_end")
        super()._observe_end(job, result)


#: Each stage, and the status its task must end with.
STAGES: dict[str, TaskStatus] = {
    "start": "failed",
    "store_admit": "failed",
    "admission": "failed",
    "enqueue": "failed",
    "through": "failed",
    "run_on": "failed",
    "reject": "failed",  # a rejection whose record cannot be made
    "through,store_write": "failed",  # and Redis refuses the failure record: the caller still gets it
    "through,fail": "failed",  # making the failure record fails: the life itself raises
    "observe_end": "succeeded",  # counting the end fails after the task ran
    "batch": "succeeded",  # enqueue's one-step admission fails: the task is admitted on its own
}


@pytest.fixture(scope="module")
def pool(redis_url: str) -> Iterator[AgentPool]:
    real = scheduler_module.Scheduler
    scheduler_module.Scheduler = ray.remote(FaultyScheduler)
    try:
        p = AgentPool.start(small_config(redis_url, tag="f"))
    finally:
        scheduler_module.Scheduler = real
    yield p
    status = p.status()
    assert status["queued"] == 0 and status["in_flight"] == 0, status  # nothing left behind
    p.shutdown()


def _task(fault: str) -> AgentTask:
    return AgentTask(tenant="acme", prompt=f"sim: answer fine ({fault})", metadata={"fault": fault})


def test_every_ref_resolves_with_a_record_whatever_stage_fails(pool: AgentPool) -> None:
    tasks = [_task(stage) for stage in STAGES]
    results: list[AgentResult] = ray.get(pool.submit(tasks), timeout=60)
    for (stage, expected), result in zip(STAGES.items(), results, strict=True):
        assert result.status == expected, (stage, result)
        if expected == "failed":
            assert result.error is not None and "injected at" in result.error.message, (stage, result.error)
            assert result.error.type == "InjectedFault"
    # The records Redis could take are there, and say the same.
    stored = {r.task_id: r for r in pool.results("acme").read()}
    for (stage, _), result in zip(STAGES.items(), results, strict=True):
        if "store_write" not in stage:
            assert stored[result.task_id].status == result.status, stage
    # The scheduler still serves the next task.
    assert pool.run([AgentTask(tenant="acme", prompt="sim: answer after")])[0].status == "succeeded"


def test_enqueue_hears_of_every_task_whatever_stage_fails(pool: AgentPool) -> None:
    tasks = [_task(stage) for stage in STAGES]
    answers = pool.enqueue(tasks)
    assert [a["task_id"] for a in answers] == [t.task_id for t in tasks]
    assert all(a["status"] in ("accepted", "failed", "succeeded") for a in answers), answers
    reader = pool.results("acme")
    want = {t.task_id for t, stage in zip(tasks, STAGES, strict=True) if "store_write" not in stage}
    deadline = time.monotonic() + 30
    while True:
        found = {r.task_id: r for r in reader.read() if r.task_id in want}
        if len(found) == len(want) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    missing = [s for t, s in zip(tasks, STAGES, strict=True) if t.task_id in want - set(found)]
    assert not missing, missing
