"""How a pool's actors are launched: their Ray options (CPU priority, restarts, placement,
the telemetry variables they inherit) and the tool-executor groups. `AgentPool.start` and
the scheduler's autoscaler start actors from these."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

from pydantic import SecretStr

from agentpool.cluster.telemetry import exported_env
from agentpool.config import PoolConfig
from agentpool.errors import ConfigError
from agentpool.protocol import WorkerSpawn, provider_key_name

NAMESPACE = "agentpool"


def actor_class(cls: type) -> Any:
    """A class decorated with `@ray.remote`, as what Ray made of it. mypy keeps a decorated
    class as the plain class, which has no `.options`; and Ray's own `ActorClass` types a
    handle's methods as the plain methods, with no `.remote`. Handles are therefore `Any`."""
    return cast(Any, cls)


#: Ray starts its worker processes at niceness 15. A local Ray this package starts
#: (`start_local_ray`) starts them at 0, where the pool's control plane runs, and says so in
#: Ray's store under this key: the pool's actors then start without a runtime env, which
#: doubles the time a process takes to start (a pool starts in about 7 s instead of 9).
_NICENESS_KEY = "agentpool:worker-niceness"
#: Ray's own default (`worker_niceness`), for a cluster that does not say otherwise.
RAY_WORKER_NICENESS = 15


def start_local_ray(**options: Any) -> None:
    """Starts a new local Ray whose worker processes run at niceness 0 (see `actor_env`).
    `options` go to `ray.init` (never an address: this starts a cluster, it joins none)."""
    import ray
    from ray.experimental import internal_kv

    ray.init(address="local", _system_config={"worker_niceness": 0}, **options)
    internal_kv._internal_kv_put(_NICENESS_KEY, "0", overwrite=True, namespace=NAMESPACE)


def base_niceness() -> int:
    """The niceness the connected cluster starts worker processes at."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(_NICENESS_KEY, namespace=NAMESPACE)
    return int(raw) if raw is not None else RAY_WORKER_NICENESS


def actor_env(level: int) -> dict[str, Any]:
    """An actor's runtime env: the `OTEL_*` variables of the process starting the pool, so
    every actor exports as it was told, and this CPU priority if it is below the cluster's
    (Ray applies it as the process starts; raising it needs no privilege, and actors that
    want more niceness take it themselves, `raise_niceness`). Empty when neither applies, so
    the process starts as fast as Ray starts one."""
    env = exported_env()
    if level < base_niceness():
        env = {"RAY_worker_niceness": str(level), **env}
    return {"env_vars": env} if env else {}


#: Our actors wait on I/O, not on CPU: they reserve none, so a 2-core machine can hold the
#: scheduler, the workers, the executors and the simulator at once. They are the pool's
#: control plane and run at niceness 0, where Ray puts its own processes, not at the 15 Ray
#: gives workers: a process Ray starts (for a tool executor being replaced, say) spends its
#: first second at 0, and at 15 the agent loops would get a few percent of a core meanwhile.
ACTOR_OPTIONS: dict[str, Any] = {
    "num_cpus": 0,
    "max_restarts": -1,
    "max_task_retries": -1,
}


def control(config: PoolConfig) -> dict[str, Any]:
    """Options of the pool's control actors (scheduler, limiter, tool board)."""
    return {**ACTOR_OPTIONS, "runtime_env": actor_env(0), "resources": dict(config.placement.control_resources)}


def worker_spawn(config: PoolConfig, **kwargs: Any) -> WorkerSpawn:
    """How to start an agent worker: the pool starts the first ones and the scheduler's
    autoscaler more (`spawn.launch(name)`)."""
    # No re-sending by Ray (`max_task_retries=0`): when a worker dies the scheduler sends its
    # tasks to another worker at once, where they resume from their checkpoints.
    options: dict[str, Any] = {
        **ACTOR_OPTIONS,
        "runtime_env": actor_env(0),
        "max_task_retries": 0,
        "max_concurrency": config.worker_concurrency + 8,
        "namespace": NAMESPACE,
        "resources": dict(config.placement.worker_resources),
    }
    if config.placement.spread_workers:
        options["scheduling_strategy"] = "SPREAD"
    return WorkerSpawn(start_worker, options, {"config": config, "namespace": NAMESPACE, **kwargs})


def hand_over_provider_key(pool: str, key: SecretStr) -> None:
    """Leaves the provider key where only the pool's agent workers read it
    (`agentpool.protocol.provider_key_name`). Ray keeps an actor's constructor arguments for
    its restarts in the same store, so this adds no copy: it takes the key out of the
    arguments, and out of the scheduler, which starts workers but never calls the provider."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(provider_key_name(pool), key.get_secret_value(), overwrite=True, namespace=NAMESPACE)


def withdraw_provider_key(pool: str) -> None:
    from ray.experimental import internal_kv

    with contextlib.suppress(Exception):  # Ray already gone: so is its store
        internal_kv._internal_kv_del(provider_key_name(pool), namespace=NAMESPACE)


def start_worker(spawn: WorkerSpawn, name: str, extra: dict[str, Any]) -> Any:
    """Starts the agent worker `name` as `spawn` says (`WorkerSpawn.start`)."""
    from agentpool.actors.worker import AgentWorker

    return actor_class(AgentWorker).options(**spawn.options, **extra, name=name).remote(**spawn.kwargs)


# Placeholder credential for the bundled simulator; it accepts any key and this is not secret.
SIMULATOR_KEY = "sim-local-no-secret"


class _DropTokenAuthNotice(logging.Filter):
    """Drops Ray's notice that it turned token authentication on: the pool requires it, and
    the notice's advice (`RAY_AUTH_MODE=disabled`) would make the pool refuse to start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def _without_token_notice() -> Iterator[None]:
    quiet = _DropTokenAuthNotice()
    logging.getLogger(_TOKEN_LOGGER).addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger(_TOKEN_LOGGER).removeFilter(quiet)


def local_cluster_address() -> str | None:
    """The address of a cluster `ray start --head` runs on this machine, or None."""
    try:
        from ray._private.services import find_bootstrap_address, find_gcs_addresses
    except ImportError:  # a Ray without these helpers: only RAY_ADDRESS finds a cluster
        return None
    found = find_bootstrap_address(None)
    if found is None:
        running = find_gcs_addresses()
        found = next(iter(running)) if len(running) == 1 else None
    return found


def init_ray(config: PoolConfig, *, detached: bool) -> None:
    """Connects this process to Ray: the configured cluster, or a new local one (or the one
    `ray start` runs here, which `ray.init()` joins by itself).

    A detached pool must live in a cluster that outlives this process: RAY_ADDRESS,
    `PoolConfig.ray_address`, or the cluster `ray start --head` runs on this machine.

    Raises:
        ConfigError: If a detached pool has no such cluster.
    """
    import ray

    address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address is None and detached:
        address = local_cluster_address()
        if address is None:
            raise ConfigError(
                "a detached pool needs a Ray cluster that outlives this process: run `ray start --head` "
                "(found on this machine by itself), or set RAY_ADDRESS (or PoolConfig.ray_address)"
            )
    options: dict[str, Any] = {"include_dashboard": config.dashboard}
    if config.dashboard:
        options["dashboard_host"] = config.dashboard_host
    if address not in (None, "local"):
        options = {}  # a cluster's dashboard is its own: `ray start --dashboard-host`
    quiet: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False, "configure_logging": False}
    with _without_token_notice():
        if address == "local" or (address is None and local_cluster_address() is None):
            start_local_ray(**quiet, **options)
        else:
            ray.init(address=address, **quiet, **options)


def quiet_ray_init(address: str) -> None:
    """Joins a running cluster for a client of a pool (connect, the CLI), without Ray's
    log lines on this process's terminal."""
    import ray

    with _without_token_notice():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)


def ray_auth_enabled() -> bool:
    """Whether this process talks to Ray with token authentication (`RAY_AUTH_MODE=token`;
    a local `ray.init()` turns it on unless the variable says otherwise)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # a Ray without the helper: the variable is the setting
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return bool(is_token_auth_enabled())


def start_executor_group(
    config: PoolConfig, group: str, actors: list[Any], lifetime: dict[str, Any]
) -> tuple[list[str], list[Any]]:
    """Starts one executor group's actors. Ray restarts a dead executor but never re-sends
    its calls by itself (`max_task_retries=0`): the worker decides what may run again."""
    from agentpool.actors.tool_executor import ToolExecutor

    shape = config.executor_group(group)
    names = [f"{config.name}-tools-{group}-{i}" for i in range(shape.executors)]
    handles = [
        actor_class(ToolExecutor)
        .options(
            **{**ACTOR_OPTIONS, "max_task_retries": 0, "runtime_env": actor_env(shape.niceness)},
            resources=dict(config.placement.executor_resources),
            name=name,
            max_concurrency=shape.concurrency + 8,
            namespace=NAMESPACE,
            **lifetime,
        )
        .remote(
            config.all_tool_modules,
            config.tool_output_max_chars,
            group=group,
            threads=shape.concurrency,
            max_stuck_threads=shape.max_stuck_threads,
            bulkhead_wait_s=config.bulkhead_wait_s,
            isolation=shape.isolation,
            niceness=shape.niceness,
        )
        for name in names
    ]
    actors.extend(handles)
    return names, handles


def stop_order(pool: str, name: str) -> int:
    """When the actor `name` of `pool` stops at shutdown: callers first (see `AgentPool.shutdown`)."""
    role = name.removeprefix(f"{pool}-")
    if role in ("relay", "scheduler"):
        return 0
    if role.startswith("worker-"):
        return 1
    if role.startswith("tools-"):  # an executor group's actors
        return 2
    if role in ("tools", "limiter") or role.startswith("webhooks-"):
        return 3
    return 4  # the simulator and Redis hosts


#: How long `kill_all` waits for the actors it stops to be gone.
KILL_WAIT_S = 10.0


def kill_all(actors: Iterable[Any], wait_s: float = KILL_WAIT_S) -> None:
    """Stops each actor for good (one already gone is skipped), and returns once Ray has
    them dead, or after `wait_s`. `ray.kill` only asks: a worker still running a task for
    a moment after it returned could end that task after the pool said it stopped (and a
    drained pool's next one would find the task done by the old one, not resumed)."""
    import ray

    stopping = []
    for actor in actors:
        with contextlib.suppress(Exception):  # already gone: nothing left to stop
            ray.kill(actor, no_restart=True)
            stopping.append(actor)
    deadline = time.monotonic() + wait_s
    for actor in stopping:
        while time.monotonic() < deadline:
            try:
                # Not re-sent (the control actors' calls are, forever): a dead actor fails it.
                probe = actor.__ray_ready__.options(max_task_retries=0).remote()
                ray.get(probe, timeout=max(0.01, deadline - time.monotonic()))
            except Exception:  # ActorDiedError once Ray has it dead; or no answer within the wait
                break
            time.sleep(0.01)
