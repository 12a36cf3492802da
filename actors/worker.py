"""The agent-worker actor: a stateless shell that runs `AgentLoop`s concurrently.

Stateless: everything a task needs arrives in its `Dispatch`, and everything it produces
leaves through Redis and the return value, so any worker can run any task and a restarted
worker has nothing to recover.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import anthropic
import httpx2
import ray

from actors.agent_loop import AgentLoop
from actors.backoff import Backoff
from actors.gate import TaskGate
from actors.llm import LLMClient
from actors.tool_calls import ToolCalls
from agentpool.config import PoolConfig
from agentpool.models import AgentResult, ErrorInfo, Timings
from agentpool.pricing import PriceTable
from agentpool.protocol import Dispatch, ToolCall, ToolOutcome
from cluster.keys import Keys
from cluster.store import ResultStore
from scheduler.budgets import BudgetLedger


@ray.remote
class AgentWorker:
    """Runs agent loops; tool calls go to the tool-executor actors."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        redis_url: str,
        base_url: str | None,
        api_key: str,
        tool_catalog: dict[str, dict[str, Any]],
        executor_names: dict[str, list[str]],
        namespace: str,
        limiter_name: str,
        board_name: str,
    ) -> None:
        self.config = config
        self._base_url = base_url
        self._api_key = api_key
        self._tool_defs = {name: entry["definition"] for name, entry in tool_catalog.items()}
        self._prices = PriceTable(config.prices)
        self._store = ResultStore(
            redis_url,
            keys=Keys(config.key_prefix),
            result_ttl_s=config.result_ttl_s,
            stream_maxlen=config.stream_maxlen,
        )
        self._limiter = ray.get_actor(limiter_name, namespace=namespace)
        self._ledger = BudgetLedger(
            lambda: self._store.redis, self._store.keys, reservation_ttl_s=config.lease_expiry_s
        )
        self._holder = ray.get_runtime_context().get_actor_id() or "worker"
        # Looked up by name, not passed as handles: constructor arguments stay plain data,
        # so a restarted worker never depends on objects that may have left the store.
        self._tools = ToolCalls(
            catalog=tool_catalog,
            groups={g: [ray.get_actor(n, namespace=namespace) for n in names] for g, names in executor_names.items()},
            board=ray.get_actor(board_name, namespace=namespace),
            redis=lambda: self._store.redis,
            keys=self._store.keys,
            bulkhead_wait_s=config.bulkhead_wait_s,
        )
        self._llm: LLMClient | None = None
        self.in_flight = 0

    def _client(self) -> LLMClient:
        # Built on first use, inside the actor's event loop, and shared by all its loops:
        # one connection pool per process rather than per task.
        if self._llm is None:
            limits = httpx2.Limits(
                max_connections=self.config.worker_concurrency * 2,
                max_keepalive_connections=self.config.worker_concurrency,
            )
            client = anthropic.AsyncAnthropic(
                api_key=self._api_key,
                base_url=self._base_url,
                max_retries=0,
                timeout=self.config.llm_request_timeout_s,
                http_client=httpx2.AsyncClient(limits=limits, timeout=self.config.llm_request_timeout_s),
            )
            self._llm = LLMClient(client, Backoff(self.config.retry), clock=time.monotonic)
        return self._llm

    async def run(self, dispatch: Dispatch) -> AgentResult:
        """Runs one task to its final record, writes it to Redis once, and returns it."""
        self.in_flight += 1
        started = time.monotonic()
        task = dispatch.task

        async def emit(event: str, **fields: Any) -> None:
            await self._store.emit(task.tenant, event, task_id=task.task_id, trace_id=dispatch.trace_id, **fields)

        gate: TaskGate | None = None
        try:
            allowed = self._allowed_tools(task.tenant, task.tools)
            gate = TaskGate(
                limiter=self._limiter,
                ledger=self._ledger,
                prices=self._prices,
                tenant=task.tenant,
                policy=self.config.policy_for(task.tenant) or self.config.default_tenant_policy,
                priority=task.priority,
                chars_per_token=self.config.input_chars_per_token,
                holder=self._holder,
                limited=lambda model: self.config.limit_key(model) is not None,
            )
            loop = AgentLoop(
                task,
                call_llm=functools.partial(self._client().create, gate=gate),
                run_tools=lambda calls: self._run_tools(calls, allowed, emit),
                tool_defs=[self._tool_defs[name] for name in task.tools if name in allowed],
                models=self.config.models_for(task.tenant, task.model, task.fallback_models),
                prices=self._prices,
                emit=emit,
                trace_id=dispatch.trace_id,
            )
            result = await loop.run()
            result.attempts = dispatch.attempt
            await gate.drain()
        except Exception as exc:  # a bug of ours must cost this task, never the actor
            result = AgentResult(
                task_id=task.task_id,
                tenant=task.tenant,
                status="failed",
                trace_id=dispatch.trace_id,
                error=ErrorInfo(type="InternalError", message=f"{type(exc).__name__}: {exc}"[:4000]),
            )
        finally:
            self.in_flight -= 1
        run_ms = (time.monotonic() - started) * 1000
        total_ms = max(run_ms, (time.time() - dispatch.admitted_at_unix) * 1000)
        result.timings = Timings(
            queued_ms=round(dispatch.queued_ms, 3),
            run_ms=round(run_ms, 3),
            permit_wait_ms=round(gate.permit_wait_s * 1000, 3) if gate is not None else 0.0,
            total_ms=round(total_ms, 3),
        )
        stored, created = await self._store.write_result(result)
        if created:
            await emit(
                "task_end",
                status=stored.status,
                iterations=stored.iterations,
                usage=stored.usage.model_dump(),
                timings=stored.timings.model_dump(),
                error=stored.error.model_dump() if stored.error else None,
            )
        await self._store.flush()  # this task's events are in Redis when its result is returned
        return stored

    def _allowed_tools(self, tenant: str, requested: list[str]) -> set[str]:
        policy = self.config.policy_for(tenant)
        allowed = set(requested) & set(self._tool_defs)
        if policy is not None and policy.allowed_tools is not None:
            allowed &= set(policy.allowed_tools)
        return allowed

    async def _run_tools(self, calls: list[ToolCall], allowed: set[str], emit: Any) -> list[ToolOutcome]:
        return list(await asyncio.gather(*(self._tools.run(c, allowed, emit) for c in calls)))

    def ping(self) -> int:
        return self.in_flight

    def node(self) -> str:
        """The id of the Ray node this worker runs on."""
        return ray.get_runtime_context().get_node_id()
