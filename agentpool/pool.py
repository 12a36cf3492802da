"""`AgentPool`: the front door that starts (or finds) every part of a pool and submits work."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar, cast

import ray

from agentpool.actors.relay import CHUNK as RELAY_CHUNK
from agentpool.cluster.acl import display_url
from agentpool.cluster.completions import Completions
from agentpool.cluster.keys import Keys
from agentpool.cluster.reader import ResultsReader, find_tenant
from agentpool.cluster.redis_server import EmbeddedRedis
from agentpool.config import PoolConfig
from agentpool.errors import PoolNotRunning
from agentpool.events import EventEntry
from agentpool.launch import (
    NAMESPACE,
    kill_all,
    quiet_ray_init,
    stop_order,
    withdraw_provider_key,
)
from agentpool.launcher import Launcher
from agentpool.models import AgentResult, AgentTask, TaskState, validate_tasks
from agentpool.pool_agents import PoolAgents
from agentpool.pool_front import PoolFrontDoor
from agentpool.pool_life import PoolLife
from agentpool.pool_sessions import Sessions
from agentpool.pool_telemetry import PoolTelemetry
from agentpool.preflight import check_redis
from agentpool.protocol import pack
from agentpool.results import DrainReport
from agentpool.submission import session_order, trace_context, unresolved
from agentpool.views import redis_trouble

log = logging.getLogger("agentpool")
T = TypeVar("T")


def _read_events(reader: ResultsReader, task_id: str, after: str, follow: bool) -> Iterator[EventEntry]:
    try:
        yield from reader.events(task_id, after=after, follow=follow)
    finally:
        reader.close()


class AgentPool(PoolTelemetry, PoolFrontDoor, PoolAgents, PoolLife):
    """A running pool: a scheduler, agent workers, tool executors, Redis and a provider.

    Use `AgentPool.start(config)` to create one and `pool.shutdown()` to stop it.
    """

    def __init__(
        self,
        config: PoolConfig,
        *,
        scheduler: Any,
        redis_url: str,
        actors: list[Any],
        embedded_redis: EmbeddedRedis | None = None,
        started_ray: bool = False,
        simulator: Any = None,
        provider_url: str | None = None,
        actor_names: list[str] | None = None,
        owned: bool = True,
        tools: list[str] | None = None,
        relay: Any = None,
    ) -> None:
        self.config = config
        self._scheduler = scheduler
        #: Where `submit`'s calls wait (None: a pool without one; they wait in the scheduler).
        self._relay = relay
        #: This client's `submit` calls waiting at the scheduler itself (as many as
        #: `config.submit_direct_calls`), pruned of the resolved ones at each `submit`.
        self._direct: list[ray.ObjectRef] = []
        self._redis_url = redis_url
        self._actors = actors
        self._embedded_redis = embedded_redis
        self._started_ray = started_ray
        self._simulator = simulator
        self.provider_url = provider_url
        self._actor_names = actor_names or []
        self._owned = owned
        self._running = True
        #: The tools the pool's executors offer (None: not known, e.g. an older pool).
        self.tools = None if tools is None else frozenset(tools)

    # --- lifecycle -------------------------------------------------------------------

    @classmethod
    def start(cls, config: PoolConfig | None = None, *, detached: bool = False) -> AgentPool:
        """Starts a pool: Ray (joined or local), Redis (configured or embedded), the provider
        (Anthropic with a key, else the simulator), tool executors, workers and the scheduler.

        Args:
            config: The pool's configuration; `PoolConfig()` (from the environment) if None.
            detached: The pool outlives this process (its actors, and an embedded Redis, are
                detached actors of the cluster): attach again with `AgentPool.connect(name)`
                and stop it with `terminate()`. Needs a Ray cluster that outlives this
                process (`ray start --head`, `RAY_ADDRESS` or `PoolConfig.ray_address`).

        Raises:
            ConfigError: If a part cannot start (bad tool module, no redis-server, ...), or a
                detached pool would live in a Ray instance that dies with this process.
        """
        started = Launcher(config or PoolConfig(), detached=detached).run()
        return cls(
            started.config,
            scheduler=started.scheduler,
            redis_url=started.redis_url,
            actors=started.actors,
            embedded_redis=started.embedded_redis,
            started_ray=started.started_ray,
            simulator=started.simulator,
            provider_url=started.provider_url,
            actor_names=started.actor_names,
            tools=started.tools,
            relay=started.relay,
        )

    @classmethod
    def connect(cls, name: str = "agentpool", *, address: str | None = None) -> AgentPool:
        """Attaches to a pool already running on this Ray cluster, by its `PoolConfig.name`.

        `shutdown()` on the handle this returns only lets go of the pool; `terminate()` stops it.

        Raises:
            PoolNotRunning: If no scheduler of that name exists.
        """
        if not ray.is_initialized():
            quiet_ray_init(address or os.environ.get("RAY_ADDRESS") or "auto")
        try:
            scheduler = ray.get_actor(f"{name}-scheduler", namespace=NAMESPACE)
        except ValueError:
            raise PoolNotRunning(f"no pool named {name!r} is running on this cluster") from None
        info = cast(dict[str, Any], ray.get(scheduler.info.remote()))
        config = PoolConfig.model_validate(info["config"])
        check_redis(info["redis_url"], source=f"the Redis of pool {name!r}")
        simulator = relay = None
        if f"{name}-simulator" in info.get("actors", []):
            with contextlib.suppress(ValueError):
                simulator = ray.get_actor(f"{name}-simulator", namespace=NAMESPACE)
        with contextlib.suppress(ValueError):
            relay = ray.get_actor(f"{name}-relay", namespace=NAMESPACE)
        return cls(
            config,
            scheduler=scheduler,
            redis_url=info["redis_url"],
            actors=[],
            simulator=simulator,
            provider_url=info.get("provider_url"),
            actor_names=info.get("actors", []),
            owned=False,
            tools=info.get("tools"),
            relay=relay,
        )

    def terminate(self, grace_s: float | None = None) -> DrainReport | None:
        """Stops the pool's actors wherever they run (also a pool this handle only connected
        to), then lets go of it as `shutdown()` does (draining first, with `grace_s`)."""
        if not self._running:
            return None
        self._owned = True  # its actors are found by name
        return self.shutdown(grace_s)

    def shutdown(self, grace_s: float | None = None) -> DrainReport | None:
        """Stops the actors this pool started, its embedded Redis, and Ray if it started it.
        A handle from `connect()` only lets go of the pool (see `terminate`).

        With `grace_s`, drains first (`drain(grace_s)`: no new work, the running tasks given
        up to `grace_s` seconds to end) and returns its report. Tasks still running stay
        accepted (in Redis, with their checkpoints) for the next pool of this name on the
        same Redis; their refs raise a `ray.exceptions.RayError` (the call was cancelled).
        """
        if not self._running:
            return None
        report = self._drain_before_stop(grace_s) if grace_s is not None and self._owned else None
        self._running = False
        if not self._owned:
            return None
        self.flush_telemetry()
        self._withdraw_calls()
        # Callers before what they call: the scheduler (then it cannot start another worker),
        # the workers (those its autoscaler started too), the executors, then the limiter,
        # the tool board and the hosts. A process killed with calls still going out to
        # another makes Ray print one "task failed, will be retried" line per call.
        by_name = self._by_name()
        order = {name: stop_order(self.config.name, name) for name in by_name}
        first = [by_name[n] for n in by_name if order[n] == 0]
        kill_all(first)
        # Listed only now: a scheduler that is gone can start no other worker.
        workers = [*(by_name[n] for n in by_name if order[n] == 1), *self._added_workers()]
        kill_all(workers)
        kill_all([by_name[n] for n in sorted(by_name, key=order.__getitem__) if order[n] >= 2])
        if len(by_name) < len(self._actor_names):  # some not found by name: the handles this process holds
            kill_all(self._actors)
        withdraw_provider_key(self.config.name)
        if self._embedded_redis is not None:
            self._embedded_redis.stop()
        if self._started_ray:
            ray.shutdown()
        return report

    def _by_name(self) -> dict[str, Any]:
        """The pool's named actors that can still be found, by name."""
        found = {}
        for name in self._actor_names:
            with contextlib.suppress(Exception):
                found[name] = ray.get_actor(name, namespace=NAMESPACE)
        return found

    def _added_workers(self) -> list[Any]:
        """The workers the autoscaler started (detached, so they outlive a scheduler restart)."""
        from agentpool.scheduler.fleet import worker_actor_names

        handles = []
        for name in worker_actor_names(self.config, NAMESPACE):
            with contextlib.suppress(ValueError):
                handles.append(ray.get_actor(name, namespace=NAMESPACE))
        return handles

    def __enter__(self) -> AgentPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- work ------------------------------------------------------------------------

    def submit(self, tasks: Iterable[AgentTask | dict[str, Any]]) -> list[ray.ObjectRef]:
        """Submits tasks; returns one ref per task, in input order.

        Each ref resolves to that task's `AgentResult` as soon as the task ends; `ray.get`
        never raises for task-level outcomes (rejection, failure and timeout are statuses).
        Each ref is a call waiting in the pool, which costs Ray about 54 KB there (and about
        30 KB here, per ref) until it resolves: up to `PoolConfig.submit_direct_calls` (256)
        of this client's calls at a time wait at the scheduler, one hop shorter; the rest
        wait in the relay actor. For batches of hundreds of thousands of tasks, `map`
        (bounded memory everywhere) or `enqueue` cost far less.

        Raises:
            InvalidTaskInput: If a task is malformed, over a size bound, or names a tool
                this pool does not have (nothing is submitted then: the batch is validated
                before the first task is sent).
            PoolNotRunning: After `shutdown()`.
        """
        self._check_running()
        validated = validate_tasks(tasks, tools=self.tools)
        sent_before = session_order(validated)
        if self._relay is None:
            return [
                self._scheduler.run.remote(pack(t), trace_context(t), sent_before[i]) for i, t in enumerate(validated)
            ]
        # A few calls at a time wait at the scheduler (one hop less); the rest in the relay.
        # A session's tasks always go to the scheduler, each naming the one of its session
        # sent before it: they take their places in the session's line in the order given.
        # The relay's tasks go a chunk per call, and each ref is a call that names its task.
        self._direct = unresolved(self._direct)
        room = max(0, self.config.submit_direct_calls - len(self._direct))
        refs: list[ray.ObjectRef | None] = [None] * len(validated)
        relayed: list[int] = []
        for i, task in enumerate(validated):
            if i < room or task.session_id is not None:
                direct = self._scheduler.run.remote(pack(task), trace_context(task), sent_before[i])
                self._direct.append(direct)
                refs[i] = direct
            else:
                relayed.append(i)
        for start in range(0, len(relayed), RELAY_CHUNK):
            indexes = relayed[start : start + RELAY_CHUNK]
            part = [validated[i] for i in indexes]
            self._relay.accept.remote(part, [trace_context(t) for t in part])
            for i, task in zip(indexes, part, strict=True):
                refs[i] = self._relay.run.remote(task.task_id, task.tenant)
        return cast(list[ray.ObjectRef], refs)

    def _withdraw_calls(self, timeout_s: float = 5.0) -> None:
        """Has the relay and the scheduler answer every `run` call still waiting (the tasks
        stay accepted, in Redis): Ray prints a line for each call still going to an actor
        it stops."""
        waiters = [w for w in (self._relay, self._scheduler) if w is not None]
        with contextlib.suppress(Exception):
            ray.get([w.withdraw.remote() for w in waiters], timeout=timeout_s)

    def enqueue(self, tasks: Iterable[AgentTask | dict[str, Any]], *, chunk: int = 1000) -> list[dict[str, Any]]:
        """Submits tasks without refs to wait on (a detached submission): returns, per task in
        input order, `{"task_id", "status"}` with status `accepted`, or the final status it
        already has (`rejected` when shed, say). Results land in Redis (`results(tenant)`).
        An accepted task runs even if this process exits at once.

        Raises:
            InvalidTaskInput: If a task is malformed, over a size bound, or names a tool
                this pool does not have (nothing is sent).
            PoolNotRunning: After `shutdown()`.
        """
        self._check_running()
        validated = validate_tasks(tasks, tools=self.tools)
        # Every chunk's call at once: the scheduler admits them side by side.
        refs = [
            self._scheduler.enqueue.remote(part, [trace_context(t) for t in part])
            for part in (validated[i : i + chunk] for i in range(0, len(validated), chunk))
        ]
        return [reply for replies in ray.get(refs) for reply in replies]

    def map(
        self, tasks: Iterable[AgentTask | dict[str, Any]], *, window: int = 10_000, chunk: int = 1000
    ) -> Iterator[AgentResult]:
        """Runs tasks of a batch of any size and yields each `AgentResult` as its task ends
        (in the order they end, not input order).

        The input is read lazily, and at most `window` tasks are submitted and not yet
        yielded at any time, so memory stays bounded in every process whatever the batch's
        size: tasks go to the pool `chunk` at a time as detached submissions (no pending
        Ray call per task, as with `enqueue`), and their records are read from Redis as
        they are written. Stopping the iteration early leaves the tasks submitted running.

        Raises:
            InvalidTaskInput: If a task is malformed, over a size bound, or names a tool
                this pool does not have; raised when its chunk is reached (the chunks
                before it were submitted and run).
            PoolNotRunning: After `shutdown()`.
        """
        self._check_running()
        if window < 1 or chunk < 1:
            raise ValueError("window and chunk must be at least 1")
        source = iter(tasks)
        completions = Completions(self._redis_url, keys=Keys(self.config.key_prefix))
        try:
            exhausted = False
            while True:
                while not exhausted and len(completions) < window:
                    part = list(itertools.islice(source, min(chunk, window - len(completions))))
                    if not part:
                        exhausted = True
                        break
                    validated = validate_tasks(part, tools=self.tools)
                    completions.watch(validated)
                    replies = ray.get(self._scheduler.enqueue.remote(validated, [trace_context(t) for t in validated]))
                    yield from completions.fetch([r["task_id"] for r in replies if r["status"] != "accepted"])
                if exhausted and not len(completions):
                    return
                yield from completions.take(block_ms=1000)
        finally:
            completions.close()

    def cancel(self, task_id: str, *, reason: str = "cancelled by request") -> AgentResult | None:
        """Stops a queued, running or paused task: its permits and slot go back and its final
        record says `cancelled`, with the work done so far. Returns that record (or how the
        task ended, if it ended first or had ended already); None if the pool has no such task.

        Raises:
            StoreUnavailable: If the task is not in progress and Redis cannot be reached.
        """
        self._check_running()
        result: AgentResult | None = ray.get(self._scheduler.cancel.remote(task_id, reason))
        if result is None:  # not in progress: it may have ended already
            keys = Keys(self.config.key_prefix)
            tenant = find_tenant(self._redis_url, task_id, keys=keys)
            if tenant is not None:
                reader = ResultsReader(self._redis_url, tenant, keys=keys)
                try:
                    result = reader.get(task_id)
                finally:
                    reader.close()
        return result

    def approve(self, task_id: str, approved: bool = True, *, note: str = "") -> dict[str, Any]:
        """Decides on a task paused for approval (`@tool(requires_approval=True)`): approved,
        its tool calls run; denied, they return the denial (with `note`) to the model. The
        task resumes at once. Returns `{"task_id", "status"}`: `decided`, or
        `not_awaiting_approval`."""
        self._check_running()
        return dict(ray.get(self._scheduler.approve.remote(task_id, approved, note)))

    def pending_approvals(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's tasks waiting for approval: task_id, tools, arguments, deadline."""
        self._check_running()
        return list(ray.get(self._scheduler.pending_approvals.remote(tenant)))

    def get(self, task_id: str, *, tenant: str | None = None) -> TaskState | None:
        """Where the task stands now: `queued` (its place among its tenant's tasks and, while
        the scheduler holds it, its predicted start), `running` or `awaiting_approval` (the
        attempt, LLM turns and usage so far; the approval asked for), or `finished` (its
        final record). None if the pool knows no such task. Without `tenant`, a task the
        scheduler does not hold is looked for by a SCAN of Redis (give `tenant` to skip it).

        Raises:
            StoreUnavailable: If Redis is needed and cannot be reached.
        """
        self._check_running()
        state: TaskState | None = ray.get(self._scheduler.where.remote(task_id, tenant))
        if state is None and tenant is None:
            owner = find_tenant(self._redis_url, task_id, keys=Keys(self.config.key_prefix))
            if owner is not None:
                state = ray.get(self._scheduler.where.remote(task_id, owner))
        return state

    def events(
        self, task_id: str, *, tenant: str | None = None, after: str = "0-0", follow: bool = True
    ) -> Iterator[EventEntry]:
        """The task's events, oldest first, from after stream id `after` (each entry's `id`:
        resume where a reader stopped); with `follow`, live until the task has ended and its
        last event was given. Empty if the pool knows no such task.

        Raises:
            StoreUnavailable: If Redis cannot be reached.
        """
        self._check_running()
        if tenant is None:
            state = self.get(task_id)
            if state is None:
                return iter(())
            tenant = state.tenant
        return _read_events(
            ResultsReader(self._redis_url, tenant, keys=Keys(self.config.key_prefix)), task_id, after, follow
        )

    def run(self, tasks: Iterable[AgentTask | dict[str, Any]]) -> list[AgentResult]:
        """Submits tasks and waits for all their results (`ray.get(pool.submit(tasks))`)."""
        return list(ray.get(self.submit(tasks)))

    @property
    def sessions(self) -> Sessions:
        """The tenants' sessions: `export`, `list`, `delete`, `delete_all` (`Sessions`)."""
        return Sessions(self.config, self._redis_url, self._scheduler, self._check_running)

    def results(self, tenant: str) -> ResultsReader:
        """A reader over the tenant's results stream in Redis (`read()`, `follow()`, `get()`)."""
        return ResultsReader(self._redis_url, tenant, keys=Keys(self.config.key_prefix))

    def status(self) -> dict[str, Any]:
        """The pool's live state, from the scheduler and the rate limiter.

        Keys: `queued` and `queued_by_tenant` (tenant -> priority -> count), `in_flight` and
        `in_flight_by_tenant`, `capacity`, `finished_by_status`, `shed_by_reason`,
        `overload_level`, `finished_by_tenant` (tenant -> status -> count), `errors_by_tenant`,
        `alerts_firing`, `limits` (bucket levels per model and dimension, leases outstanding
        and waiting), `tools` (breakers and outcomes), `budgets_today` (tokens and cost
        spent today per tenant) and `redis` (whether it answers, and the records and events
        waiting in memory while it does not; a warning is logged then).
        """
        self._check_running()
        snapshot = dict(ray.get(self._scheduler.status.remote()))
        trouble = redis_trouble(snapshot)
        if trouble is not None:
            log.warning("Redis at %s: %s", display_url(self._redis_url), trouble)
        return snapshot

    def simulator_stats(self) -> dict[str, Any] | None:
        """The simulated provider's counters (requests, statuses, 429s), if it is in use."""
        return ray.get(self._simulator.stats.remote()) if self._simulator is not None else None

    @property
    def redis_url(self) -> str:
        return self._redis_url

    def _check_running(self) -> None:
        if not self._running:
            raise PoolNotRunning("this pool has been shut down")
