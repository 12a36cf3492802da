"""How a pool's actors are launched: their Ray options (CPU priority, restarts, placement,
the telemetry variables they inherit) and the tool-executor groups. `AgentPool.start` and
the scheduler's autoscaler start actors from these."""

from __future__ import annotations

import os
from typing import Any

from agentpool.config import PoolConfig
from cluster.telemetry import exported_env

NAMESPACE = "agentpool"


def actor_env(level: int) -> dict[str, Any]:
    """An actor's runtime env: this CPU priority (Ray applies it at start), and the `OTEL_*`
    variables of the process starting the pool, so every actor exports as it was told."""
    return {"env_vars": {"RAY_worker_niceness": str(level), **exported_env()}}


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


def worker_spawn(config: PoolConfig, **kwargs: Any) -> dict[str, Any]:
    """How to start an agent worker, as plain data: the pool starts the first ones and the
    scheduler's autoscaler more (`AgentWorker.options(**options, name=...).remote(**kwargs)`)."""
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
    return {"options": options, "kwargs": {"config": config, "namespace": NAMESPACE, **kwargs}}


# Placeholder credential for the bundled simulator; it accepts any key and this is not secret.
SIMULATOR_KEY = "sim-local-no-secret"


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
    from actors.tool_executor import ToolExecutor

    shape = config.executor_group(group)
    names = [f"{config.name}-tools-{group}-{i}" for i in range(shape.executors)]
    handles = [
        ToolExecutor.options(
            **{**ACTOR_OPTIONS, "max_task_retries": 0, "runtime_env": actor_env(shape.niceness)},
            resources=dict(config.placement.executor_resources),
            name=name,
            max_concurrency=shape.concurrency + 8,
            namespace=NAMESPACE,
            **lifetime,
        ).remote(
            config.all_tool_modules,
            config.tool_output_max_chars,
            group=group,
            threads=shape.concurrency,
            max_stuck_threads=shape.max_stuck_threads,
            bulkhead_wait_s=config.bulkhead_wait_s,
            isolation=shape.isolation,
        )
        for name in names
    ]
    actors.extend(handles)
    return names, handles
