"""The agent workers a scheduler dispatches to: their handles, their slots and, with
`PoolConfig.autoscale`, their number.

A worker the autoscaler adds is a detached named actor (`{pool}-worker-N`, N counting on),
so it outlives a restart of the scheduler, which finds it again by name. One it removes is
first closed to new tasks, and killed once its running tasks have ended: scaling down never
cuts a run short. A worker that cannot start (no node has room and none is added within
`start_timeout_s`) is given up and the autoscaler may ask again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import ray

from agentpool.background import Background
from agentpool.config import PoolConfig
from agentpool.protocol import WorkerSpawn
from agentpool.scheduler.autoscale import WorkerScaler
from agentpool.scheduler.dispatch import LeastLoaded

log = logging.getLogger(__name__)

#: How often a closed worker is checked for its last task to end.
_DRAIN_POLL_S = 0.2
#: Pings of a worker whose process died, until it answers: timeout, first and longest gap.
_PROBE_TIMEOUT_S, _PROBE_FIRST_S, _PROBE_MAX_S = 30.0, 0.2, 5.0
_HISTORY = 3600


def _index_of(name: str) -> int:
    match = re.search(r"-(\d+)$", name)
    return int(match.group(1)) if match else -1


def worker_actor_names(config: PoolConfig, namespace: str) -> list[str]:
    """Every live agent worker of the pool, by index: those it started and those added since."""
    prefix = config.worker_name(0)[:-1]
    found = [
        e["name"]
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["namespace"] == namespace and e["name"].startswith(prefix)
    ]
    return sorted(found, key=_index_of)


class WorkerFleet:
    """Handles and slots of the agent workers, grown and shrunk by a `WorkerScaler`.

    Args:
        config: The pool's configuration (`autoscale`, `worker_concurrency`).
        worker_names: The workers the pool started.
        spawn: How to start another (built by the facade; None when the pool does not autoscale).
        namespace: Ray namespace of the named actors.
        on_capacity: Called when a new worker is ready to take tasks.
    """

    def __init__(
        self,
        config: PoolConfig,
        worker_names: list[str],
        spawn: WorkerSpawn | None,
        namespace: str,
        on_capacity: Callable[[], None],
    ) -> None:
        self.config = config
        self._spawn_spec = spawn
        self._namespace = namespace
        self._on_capacity = on_capacity
        names = list(worker_names)
        a = config.autoscale
        if a is not None:
            names += [n for n in worker_actor_names(config, namespace) if n not in names]  # after a restart of ours
        self.handles: list[Any] = [ray.get_actor(n, namespace=namespace) for n in names]
        self.names: list[str | None] = list(names)
        self.slots = LeastLoaded(len(self.handles), config.worker_concurrency)
        self._next = 1 + max((_index_of(n) for n in names), default=-1)
        self._scaler = (
            WorkerScaler(
                min_workers=a.min_workers,
                max_workers=a.max_workers,
                target_per_worker=a.target_loops_per_worker or 0.8 * config.worker_concurrency,
                upscale_delay_s=a.upscale_delay_s,
                downscale_delay_s=a.downscale_delay_s,
                tolerance=a.tolerance,
            )
            if a is not None
            else None
        )
        self.starting = 0
        self.draining: set[int] = set()
        #: The Ray node each worker runs on, as it said (`_learn_nodes`); what drains first.
        self.nodes: dict[int, str] = {}
        self._learning = False
        #: Workers whose process is being restarted in turn (`restart_in_turn`, an upgrade).
        self.restarting: set[int] = set()
        self.suspects: set[int] = set()
        self.desired = len(self.handles)
        self.history: deque[tuple[float, int]] = deque([(time.time(), len(self.handles))], maxlen=_HISTORY)
        self._tasks = Background()
        self._last_observed = float("-inf")

    @property
    def count(self) -> int:
        """Workers taking tasks now."""
        return self.slots.open_count

    def observe(self, now: float, demand: int) -> None:
        """Records the demand (loops running or queued) and starts or drains workers to follow it."""
        a = self.config.autoscale
        if self._scaler is None or a is None or now - self._last_observed < a.interval_s:
            return
        self._last_observed = now
        current = self.count + self.starting
        self.desired = self._scaler.decide(now, demand, current)
        for _ in range(self.desired - current):
            self._run(self._start_one(a.start_timeout_s))
        if any(i not in self.nodes for i, o in enumerate(self.slots.open) if o) and not self._learning:
            self._learning = True
            self._run(self._learn_nodes())
        if self.desired < current:
            drop = current - self.desired
            for index in self.slots.drain_order(self.nodes.get)[:drop]:
                self.slots.close(index)
                self.draining.add(index)
                self._run(self._drain(index))
            self._note()

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    async def _learn_nodes(self) -> None:
        """Asks the open workers whose node is not known yet where they run (a worker that
        does not answer is asked again at the next `observe`)."""
        try:
            for index, is_open in enumerate(list(self.slots.open)):
                if is_open and index not in self.nodes:
                    handle = self.handles[index]
                    with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
                        node = await asyncio.wait_for(handle.node.remote(), _PROBE_TIMEOUT_S)
                        if self.handles[index] is handle:  # not replaced meanwhile
                            self.nodes[index] = node
        finally:
            self._learning = False

    async def _start_one(self, timeout_s: float) -> None:
        assert self._spawn_spec is not None
        name = self.config.worker_name(self._next)
        self._next += 1
        self.starting += 1
        handle = None
        try:
            handle = self._spawn_spec.launch(name, lifetime="detached")
            await asyncio.wait_for(handle.ping.remote(), timeout_s)
        except (ray.exceptions.RayError, TimeoutError, ValueError) as exc:
            log.warning("agent worker %s did not start: %s", name, exc)
            if handle is not None:
                with contextlib.suppress(Exception):
                    ray.kill(handle, no_restart=True)
            return
        finally:
            self.starting -= 1
        index = self.slots.add()
        if index == len(self.handles):
            self.handles.append(handle)
            self.names.append(name)
        else:
            self.handles[index], self.names[index] = handle, name
        self._note()
        self._on_capacity()

    async def _drain(self, index: int) -> None:
        while self.slots.load[index]:  # noqa: ASYNC110 (the load is plain state, no event to wait on)
            await asyncio.sleep(_DRAIN_POLL_S)
        handle = self.handles[index]
        self.slots.retire(index)
        self.draining.discard(index)
        self.names[index] = None
        self.nodes.pop(index, None)
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)

    def suspect(self, index: int) -> None:
        """A call to this worker failed because its process died or cannot be reached: it
        gets no new tasks until it answers a ping again (Ray restarts it meanwhile)."""
        if index in self.draining or index in self.suspects or not self.slots.open[index]:
            return
        self.suspects.add(index)
        self.slots.close(index)
        self.nodes.pop(index, None)  # Ray may start it again on another node
        self._run(self._probe(index))

    async def _probe(self, index: int) -> None:
        handle = self.handles[index]
        delay = _PROBE_FIRST_S
        while True:
            try:
                await asyncio.wait_for(handle.ping.remote(), _PROBE_TIMEOUT_S)
                break
            except ray.exceptions.ActorDiedError as exc:  # a restarting actor answers once up
                log.warning("agent worker %s is gone for good: %s", self.names[index], exc)
                self.suspects.discard(index)
                return
            except (ray.exceptions.RayError, TimeoutError):
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, _PROBE_MAX_S)
        self.suspects.discard(index)
        if index not in self.draining and index not in self.restarting and not self.slots.open[index]:
            self.slots.reopen(index)
            self._on_capacity()

    async def restart_in_turn(self, grace_s: float) -> list[dict[str, Any]]:
        """Restarts each worker's process in turn, so that it runs the code installed now
        (an upgrade): its slots close (no new task), its running tasks get up to `grace_s`
        to end, Ray starts its process again (same name, same arguments; a task still
        running is sent elsewhere and resumes from its checkpoint), and its slots open once
        the new process answers. One at a time: the others take the work meanwhile."""
        done: list[dict[str, Any]] = []
        for index, name in enumerate(list(self.names)):
            if name is None or not self.slots.open[index] or index in self.draining or index in self.suspects:
                continue
            handle, began = self.handles[index], time.monotonic()
            self.slots.close(index)
            self.restarting.add(index)
            try:
                while self.slots.load[index] and time.monotonic() - began < grace_s:  # noqa: ASYNC110 (plain state)
                    await asyncio.sleep(_DRAIN_POLL_S)
                cut_short = self.slots.load[index]
                before = await asyncio.wait_for(handle.pid.remote(), _PROBE_TIMEOUT_S)
                self.nodes.pop(index, None)  # its new process may start on another node
                ray.kill(handle, no_restart=False)
                pid = await _new_process(handle, before)
            finally:
                self.restarting.discard(index)
                if index not in self.draining and index not in self.suspects and not self.slots.open[index]:
                    self.slots.reopen(index)
                    self._on_capacity()
            done.append(
                {"name": name, "pid": pid, "took_s": round(time.monotonic() - began, 3), "cut_short": cut_short}
            )
        return done

    def _note(self) -> None:
        self.history.append((time.time(), self.count))

    def snapshot(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "desired": self.desired,
            "starting": self.starting,
            "draining": len(self.draining),
            "restarting": len(self.suspects),
            "names": [n for i, n in enumerate(self.names) if n is not None and self.slots.open[i]],
            "history": [[round(t, 3), n] for t, n in list(self.history)[-120:]],
        }


async def _new_process(handle: Any, before: int) -> int:
    """Waits for a restarted actor to answer from a new process; its pid."""
    deadline = time.monotonic() + _PROBE_TIMEOUT_S * 4
    while True:
        with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
            pid = int(await asyncio.wait_for(handle.pid.remote(), _PROBE_TIMEOUT_S))
            if pid != before:
                return pid
        if time.monotonic() > deadline:
            raise TimeoutError(f"the actor did not come back from a restart in {_PROBE_TIMEOUT_S * 4:.0f}s")
        await asyncio.sleep(_PROBE_FIRST_S)
