"""`Launcher`: starts a pool's parts in order, one method per part, and stops those already
started if a later one fails. `AgentPool.start` runs it; `agentpool.launch` holds the Ray
options and helpers it uses."""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from pydantic import SecretStr

from agentpool.cluster.redis_server import EmbeddedRedis
from agentpool.cluster.telemetry import TelemetryConfigError, check_env
from agentpool.config import PoolConfig
from agentpool.errors import ConfigError
from agentpool.launch import (
    NAMESPACE,
    SIMULATOR_KEY,
    actor_class,
    control,
    hand_over_provider_key,
    init_ray,
    ray_auth_enabled,
    start_executor_group,
    withdraw_provider_key,
    worker_spawn,
)
from agentpool.preflight import check_name_free, check_redis, first_line, name_taken, tools_as_actors_see_them
from agentpool.protocol import WorkerSpawn

log = logging.getLogger("agentpool")


@dataclass
class Started:
    """What a launch left running: everything an `AgentPool` handle needs."""

    config: PoolConfig
    scheduler: Any
    redis_url: str
    actors: list[Any]
    embedded_redis: EmbeddedRedis | None
    started_ray: bool
    simulator: Any
    provider_url: str | None
    actor_names: list[str]
    tools: list[str]
    relay: Any


@dataclass
class _Tools:
    catalog: dict[str, dict[str, Any]]
    executor_names: dict[str, list[str]]
    board_name: str


class Launcher:
    """One launch of a pool: `run()` checks what can be checked before any actor starts,
    then starts Redis, the simulator, the tool executors and board, the rate limiter, the
    agent workers and the scheduler, in that order."""

    def __init__(self, config: PoolConfig, *, detached: bool) -> None:
        self.config = config
        self.detached = detached
        self.lifetime: dict[str, Any] = {"lifetime": "detached"} if detached else {}
        self.actors: list[Any] = []
        self.names: list[str] = []
        self.embedded: EmbeddedRedis | None = None
        self.started_ray = False

    def run(self) -> Started:
        """Starts the pool.

        Raises:
            ConfigError: If a part cannot start (bad tool module, no redis-server, ...), or a
                detached pool would live in a Ray instance that dies with this process.
        """
        uses_simulator = self.config.uses_simulator
        catalog_here = self.preflight()
        self.join_ray()
        api_key = self.config.anthropic_api_key or SecretStr(SIMULATOR_KEY)
        self.config = self.config.for_actors()  # the key goes to the workers only (hand_over)
        try:
            redis_url = self.redis()
            simulator = self.simulator() if uses_simulator else None
            tools, provider_url = self.tools(simulator, catalog_here)
            limiter_name = self.limiter()
            hand_over_provider_key(self.config.name, api_key)
            spawn = worker_spawn(
                self.config,
                redis_url=redis_url,
                base_url=provider_url,
                tool_catalog=tools.catalog,
                executor_names=tools.executor_names,
                limiter_name=limiter_name,
                board_name=tools.board_name,
            )
            workers, worker_names = self.workers(spawn)
            scheduler = self.scheduler(redis_url, spawn, worker_names, tools, limiter_name, provider_url)
            relay = self.relay(redis_url)
            deliverers = self.webhooks(redis_url)
            ray.get(
                [
                    scheduler.status.remote(),
                    relay.waiting.remote(),
                    *(d.stats.remote() for d in deliverers),
                    *(w.ping.remote() for w in workers),
                ]
            )
        except BaseException as exc:
            self.abort()
            if isinstance(exc, ValueError) and "already taken" in str(exc):
                raise ConfigError(name_taken(self.config.name)) from None
            raise
        return Started(
            config=self.config,
            scheduler=scheduler,
            redis_url=redis_url,
            actors=self.actors,
            embedded_redis=self.embedded,
            started_ray=self.started_ray,
            simulator=simulator,
            provider_url=provider_url,
            actor_names=self.names,
            tools=list(tools.catalog),
            relay=relay,
        )

    def preflight(self) -> dict[str, Any]:
        """Everything that can be checked before a single actor starts; returns the tools as
        this process finds them (the executors must find the same)."""
        try:
            check_env()
        except TelemetryConfigError as exc:
            raise ConfigError(str(exc)) from None
        catalog_here = tools_as_actors_see_them(self.config.all_tool_modules)
        if self.config.redis_url is not None:
            check_redis(self.config.redis_url, source="AGENTPOOL_REDIS_URL (PoolConfig.redis_url)")
        return catalog_here

    def join_ray(self) -> None:
        """Joins (or starts) Ray, refusing a cluster without token auth unless told, and a
        name another pool holds."""
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            init_ray(self.config, detached=self.detached)
        try:
            if self.config.require_ray_auth and not ray_auth_enabled():
                raise ConfigError(
                    "the Ray cluster runs without token authentication: anyone who reaches it runs code in it "
                    "(and reads the provider key). Start it with RAY_AUTH_MODE=token, or set "
                    "PoolConfig.require_ray_auth=False for a cluster on an isolated network"
                )
            check_name_free(self.config.name)
        except ConfigError:
            if self.started_ray:
                ray.shutdown()
            raise

    def _host(self) -> dict[str, Any]:
        # The simulator and Redis hosts go where the control plane goes (`control_resources`),
        # never onto a worker node that may go away. Not restarted: a new one has a new port.
        return {
            **control(self.config),
            "max_restarts": 0,
            "max_task_retries": 0,
            "namespace": NAMESPACE,
            **self.lifetime,
        }

    def redis(self) -> str:
        """The configured Redis, or one of our own: a detached actor's for a detached pool (it
        must outlive this process), else embedded in this process."""
        from agentpool.cluster.redis_host import RedisHost

        if self.config.redis_url is not None:
            return self.config.redis_url
        if self.detached:
            name = f"{self.config.name}-redis"
            host = actor_class(RedisHost).options(**self._host(), name=name).remote()
            self._started(host, name)
            url: str = ray.get(host.start.remote())
            return url
        self.embedded = EmbeddedRedis()
        return self.embedded.start()

    def simulator(self) -> Any:
        """The simulated provider's host actor (its server starts with the executors)."""
        from agentpool.actors.simulator_host import SimulatorHost

        name = f"{self.config.name}-simulator"
        host = actor_class(SimulatorHost).options(**self._host(), name=name).remote(self.config.simulator)
        self._started(host, name)
        return host

    def tools(self, simulator: Any, catalog_here: dict[str, Any]) -> tuple[_Tools, str | None]:
        """The tool executors, group by group, and the tool board; returns them and the
        provider's URL (the simulator's, once it is up)."""
        from agentpool.actors.tool_board import ToolBoard

        config = self.config
        # The default group first: its catalog says which other groups the tools ask for.
        # Its processes start while the simulator's does.
        default_names, default_group = start_executor_group(config, "default", self.actors, self.lifetime)
        provider_url = config.anthropic_base_url
        if simulator is not None:
            provider_url = ray.get(simulator.start.remote())
        try:
            catalog: dict[str, dict[str, Any]] = ray.get(default_group[0].catalog.remote())
        except ray.exceptions.RayActorError as exc:
            raise ConfigError(f"tool executors could not start: {first_line(exc)}") from None
        if set(catalog) != set(catalog_here):  # the executors import the same modules elsewhere
            log.warning(
                "the tool executors found tools %s, this process %s",
                sorted(set(catalog) - set(catalog_here)),
                sorted(set(catalog_here) - set(catalog)),
            )
        executor_names = {"default": default_names}
        for group in sorted({entry["group"] for entry in catalog.values()} - {"default"}):
            executor_names[group], _ = start_executor_group(config, group, self.actors, self.lifetime)
        self.names += [n for group in executor_names.values() for n in group]
        board_name = f"{config.name}-tools"
        options = {**control(config), "name": board_name, "namespace": NAMESPACE, **self.lifetime}
        board = actor_class(ToolBoard).options(**options).remote(catalog, config.breaker.model_dump())
        self._started(board, board_name)
        return _Tools(catalog, executor_names, board_name), provider_url

    def limiter(self) -> str:
        """The rate limiter. Every LLM attempt of every worker waits here: its concurrency is
        bounded only by the attempts that can be in flight at once."""
        from agentpool.scheduler.limiter import RateLimiter

        config = self.config
        name = f"{config.name}-limiter"
        concurrency = config.worker_concurrency * config.max_workers * 2 + 100
        options = {**control(config), "name": name, "namespace": NAMESPACE, "max_concurrency": concurrency}
        self._started(actor_class(RateLimiter).options(**options, **self.lifetime).remote(config), name)
        return name

    def workers(self, spawn: WorkerSpawn) -> tuple[list[Any], list[str]]:
        """The first agent workers (the scheduler's autoscaler adds more with `spawn`)."""
        names = [self.config.worker_name(i) for i in range(self.config.initial_workers)]
        workers = [spawn.launch(n, **self.lifetime) for n in names]
        for worker, name in zip(workers, names, strict=True):
            self._started(worker, name)
        return workers, names

    def scheduler(
        self,
        redis_url: str,
        spawn: WorkerSpawn,
        worker_names: list[str],
        tools: _Tools,
        limiter_name: str,
        provider_url: str | None,
    ) -> Any:
        """The scheduler, last: it dispatches to everything above. It also answers `connect`
        with what this launch started (`extra_info`)."""
        from agentpool.scheduler.scheduler import Scheduler

        config = self.config
        name = f"{config.name}-scheduler"
        # The relay and the webhook deliverers start next: named here, since the scheduler
        # takes the list now (what `connect` hands to `terminate`, which stops them by name).
        self.names += [name, f"{config.name}-relay", *_deliverer_names(config)]
        # Room for every `run` call waiting on its task: a call beyond it waits in Ray's queue.
        concurrency = max(1000, min(config.max_queued, 100_000) + config.worker_concurrency * config.max_workers + 100)
        options = {**control(config), "name": name, "namespace": NAMESPACE, "max_concurrency": concurrency}
        scheduler = (
            actor_class(Scheduler)
            .options(**options, **self.lifetime)
            .remote(
                config,
                redis_url=redis_url,
                worker_names=worker_names,
                worker_spawn=spawn,
                namespace=NAMESPACE,
                tool_names=list(tools.catalog),
                limiter_name=limiter_name,
                board_name=tools.board_name,
                extra_info={
                    "actors": self.names,
                    # This start of the pool (a drain noted in Redis holds within it only).
                    "launch": uuid.uuid4().hex,
                    "detached": self.detached,
                    "provider_url": provider_url,
                    "tools": list(tools.catalog),
                },
            )
        )
        self.actors.append(scheduler)
        return scheduler

    def relay(self, redis_url: str) -> Any:
        """The relay, where the calls of `AgentPool.submit` wait for their tasks' records
        (so that the scheduler holds none): room for as many as the pool may queue."""
        from agentpool.actors.relay import Relay

        config = self.config
        concurrency = max(1000, min(config.max_queued, 1_000_000) + config.worker_concurrency * config.max_workers)
        options = {
            **control(config),
            "name": f"{config.name}-relay",
            "namespace": NAMESPACE,
            "max_concurrency": concurrency,
        }
        relay = (
            actor_class(Relay)
            .options(**options, **self.lifetime)
            .remote(f"{config.name}-scheduler", NAMESPACE, redis_url, config.key_prefix)
        )
        self.actors.append(relay)
        return relay

    def webhooks(self, redis_url: str) -> list[Any]:
        """The webhook deliverers: they send the tenants' webhooks, apart from the workers."""
        from agentpool.actors.webhook_deliverer import WebhookDeliverer

        config = self.config
        started = []
        for index, name in enumerate(_deliverer_names(config)):  # named already (`scheduler`)
            options = {**control(config), "name": name, "namespace": NAMESPACE, "max_concurrency": 1000}
            deliverer = (
                actor_class(WebhookDeliverer).options(**options, **self.lifetime).remote(config, redis_url, index)
            )
            self.actors.append(deliverer)
            started.append(deliverer)
        return started

    def abort(self) -> None:
        """Stops what this launch started: its actors, its embedded Redis, the key it left
        for the workers, and Ray if it started it."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        withdraw_provider_key(self.config.name)
        if self.embedded is not None:
            self.embedded.stop()
        if self.started_ray:
            ray.shutdown()

    def _started(self, actor: Any, name: str) -> None:
        self.actors.append(actor)
        self.names.append(name)


def _deliverer_names(config: PoolConfig) -> list[str]:
    return [f"{config.name}-webhooks-{index}" for index in range(config.webhooks.deliverers)]
