"""`chaos`: a batch under random SIGKILLs of agent workers, tool executors, the scheduler and
the Redis primary.

The pool's Redis is a primary with two replicas under three sentinels (`redis+sentinel://`,
`redis_wait_replicas=1`; `tests/redis_ha.py`). The same batch runs twice through one pool:
first undisturbed (the baseline), then while a killer SIGKILLs a random victim every few
seconds (at least one of each kind; the Redis primary once: a replica is promoted, and the
killed server comes back as a replica). Every task is then reconciled against Redis (its
results stream entries by task_id, on the primary of the end).

- `submitted`, `lost` (no final record), `duplicates` (more than one): goal lost = duplicates = 0.
- `kills` (and `kills_by_kind`), `refs_resolved`, `succeeded_fraction`.
- `resumed_from_checkpoint`: tasks that resumed from a checkpoint; `llm_calls_saved_by_resume`:
  the LLM turns those resumes did not send again.
- `slowdown_ratio`: the chaos phase's wall time over the baseline's; `llm_call_ratio`: LLM
  requests sent under chaos over the baseline's (work repeated because of the kills).
- `recover_s_by_kind`: a third run of the batch (sized to the baseline's rate) with one kill
  of each kind, a few seconds apart: per kind, the seconds from the kill to the end of the
  last 2 s window, before the next kill, in which fewer tasks ended than half the
  baseline's rate (the pool goes on through a Redis outage, its records waiting in the
  outboxes); `redis_failover_s`: from the primary's kill until the sentinels name a new
  one; `redis_caught_up_s`: until no record waits in an outbox any more. Lost and
  duplicated tasks count both chaotic runs.
"""

from __future__ import annotations

import bisect
import math
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from agentpool import AgentPool, AgentResult, AgentTask, PoolConfig, SimulatorConfig
from agentpool.pool import NAMESPACE
from bench.report import _pyplot, write
from tests.redis_ha import SentinelGroup

#: A recovery ends when tasks end at this share of the baseline's rate again, over windows
#: of this length (completions come in steps: a shorter window reads those as stalls).
_RECOVERED_SHARE, _WINDOW_S = 0.5, 2.0
#: The recovery phase's kills, in this order, one every few seconds.
_PLAN = ["worker", "executor", "scheduler", "redis"]


def _tasks(n: int, tag: str) -> list[AgentTask]:
    """Four turns each: a calculation, a nap, another calculation, an answer (~1 s in all)."""
    return [
        AgentTask(
            tenant="acme",
            prompt=(
                f'sim: tool calculator {{"expression": "{i}*7"}}\n'
                f'sim: tool nap {{"seconds": 0.4}}\n'
                f'sim: tool calculator {{"expression": "{i}*7+1"}}\n'
                f"sim: answer {tag} {i}"
            ),
            tools=["calculator", "nap"],
            timeout_s=300,
        )
        for i in range(n)
    ]


class Killer(threading.Thread):
    """SIGKILLs a random worker, executor, the scheduler or the Redis primary every `every_s`
    seconds (each kind once first), until stopped; or, with a `plan`, the kinds it lists in
    turn, one every `every_s` seconds, then stops. Records (time, kind) per kill."""

    def __init__(
        self,
        config: PoolConfig,
        every_s: float,
        seed: int,
        redis_ha: SentinelGroup,
        pending: Callable[[], int],
        plan: list[str] | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self._plan = None if plan is None else list(reversed(plan))
        self._config = config
        self._ha = redis_ha
        self._pending = pending
        #: Seconds from each kill of the Redis primary until the sentinels named a new one,
        #: and until no write waited in the pool's outboxes any more.
        self.failovers: list[float] = []
        self.caught_up: list[float] = []
        self._every_s = every_s
        self._rng = random.Random(seed)
        self._halt = threading.Event()
        self.kills: list[tuple[float, str]] = []
        self.started = time.monotonic()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def _pid(self, kind: str) -> int:
        c = self._config
        if kind == "worker":
            name = c.worker_name(self._rng.randrange(c.num_workers))
        elif kind == "executor":
            name = f"{c.name}-tools-default-{self._rng.randrange(c.num_tool_executors)}"
        else:
            name = f"{c.name}-scheduler"
        return int(ray.get(ray.get_actor(name, namespace=NAMESPACE).pid.remote(), timeout=60))

    def run(self) -> None:
        order = ["worker", "executor", "scheduler", "redis"]
        self._rng.shuffle(order)
        while not self._halt.wait(self._every_s):
            if self._plan is not None and not self._plan:
                return
            if self._plan is not None:
                kind = self._plan.pop()
            else:
                kind = order.pop() if order else self._rng.choice(["worker", "worker", "executor", "scheduler"])
            try:
                if kind == "redis":
                    self._kill_redis()
                else:
                    os.kill(self._pid(kind), signal.SIGKILL)
                    self.kills.append((time.monotonic() - self.started, kind))
            except (ray.exceptions.RayError, ProcessLookupError, TimeoutError):
                continue

    def _kill_redis(self) -> None:
        """SIGKILLs the primary, waits for the failover, then starts the killed server again
        (the sentinels make it a replica of the new primary)."""
        old = self._ha.kill_primary()
        at = time.monotonic()
        self.kills.append((at - self.started, "redis"))
        self._ha.wait_failover(old)
        self.failovers.append(time.monotonic() - at)
        next(node for node in self._ha.nodes if node.port == old).start()
        deadline = time.monotonic() + 60
        while self._pending() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.caught_up.append(time.monotonic() - at)


def _phase(pool: AgentPool, tasks: list[AgentTask], killer: Killer | None) -> tuple[list[AgentResult], list[float]]:
    started = time.monotonic()
    refs = pool.submit(tasks)
    if killer is not None:
        killer.start()
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[AgentResult | None] = [None] * len(refs)
    done_at: list[float] = []
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=min(len(pending), 20), timeout=0.2)
        for ref, value in zip(ready, ray.get(ready), strict=True):
            results[index[ref]] = value
            done_at.append(time.monotonic() - started)
        if killer is not None and len(pending) < len(refs) * 0.1:
            killer.stop()  # keep the tail for recovery: every kill must land mid-batch
            killer = None
    if killer is not None:
        killer.stop()
    return [r for r in results if r is not None], done_at


def _recover_s(kill_at: float, until: float, done_at: list[float], rate: float) -> float:
    """Seconds from a kill until the last `_WINDOW_S` window (before `until`: the next kill,
    or the spacing's end) in which fewer tasks ended than `_RECOVERED_SHARE` of `rate` (tasks/s): the
    time the pool took to run at speed again, for good. 0 if it never slowed down; `until -
    kill_at` if it had not recovered by then."""
    need = max(1, round(_RECOVERED_SHARE * rate * _WINDOW_S))
    ends = sorted(t for t in done_at if kill_at <= t <= until)
    slow_until = kill_at
    start = kill_at
    while start + _WINDOW_S <= until:
        if bisect.bisect_right(ends, start + _WINDOW_S) - bisect.bisect_left(ends, start) < need:
            slow_until = start + _WINDOW_S
        start += 0.05
    return round(slow_until - kill_at, 3)


#: A kind of kill's colour in the plots.
_COLOURS = {"worker": "tab:red", "executor": "tab:orange", "scheduler": "tab:purple", "redis": "tab:green"}


def _plot(
    path: Path,
    title: str,
    curves: dict[str, list[float]],
    kills: list[tuple[float, str]],
    recoveries: dict[str, float] | None = None,
) -> None:
    """Tasks ended over time, one curve per run, with a dotted line at each kill (and, given
    `recoveries`, the time until recovered shaded after it)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for label, done_at in curves.items():
        ax.plot(sorted(done_at), range(1, len(done_at) + 1), label=label)
    for t, kind in kills:
        ax.axvline(t, color=_COLOURS[kind], linestyle=":", alpha=0.8)
        if recoveries is not None:
            ax.axvspan(t, t + recoveries[kind], color=_COLOURS[kind], alpha=0.15)
    shaded = " (shaded: until recovered)" if recoveries is not None else ""
    for kind, colour in _COLOURS.items():
        ax.plot([], [], color=colour, linestyle=":", label=f"SIGKILL {kind}{shaded}")
    ax.set_xlabel("seconds")
    ax.set_ylabel("tasks with their final result")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Path, quick: bool) -> dict[str, Any]:
    n = 400 if quick else 1500
    with SentinelGroup() as ha:
        config = PoolConfig(
            name=f"bench-chaos-{uuid.uuid4().hex[:6]}",
            key_prefix=f"bench-chaos-{uuid.uuid4().hex[:6]}",
            redis_url=ha.url,
            redis_wait_replicas=1,
            tool_modules=["tests.toolkit"],
            simulator=SimulatorConfig(latency_ms=30, latency_sigma=0.3, seed=5),
            num_workers=3,
            worker_concurrency=16,
            num_tool_executors=2,
        )
        with AgentPool.start(config) as pool:
            clean_started = time.monotonic()
            clean, clean_done = _phase(pool, _tasks(n, "clean"), None)
            clean_wall = time.monotonic() - clean_started
            tasks = _tasks(n, "chaos")
            killer = Killer(
                config,
                every_s=2.0,
                seed=11,
                redis_ha=ha,
                pending=lambda: int(pool.status()["redis"]["pending_writes"]),
            )
            chaos_started = time.monotonic()
            results, chaos_done = _phase(pool, tasks, killer)
            chaos_wall = time.monotonic() - chaos_started
            durability = pool.status()["durability"]
            # Recovery: one kill of each kind, far enough apart that each is over before the next.
            rate = len(clean_done) / max(1e-9, clean_wall)
            spacing = 5.0  # the same in a quick run: a recovery is capped at it
            isolated = _tasks(int(rate * spacing * (len(_PLAN) + 1.5)), "isolated")
            lone = Killer(config, spacing, 11, ha, lambda: int(pool.status()["redis"]["pending_writes"]), plan=_PLAN)
            isolated_results, isolated_done = _phase(pool, isolated, lone)
            deadline = time.monotonic() + 60  # records that waited out a Redis outage: in Redis first
            while pool.status()["redis"]["pending_writes"] and time.monotonic() < deadline:
                time.sleep(0.2)
            with ha.client() as client:
                stream = f"{config.key_prefix}:{{acme}}:results"
                counts: Counter[str] = Counter(f["task_id"] for _, f in client.xrange(stream))
            status = pool.status()
    marks = [at for at, _ in lone.kills] + [math.inf]
    recoveries = {
        kind: _recover_s(at, min(marks[i + 1], at + spacing), isolated_done, rate)
        for i, (at, kind) in enumerate(lone.kills)
    }
    ids = [t.task_id for t in (*tasks, *isolated)]
    kinds = Counter(kind for _, kind in killer.kills)
    figures: dict[str, Any] = {
        "submitted": len(tasks),
        "lost": sum(1 for t in ids if counts[t] == 0),
        "duplicates": sum(counts[t] - 1 for t in ids if counts[t] > 1),
        "kills": len(killer.kills),
        "kills_by_kind": dict(kinds),
        "refs_resolved": len(results),
        "succeeded_fraction": round(sum(r.ok for r in results) / len(tasks), 4),
        "resumed_from_checkpoint": sum(1 for r in results if r.resumes),
        "llm_calls_saved_by_resume": sum(r.llm_calls_saved for r in results),
        "redispatched": durability.get("redispatched", 0),
        "slowdown_ratio": round(chaos_wall / clean_wall, 3),
        "llm_call_ratio": round(sum(r.llm_attempts for r in results) / max(1, sum(r.llm_attempts for r in clean)), 3),
        "statuses": dict(Counter(r.status for r in results)),
        "errors": dict(Counter(f"{r.error.type}: {r.error.message[:80]}" for r in results if r.error is not None)),
        "recover_s_by_kind": dict(sorted(recoveries.items())),
        "redis_failover_s": round(lone.failovers[0], 3) if lone.failovers else None,
        "redis_caught_up_s": round(lone.caught_up[0], 3) if lone.caught_up else None,
        "isolated_tasks": len(isolated),
        "isolated_succeeded_fraction": round(sum(r.ok for r in isolated_results) / len(isolated), 4),
        "unreplicated_writes": status["redis"].get("unreplicated", 0),
    }
    _plot(
        out / "chaos_completions.png",
        f"{n} tasks under random kills",
        {"baseline (no kills)": clean_done, "under kills": chaos_done},
        killer.kills,
    )
    _plot(
        out / "chaos_recovery.png",
        f"{len(isolated)} tasks, one kill of each kind {spacing:g} s apart",
        {"one kill of each kind": isolated_done},
        lone.kills,
        recoveries,
    )
    notes = (
        f"{n} tasks of four turns (two calculator calls and a 0.4 s nap between), 3 workers x 16 loops, "
        "2 tool executors, simulated provider at ~30 ms, Redis a primary and two replicas under three "
        "sentinels (WAIT 1 on admissions and records). Kills are SIGKILLs of the victim's process, "
        "every few seconds while the first 90% of the batch runs (the Redis primary once). Baseline: "
        "the same batch, same pool, no kills, just before. Recovery, in a third run: one kill of each "
        "kind a few seconds apart, and from each kill to the end of the last 2 s window before the "
        "next in which fewer tasks ended than half the baseline's rate."
    )
    cfg = {"quick": quick, "tasks": n, "every_s": killer._every_s, "recovery_spacing_s": spacing, "workers": 3}
    plots = ["chaos_completions.png", "chaos_recovery.png"]
    write(out, "chaos", figures=figures, notes=notes, config={**cfg, "concurrency": 16}, plots=plots)
    return figures
