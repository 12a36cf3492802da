"""The scheduler actor: admits, queues and dispatches tasks, and returns their results.

It returns `AgentResult` values, never refs: the client calls `run.remote`, so the client
owns each task's ref, and the scheduler awaits the worker itself (see DESIGN.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ray

from agentpool.config import PoolConfig
from agentpool.errors import AgentPoolError, Overloaded
from agentpool.models import AgentResult, AgentTask, ErrorInfo, Timings
from agentpool.protocol import Dispatch, traceparent
from cluster.keys import Keys
from cluster.store import ResultStore
from scheduler.admission import Admission
from scheduler.dispatch import LeastLoaded
from scheduler.queue import BoundedFifo


@dataclass(eq=False)
class _Waiting:
    task: AgentTask
    enqueued_at: float
    slot: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@ray.remote
class Scheduler:
    """Named async actor; one per pool."""

    def __init__(
        self, config: PoolConfig, *, redis_url: str, worker_names: list[str], namespace: str, tool_names: list[str]
    ) -> None:
        self.config = config
        self.redis_url = redis_url
        # Handles by name, so constructor arguments are plain data a restart can always reuse.
        workers = [ray.get_actor(name, namespace=namespace) for name in worker_names]
        self._workers = workers
        self._admission = Admission(config, set(tool_names))
        self._queue: BoundedFifo[_Waiting] = BoundedFifo(config.max_queued)
        self._slots = LeastLoaded(len(workers), config.worker_concurrency)
        self._tenant_running: Counter[str] = Counter()
        self._running: dict[str, asyncio.Future[AgentResult]] = {}
        self._store = ResultStore(
            redis_url,
            keys=Keys(config.key_prefix),
            result_ttl_s=config.result_ttl_s,
            stream_maxlen=config.stream_maxlen,
        )
        self._mean_run_s = 1.0
        self._counts: Counter[str] = Counter()

    def info(self) -> dict[str, Any]:
        """What `AgentPool.connect` needs to attach to this pool."""
        return {"config": self.config.model_dump(mode="json"), "redis_url": self.redis_url}

    async def run(self, task: AgentTask, trace_id: str) -> AgentResult:
        """Admits and runs one task; always returns its final record."""
        # The task_id is the idempotency key: a task already finished returns its record,
        # and one submitted again while running shares the first run.
        if task.task_id in self._running:
            return await asyncio.shield(self._running[task.task_id])
        # Registered before the first await, so a duplicate arriving meanwhile joins this run.
        future: asyncio.Future[AgentResult] = asyncio.get_running_loop().create_future()
        self._running[task.task_id] = future
        try:
            try:
                existing = await self._store.get_result(task.tenant, task.task_id)
                result = existing if existing is not None else await self._admit_and_run(task, trace_id)
            except Exception as exc:  # ray.get must never raise for a task: report it as a result
                result = await self._fail(task, trace_id, exc, 0.0)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: a duplicate caller may never have awaited it
            raise
        finally:
            del self._running[task.task_id]

    async def _admit_and_run(self, task: AgentTask, trace_id: str) -> AgentResult:
        admitted_unix = time.time()
        rejection = self._admission.check(
            task,
            queued=len(self._queue),
            in_flight=self._slots.in_flight,
            capacity=self._slots.capacity,
            mean_run_s=self._mean_run_s,
        )
        if rejection is not None:
            return await self._reject(task, trace_id, rejection)
        # No await between the bound check and the enqueue: concurrent arrivals must not all
        # pass the check before any of them is counted.
        waiting = _Waiting(task, time.monotonic())
        if not self._queue.offer(waiting):  # unreachable while admission checks the bound
            return await self._reject(task, trace_id, Overloaded("queue is full", retry_after_s=1.0))
        self._pump()
        try:
            await self._store.emit(
                task.tenant,
                "task_admitted",
                task_id=task.task_id,
                trace_id=trace_id,
                priority=task.priority,
                queued=len(self._queue),
            )
            worker = await waiting.slot
        except BaseException:  # cancelled, or the event write failed: give back place and slot
            if not self._queue.remove(waiting) and waiting.slot.done() and not waiting.slot.cancelled():
                self._release(task.tenant, waiting.slot.result())
            raise
        queued_ms = (time.monotonic() - waiting.enqueued_at) * 1000
        started = time.monotonic()
        try:
            dispatch = Dispatch(
                task=task,
                trace_id=trace_id,
                traceparent=traceparent(trace_id),
                admitted_at_unix=admitted_unix,
                queued_ms=queued_ms,
            )
            result: AgentResult = await self._workers[worker].run.remote(dispatch)
        except (ray.exceptions.RayError, AgentPoolError) as exc:
            result = await self._fail(task, trace_id, exc, queued_ms)
        finally:
            self._release(task.tenant, worker)
        run_s = time.monotonic() - started
        self._mean_run_s = 0.9 * self._mean_run_s + 0.1 * run_s
        self._counts[result.status] += 1
        return result

    def _pump(self) -> None:
        """Hands free worker slots to the oldest waiting tasks whose tenant has room."""
        while len(self._queue):
            worker = self._slots.acquire()
            if worker is None:
                return
            waiting = self._queue.pop_first(self._tenant_has_room)
            if waiting is None:
                self._slots.release(worker)
                return
            self._tenant_running[waiting.task.tenant] += 1
            waiting.slot.set_result(worker)

    def _tenant_has_room(self, waiting: _Waiting) -> bool:
        policy = self.config.policy_for(waiting.task.tenant)
        cap = policy.max_concurrency if policy is not None else None
        return cap is None or self._tenant_running[waiting.task.tenant] < cap

    def _release(self, tenant: str, worker: int) -> None:
        self._slots.release(worker)
        self._tenant_running[tenant] -= 1
        if self._tenant_running[tenant] <= 0:
            del self._tenant_running[tenant]
        self._pump()

    async def _reject(self, task: AgentTask, trace_id: str, error: AgentPoolError) -> AgentResult:
        retry_after = error.fields.get("retry_after_s")
        result = AgentResult(
            task_id=task.task_id,
            tenant=task.tenant,
            status="rejected",
            trace_id=trace_id,
            error=ErrorInfo(type=error.type_name, message=error.message, retryable=error.retryable),
            retry_after_s=retry_after,
            attempts=0,
        )
        stored, created = await self._store.write_result(result)
        if created:
            await self._store.emit(
                task.tenant,
                "shed" if error.retryable else "task_rejected",
                task_id=task.task_id,
                trace_id=trace_id,
                error_type=error.type_name,
                reason=error.fields.get("reason", error.message),
                retry_after_s=retry_after,
            )
        self._counts["rejected"] += 1
        return stored

    async def _fail(self, task: AgentTask, trace_id: str, exc: BaseException, queued_ms: float) -> AgentResult:
        result = AgentResult(
            task_id=task.task_id,
            tenant=task.tenant,
            status="failed",
            trace_id=trace_id,
            error=ErrorInfo(type=type(exc).__name__, message=str(exc)[:4000], retryable=True),
            timings=Timings(queued_ms=queued_ms),
        )
        try:
            stored, _ = await self._store.write_result(result)
        except Exception:  # Redis itself failed: the caller still gets the result
            return result
        return stored

    def status(self) -> dict[str, Any]:
        queued_by_tenant: Counter[str] = Counter()
        for waiting in self._queue:
            queued_by_tenant[waiting.task.tenant] += 1
        return {
            "queued": len(self._queue),
            "queued_by_tenant": dict(queued_by_tenant),
            "in_flight": self._slots.in_flight,
            "in_flight_by_tenant": dict(self._tenant_running),
            "capacity": self._slots.capacity,
            "worker_load": list(self._slots.load),
            "finished_by_status": dict(self._counts),
            "mean_run_s": round(self._mean_run_s, 4),
        }
