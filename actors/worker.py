"""The agent-worker actor: a stateless shell that runs `AgentLoop`s concurrently.

Stateless: everything a task needs arrives in its `Dispatch`, and everything it produces
leaves through Redis and the return value, so any worker can run any task and a restarted
worker has nothing to recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import ray
from pydantic import BaseModel, SecretStr, ValidationError
from redis.exceptions import RedisError

from agentpool import events, heap
from agentpool import telemetry as tm
from agentpool.actors.agent_loop import AgentLoop
from agentpool.actors.checkpoint import Checkpointer, load_checkpoint
from agentpool.actors.gate import TaskGate
from agentpool.actors.provider_calls import ProviderCalls
from agentpool.actors.run_lease import RunLease, Superseded, confirmed, nothing_before
from agentpool.actors.session_task import compaction_plan, session_full, session_write
from agentpool.actors.tool_calls import ToolCalls
from agentpool.cluster.budgets import BudgetLedger
from agentpool.cluster.store import ResultStore, RunStart
from agentpool.cluster.telemetry import Telemetered
from agentpool.cluster.tool_records import ToolRecords
from agentpool.config import PoolConfig
from agentpool.errors import ConfigError
from agentpool.events import Event
from agentpool.models import AgentResult, ErrorInfo, Timings, agent_fields
from agentpool.pricing import PriceTable
from agentpool.protocol import ApprovalDecision, Dispatch, Outcome, Paused, RunFailed, pack, provider_key_name, unpack
from agentpool.secrets import Scrubber, forget_env_secrets, install_log_scrubber
from agentpool.vocabulary import ErrorReason, OnBusy, TaskStatus

log = logging.getLogger("agentpool.worker")

_M = TypeVar("_M", bound=BaseModel)


def _loaded(raw: str | None, model: type[_M]) -> _M | None:
    """A model read back from Redis; None if absent or unreadable (written by another version)."""
    if raw is None:
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        return None


def _failed(dispatch: Dispatch, error: ErrorInfo) -> AgentResult:
    """The `failed` record of a dispatched task that `error` stopped before its loop ended."""
    task = dispatch.task
    return AgentResult(
        task_id=task.task_id,
        **agent_fields(task),
        tenant=task.tenant,
        status=TaskStatus.FAILED,
        trace_id=dispatch.trace_id,
        session_id=task.session_id,
        error=error,
    )


class _SessionFull(Exception):
    """The task's session is over the tenant's size limits and cannot be compacted."""


@ray.remote
class AgentWorker(RunLease, Telemetered):
    """Runs agent loops; tool calls go to the tool-executor actors."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        redis_url: str,
        base_url: str | None,
        tool_catalog: dict[str, dict[str, Any]],
        executor_names: dict[str, list[str]],
        namespace: str,
        limiter_name: str,
        board_name: str,
    ) -> None:
        self._setup_telemetry("worker")
        self.config = config
        api_key = _provider_key(config.name, namespace)
        # Whatever this process logs or records passes the scrubber: the key never leaves it.
        self._scrub = Scrubber([api_key])
        forget_env_secrets()
        install_log_scrubber(self._scrub)
        self._tool_defs = {name: entry["definition"] for name, entry in tool_catalog.items()}
        self._catalog = tool_catalog
        self._prices = PriceTable(config.prices)
        self._store = ResultStore.for_pool(redis_url, config, current=lambda: self.config, linger_events=True)
        #: The live configuration's version applied (`pool.update_config`); 0: as started.
        self._config_version = 0
        self._limiter = ray.get_actor(limiter_name, namespace=namespace)
        self._ledger = BudgetLedger(
            lambda: self._store.redis, self._store.keys, reservation_ttl_s=config.lease_expiry_s
        )
        self._calls = ProviderCalls(
            config, api_key=api_key, base_url=base_url, scrub=self._scrub, prices=self._prices, store=self._store
        )
        self._holder = ray.get_runtime_context().get_actor_id() or "worker"
        # Looked up by name, not passed as handles: constructor arguments stay plain data,
        # so a restarted worker never depends on objects that may have left the store.
        self._tools = ToolCalls(
            catalog=tool_catalog,
            groups={g: [ray.get_actor(n, namespace=namespace) for n in names] for g, names in executor_names.items()},
            board=ray.get_actor(board_name, namespace=namespace),
            records=ToolRecords(lambda: self._store.redis, self._store.keys),
            bulkhead_wait_s=config.bulkhead_wait_s,
            audit=self._store.audit,
        )
        self._loops: dict[str, AgentLoop] = {}
        #: Runs here that a later task of their session interrupted, and how (`OnBusy`).
        self._interrupted: dict[str, OnBusy] = {}
        self.in_flight = 0
        heap.settle()

    @ray.method(enable_task_events=False)  # see `Scheduler.run`
    async def run(self, dispatch: bytes | Dispatch) -> bytes | AgentResult | Paused:
        """Runs one task (a `Dispatch`, `protocol.pack`ed) to its final record, writes it to
        Redis once, and returns it; or, for a task that stops to wait for approval, returns
        `Paused` (checkpoint saved). The outcome comes back packed as `[(0, outcome)]`, as
        `run_batch` streams its outcomes (`protocol.unpack_outcomes` reads both). A
        `Dispatch` sent as an object (a scheduler of the release before, during an upgrade,
        which restarts the workers first) gets its outcome back as an object.

        A task that ran before (crash, re-dispatch, approval) resumes from its checkpoint.
        If another run still holds the task, this one waits for that run's record instead
        of running it twice.
        """
        if isinstance(dispatch, Dispatch):
            return await self._run_traced(dispatch)
        return pack([(0, await self._run_traced(unpack(dispatch, Dispatch)))])

    async def _run_traced(self, dispatch: Dispatch) -> AgentResult | Paused:
        self.in_flight += 1
        task = dispatch.task
        attributes: dict[str, str | int] = {
            "agentpool.task_id": task.task_id,
            "agentpool.tenant": task.tenant,
            "agentpool.attempt": dispatch.attempt,
        }
        with tm.tracer.start_as_current_span(
            "agent_run", context=tm.context_of(dispatch.traceparent), attributes=attributes
        ) as span:
            try:
                outcome = await self._run(dispatch)
            finally:
                self.in_flight -= 1
            span.set_attribute("agentpool.status", outcome.status if isinstance(outcome, AgentResult) else "paused")
            if isinstance(outcome, AgentResult) and outcome.resumes:
                span.set_attribute("agentpool.resumes", outcome.resumes)
            return outcome

    @ray.method(enable_task_events=False)  # see `Scheduler.run`
    async def run_batch(self, dispatches: bytes | list[Dispatch]) -> AsyncIterator[bytes | list[tuple[int, Outcome]]]:
        """Runs several dispatches at once (a `protocol.pack`ed list) and streams their
        outcomes as they end, each with its index in the list: one Ray call for all the tasks
        a scheduler hands this worker in one turn of its event loop (call it with
        `num_returns="streaming"`). The outcomes that end in one turn of this worker's loop
        come back together, packed; as objects to a list sent as objects (see `run`)."""
        packed = isinstance(dispatches, bytes)
        batch = unpack(dispatches, list) if isinstance(dispatches, bytes) else dispatches
        if not all(isinstance(d, Dispatch) for d in batch):
            raise TypeError("run_batch takes a list of Dispatch")
        running = {asyncio.ensure_future(self._run_traced(d)): i for i, d in enumerate(batch)}
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            out: list[tuple[int, Outcome]] = []
            for run in done:
                index = running.pop(run)
                error = run.exception()
                if error is None:
                    out.append((index, run.result()))
                else:  # run() reports failures as records: this is a bug of ours
                    out.append((index, RunFailed(type(error).__name__, self._scrub(str(error))[:4000])))
            yield pack(out) if packed else out

    def update_config(self, live: dict[str, Any], version: int) -> int:
        """Applies the live configuration `version` (tenants' policies, limits) to the tasks
        that start from now on; an older one is ignored. Returns the version applied."""
        if version > self._config_version:
            self.config, self._config_version = self.config.with_live(live), version
        return self._config_version

    async def _catch_up(self, version: int) -> None:
        """A dispatch carries a newer live configuration than this worker's (it restarted, or
        missed the push): read it from Redis. Failing that, the task runs on what is here."""
        try:
            stored, live = await self._store.live_config.load()
        except (RedisError, OSError) as exc:
            log.warning("could not read configuration %d (%s); running on %d", version, exc, self._config_version)
            return
        self.update_config(live, stored)

    async def _run(self, dispatch: Dispatch) -> AgentResult | Paused:
        started = time.monotonic()
        task = dispatch.task
        if dispatch.config_version > self._config_version:
            await self._catch_up(dispatch.config_version)

        tag = (task.agent, task.agent_version)

        async def emit(event: Event) -> None:
            if isinstance(event, events.LlmCall | events.SessionCompacted):
                self._calls.spent(task.tenant, event)
            await self._store.emit(task.tenant, event, task_id=task.task_id, trace_id=dispatch.trace_id, agent=tag)

        if dispatch.fresh:
            # A task its scheduler has just accepted has never run: its begin can only take
            # the lease and find nothing an earlier run left. It goes to Redis while the first
            # LLM call is made, and what it found is checked before anything else the run
            # does (a tool, a checkpoint, the record); if it found more after all, that call's
            # answer is set aside (its usage kept) and the run starts over from what it found.
            pending = asyncio.ensure_future(self._begin(dispatch, emit))
            try:
                return await self._execute(dispatch, RunStart(leased=True), emit, started, pending)
            except Superseded:
                begun = pending.result()
        else:
            begun = await self._begin(dispatch, emit)
        if isinstance(begun, AgentResult):
            return begun
        return await self._execute(dispatch, begun, emit, started, None)

    async def _execute(
        self,
        dispatch: Dispatch,
        begun: RunStart,
        emit: Callable[[Event], Awaitable[None]],
        started: float,
        pending: asyncio.Future[RunStart | AgentResult] | None,
    ) -> AgentResult | Paused:
        """Runs the loop from what the run's begin found; with `pending` (a fresh task's begin
        still in flight), raises `Superseded` once it turns out to have found more."""
        task = dispatch.task

        async def found_more() -> bool:
            return pending is not None and not nothing_before(await pending)

        async def confirm() -> None:
            if await found_more():
                raise Superseded

        heartbeat = asyncio.ensure_future(self._renew(dispatch)) if begun.leased else None
        # A paused task's checkpoint must outlive its wait for approval.
        ttl_s = max(self.config.checkpoint_ttl_s, int(self.config.approval_timeout_s) + 3600)
        gate: TaskGate | None = None
        discarded: str | None = None  # why a checkpoint found was not resumed from

        async def save(payload: str) -> None:
            # The usage of the turns this state holds goes with it, in the same round trip.
            taken = gate.unsettled() if gate is not None else None
            also = (taken.write,) if taken is not None else ()
            try:
                await self._store.save_checkpoint(task.tenant, task.task_id, payload, ttl_s=ttl_s, also=also)
            except BaseException:
                if gate is not None and taken is not None:
                    gate.unsent(taken)
                raise

        checkpoints = Checkpointer(save)
        loop: AgentLoop | None = None
        try:
            state, discarded = load_checkpoint(begun.checkpoint)
            if discarded is not None:
                log.warning("task %s runs again from its first turn: %s", task.task_id, discarded)
            allowed = self._allowed_tools(task.tenant, task.tools)
            policy = self.config.policy_for(task.tenant) or self.config.default_tenant_policy
            history, version, compaction = task.messages, None, None
            if state is None and task.session_id is not None:
                record = await self._store.sessions.load(task.tenant, task.session_id)
                history, version = (record.messages, record.version) if record else ([], 0)
                compaction = compaction_plan(self.config, task, policy.sessions, history)
                full = session_full(policy.sessions, history) if compaction is None else None
                if full is not None:
                    raise _SessionFull(full)
            gate = TaskGate(
                limiter=self._limiter,
                ledger=self._ledger,
                prices=self._prices,
                tenant=task.tenant,
                policy=policy,
                priority=task.priority,
                chars_per_token=self.config.input_chars_per_token,
                holder=self._holder,
                limited=lambda model: self.config.limit_key(model) is not None,
            )
            loop = AgentLoop(
                task,
                call_llm=confirmed(self._calls.for_task(task, policy, gate, state), confirm),
                run_tool=lambda call: self._tools.run(call, allowed, emit),
                tool_defs=[self._tool_defs[name] for name in task.tools if name in allowed],
                models=self.config.task_models(task),
                prices=self._prices,
                emit=emit,
                trace_id=dispatch.trace_id,
                state=state,
                checkpoint=checkpoints,
                needs_approval=lambda name: bool(self._catalog.get(name, {}).get("requires_approval")),
                approval=_loaded(begun.approval, ApprovalDecision),
                approval_timeout_s=self.config.approval_timeout_s,
                guardrails=policy.guardrails,
                history=history,
                session_version=version,
                compaction=compaction,
                chars_per_token=self.config.input_chars_per_token,
                routing=self.config.routing_for(task),
            )
            if loop.resumed_from is not None:
                await emit(events.TaskResumed(iteration=loop.resumed_from, attempt=dispatch.attempt))
            self._loops[task.task_id] = loop
            if begun.cancelled:
                loop.cancel("cancel requested before the run started")
            outcome: AgentResult | Paused | None = await loop.run()
            await gate.drain()
        except Superseded:
            outcome = None
        except _SessionFull as full:
            full_error = ErrorInfo(type="SessionFull", message=str(full), reason=ErrorReason.SESSION_FULL)
            outcome = _failed(dispatch, full_error)
        except Exception as exc:  # a bug of ours must cost this task, never the actor
            message = self._scrub(f"{type(exc).__name__}: {exc}")[:4000]
            outcome = _failed(dispatch, ErrorInfo(type="InternalError", message=message))
        finally:
            if loop is not None and self._loops.get(task.task_id) is loop:
                del self._loops[task.task_id]
            interrupted = self._interrupted.pop(task.task_id, None)
            if heartbeat is not None:
                heartbeat.cancel()
        # Checked again for a loop that ended before its first answer (cancelled, say).
        if outcome is None or await found_more():
            if gate is not None:
                await gate.drain()
            await self._settle(task.tenant, gate)
            raise Superseded
        if isinstance(outcome, Paused):
            await checkpoints.flush()  # the pause is in Redis before the slot is given back
            await self._settle(task.tenant, gate)
            await self._release(dispatch)
            await emit(events.ApprovalRequested(tools=outcome.tools, deadline_unix=outcome.deadline_unix))
            await self._store.flush()
            return outcome
        checkpoints.discard()
        await checkpoints.flush()  # no checkpoint write may land after the final record
        result = outcome
        result.attempts = dispatch.attempt
        result.checkpoint_discarded = discarded
        run_ms = (time.monotonic() - started) * 1000
        total_ms = max(run_ms, (time.time() - dispatch.admitted_at_unix) * 1000)
        result.timings = Timings(
            queued_ms=round(dispatch.queued_ms, 3),
            run_ms=round(run_ms, 3),
            permit_wait_ms=round(gate.permit_wait_s * 1000, 3) if gate is not None else 0.0,
            total_ms=round(total_ms, 3),
        )
        # One round trip: this process's queued events, the usage no write has recorded yet,
        # the record, and (only if this write creates the record) the task's last events.
        ending: list[Event] = []
        if result.status == TaskStatus.BUDGET_EXHAUSTED:
            error = result.error
            message = error.message if error else ""
            ending.append(events.BudgetExceeded(reason=error.reason if error else None, message=message))
        ending.append(
            events.TaskEnd(
                status=result.status,
                cost_usd=result.usage.cost_usd,
                models=loop.state.models if loop is not None else [],
                iterations=result.iterations,
                usage=result.usage,
                timings=result.timings,
                error=result.error,
            )
        )
        taken = gate.unsettled() if gate is not None else None
        also = (taken.write,) if taken is not None else ()
        session = session_write(self.config, task, loop.state if loop is not None else None, result, interrupted)
        stored, _ = await self._store.write_result(result, events=ending, also=also, session=session)
        return stored

    async def _settle(self, tenant: str, gate: TaskGate | None) -> None:
        """Records the usage no write has recorded yet (a task that stops to wait for approval)."""
        taken = gate.unsettled() if gate is not None else None
        if taken is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._ledger.settle(tenant, None, taken.usage, taken.calls)

    def cancel(self, task_id: str, reason: str = "cancelled", interrupted: OnBusy | None = None) -> bool:
        """Stops the task's run here, if it runs here; it ends as `cancelled` with its work so
        far. `interrupted`: a later task of its session stops it (`OnBusy`), which decides
        what of its turn the session keeps."""
        loop = self._loops.get(task_id)
        if loop is None:
            return False
        if interrupted is None:
            return loop.cancel(reason)
        stopped = loop.cancel(reason, ErrorReason.INTERRUPTED)
        if stopped:  # read (and dropped) as the run ends
            self._interrupted[task_id] = interrupted
        return stopped

    def _allowed_tools(self, tenant: str, requested: list[str]) -> set[str]:
        policy = self.config.policy_for(tenant)
        allowed = set(requested) & set(self._tool_defs)
        if policy is not None and policy.allowed_tools is not None:
            allowed &= set(policy.allowed_tools)
        return allowed

    def pid(self) -> int:
        """This actor's process id (for operators, and the chaos tests that kill it)."""
        return os.getpid()

    def ping(self) -> int:
        return self.in_flight

    def backlog(self) -> dict[str, int]:
        """Redis writes this worker holds while Redis is away (see `ResultStore.backlog`)."""
        return self._store.backlog

    def node(self) -> str:
        """The id of the Ray node this worker runs on."""
        return ray.get_runtime_context().get_node_id()


def _provider_key(pool: str, namespace: str) -> SecretStr:
    """The pool's provider key, from Ray's internal store (`provider_key_name`)."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(provider_key_name(pool), namespace=namespace)
    if raw is None:  # the pool was terminated while this worker (re)started
        raise ConfigError(f"pool {pool!r} has no provider key in Ray's store: it is stopped or stopping")
    return SecretStr(raw.decode())
