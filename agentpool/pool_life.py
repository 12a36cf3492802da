"""The pool handle's life-cycle side: draining before a stop or an upgrade, and changing the
configuration of a running pool (a mixin of `AgentPool`, kept apart for size)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import ray

from agentpool.results import DrainReport

if TYPE_CHECKING:
    from agentpool.config import PoolConfig

log = logging.getLogger("agentpool")

#: How long past its grace period a drain's answer may take before the call gives up.
_DRAIN_SLACK_S = 30.0
#: How long a restarted actor may take to answer from its new process.
_RESTART_S = 60.0


class PoolLife:
    """`drain`, `undrain` and `update_config`; `shutdown(grace_s=...)` drains first
    (`_drain_before_stop`)."""

    config: PoolConfig
    _scheduler: Any

    if TYPE_CHECKING:

        def _check_running(self) -> None: ...
        def _by_name(self) -> dict[str, Any]: ...

    def drain(self, grace_s: float = 30.0) -> DrainReport:
        """Stops the pool taking work and waits up to `grace_s` seconds for the running tasks
        to end. From now on no queued task starts, and new work is rejected at once
        (`status="rejected"`, reason `draining`, with `retry_after_s` past the grace period),
        except batch work handed over without a ref (`enqueue`, `map`), which waits in the
        Redis backlog; until `undrain()` or the pool stops. Nothing is lost: queued work
        stays in the Redis backlog and a task still running at the end resumes from its
        last checkpoint, both taken up by the next pool of this name on the same Redis.

        Returns:
            What ended during the drain and what is left (`DrainReport`).
        """
        if grace_s < 0:
            raise ValueError(f"grace_s must be at least 0, not {grace_s}")
        self._check_running()
        answer = ray.get(self._scheduler.drain.remote(float(grace_s)), timeout=grace_s + _DRAIN_SLACK_S)
        report = DrainReport.model_validate(answer)
        log.info(
            "pool %s drained in %.1fs: %d ended, %d still running, %d queued",
            self.config.name,
            report.elapsed_s,
            report.finished,
            len(report.running),
            report.queued,
        )
        return report

    def update_config(self, **changes: Any) -> dict[str, Any]:
        """Changes the running pool's tenant policies and limits without a restart: any of
        `LIVE_FIELDS` (`tenants`, `default_tenant_policy`, `strict_tenants`, `limits`,
        `max_queued`), each replacing the field's whole value. Admission, fair shares and
        caps apply it from the next decision, the rate limits' buckets keep their levels,
        tasks that start from now on run on it, and Redis keeps it, so a process that
        restarts (or a new worker) takes it up too.

        Returns:
            `{"version", "changed", "limiter", "workers"}`: the change's version, the fields
            it changed, whether the limiter confirmed it, and how many workers did.

        Raises:
            InvalidConfig: If a field is not a live one or a value is not valid (nothing changes).
        """
        self._check_running()
        config = self.config.with_live(changes)
        live = config.live_fields()
        answer: dict[str, Any] = ray.get(self._scheduler.update_config.remote({k: live[k] for k in changes}))
        self.config = config
        return answer

    def upgrade(self, grace_s: float = 30.0) -> dict[str, Any]:
        """Restarts every process of the running pool in turn, without stopping it, so that
        it runs the code and tool modules installed now (a new release on every node):

        1. the agent workers, one at a time: each takes no new task, its running ones get up
           to `grace_s` to end, then its process starts again (a task that outlasts the
           grace period is sent to another worker and resumes from its checkpoint);
        2. the tool executors, one at a time: each refuses new calls (they go to another
           executor, or wait for its successor) and finishes the running ones;
        3. the control plane: the limiter, the tool board, the webhook deliverers, the relay,
           and the scheduler last (it takes up its backlog from Redis again).

        No accepted task is lost or gets two records. Tenant policies and limits change with
        `update_config`, no upgrade needed; other configuration changes need a new pool
        (`shutdown(grace_s=...)`, then `AgentPool.start` on the same Redis).

        Returns:
            `{"workers", "executors", "control", "elapsed_s"}`: per process, its name and
            new pid (and, for a worker, how long its drain and restart took and the tasks
            that outlasted its grace period).
        """
        self._check_running()
        began = time.monotonic()
        workers = ray.get(self._scheduler.restart_workers.remote(float(grace_s)))
        by_name = self._by_name()
        prefix = f"{self.config.name}-"
        executors = [
            {"name": name, "pid": _restarted(handle, handle.replace.remote, grace_s)}
            for name, handle in sorted(by_name.items())
            if name.removeprefix(prefix).startswith("tools-")
        ]
        control = []
        for role in ("limiter", "tools", "webhooks-", "relay", "scheduler"):
            for name, handle in sorted(by_name.items()):
                own = name.removeprefix(prefix)
                if own == role or (role.endswith("-") and own.startswith(role)):
                    control.append({"name": name, "pid": _restarted(handle, None, grace_s)})
        report = {"workers": workers, "executors": executors, "control": control}
        log.info("pool %s upgraded in %.1fs", self.config.name, time.monotonic() - began)
        return {**report, "elapsed_s": round(time.monotonic() - began, 3)}

    def undrain(self) -> bool:
        """Takes work again after `drain()` (queued work starts); False if it was not draining."""
        self._check_running()
        return bool(ray.get(self._scheduler.undrain.remote()))

    def _drain_before_stop(self, grace_s: float) -> DrainReport | None:
        """`drain(grace_s)` before a stop, which goes on whatever happens to the drain. Work
        left in an embedded Redis (it stops with the pool) is lost: said in a warning."""
        try:
            report = self.drain(grace_s)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.warning("pool %s: the drain before stopping failed (%s)", self.config.name, exc)
            return None
        if self.config.redis_url is None and (report.queued or report.running):
            log.warning(
                "pool %s: %d queued and %d running task(s) are left in its embedded Redis, which stops "
                "with it: they are lost (a pool on a Redis of its own, AGENTPOOL_REDIS_URL, keeps them)",
                self.config.name,
                report.queued,
                len(report.running),
            )
        return report


def _restarted(handle: Any, leave: Any, grace_s: float) -> int:
    """Restarts one actor of the pool and waits for its new process; its pid. `leave` sends
    the call that has it leave by itself (an executor's `replace`); without one, it is
    killed and Ray starts it again (calls on their way to it are sent again)."""
    before = int(ray.get(handle.pid.remote(), timeout=_RESTART_S))
    if leave is not None:
        ray.get(leave(), timeout=_RESTART_S)
    else:
        ray.kill(handle, no_restart=False)
    deadline = time.monotonic() + grace_s + _RESTART_S
    while time.monotonic() < deadline:
        try:
            pid = int(ray.get(handle.pid.remote(), timeout=5.0))
        except (ray.exceptions.RayError, TimeoutError):
            pid = before
        if pid != before:
            return pid
        time.sleep(0.2)
    raise TimeoutError(f"an actor of the pool did not come back within {grace_s + _RESTART_S:.0f}s of its restart")
