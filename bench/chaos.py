"""`chaos`: a batch under random SIGKILLs of agent workers, tool executors and the scheduler.

The same batch runs twice through one pool: first undisturbed (the baseline), then while a
killer SIGKILLs a random victim every few seconds (at least one of each kind). Every task
is then reconciled against Redis (its results stream entries by task_id).

- `submitted`, `lost` (no final record), `duplicates` (more than one): goal lost = duplicates = 0.
- `kills` (and `kills_by_kind`), `refs_resolved`, `succeeded_fraction`.
- `resumed_from_checkpoint`: tasks that resumed from a checkpoint; `llm_calls_saved_by_resume`:
  the LLM turns those resumes did not send again.
- `slowdown_ratio`: the chaos phase's wall time over the baseline's; `llm_call_ratio`: LLM
  requests sent under chaos over the baseline's (work repeated because of the kills).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import ray
import redis

from agentpool import AgentPool, AgentResult, AgentTask, PoolConfig, SimulatorConfig
from agentpool.pool import NAMESPACE
from bench.report import _pyplot, write


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
    """SIGKILLs a random worker, executor or the scheduler every `every_s` seconds (each
    kind once first), until stopped; records (time, kind) per kill."""

    def __init__(self, config: PoolConfig, every_s: float, seed: int) -> None:
        super().__init__(daemon=True)
        self._config = config
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
            actor = ray.get_actor(c.worker_name(self._rng.randrange(c.num_workers)), namespace=NAMESPACE)
            return int(ray.get(actor.pid.remote(), timeout=60))
        if kind == "executor":
            name = f"{c.name}-tools-default-{self._rng.randrange(c.num_tool_executors)}"
            actor = ray.get_actor(name, namespace=NAMESPACE)
            return int(ray.get(actor.ping.remote(), timeout=60)["pid"])
        actor = ray.get_actor(f"{c.name}-scheduler", namespace=NAMESPACE)
        return int(ray.get(actor.pid.remote(), timeout=60))

    def run(self) -> None:
        order = ["worker", "executor", "scheduler"]
        self._rng.shuffle(order)
        while not self._halt.wait(self._every_s):
            kind = order.pop() if order else self._rng.choice(["worker", "worker", "executor", "scheduler"])
            try:
                os.kill(self._pid(kind), signal.SIGKILL)
            except (ray.exceptions.RayError, ProcessLookupError, TimeoutError):
                continue
            self.kills.append((time.monotonic() - self.started, kind))


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


def run(out: Path, quick: bool) -> dict[str, Any]:
    n = 300 if quick else 1500
    config = PoolConfig(
        name=f"bench-chaos-{uuid.uuid4().hex[:6]}",
        key_prefix=f"bench-chaos-{uuid.uuid4().hex[:6]}",
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
        killer = Killer(config, every_s=2.0 if quick else 3.0, seed=11)
        chaos_started = time.monotonic()
        results, chaos_done = _phase(pool, tasks, killer)
        chaos_wall = time.monotonic() - chaos_started
        client = redis.Redis.from_url(pool.redis_url, decode_responses=True)
        counts: Counter[str] = Counter(f["task_id"] for _, f in client.xrange(f"{config.key_prefix}:{{acme}}:results"))
        client.close()
        durability = pool.status()["durability"]
    ids = [t.task_id for t in tasks]
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
    }
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(sorted(clean_done), range(1, len(clean_done) + 1), label="baseline (no kills)")
    ax.plot(sorted(chaos_done), range(1, len(chaos_done) + 1), label="under kills")
    colours = {"worker": "tab:red", "executor": "tab:orange", "scheduler": "tab:purple"}
    for t, kind in killer.kills:
        ax.axvline(t, color=colours[kind], linestyle=":", alpha=0.8)
    for kind, colour in colours.items():
        ax.plot([], [], color=colour, linestyle=":", label=f"SIGKILL {kind}")
    ax.set_xlabel("seconds")
    ax.set_ylabel("tasks with their final result")
    ax.legend()
    ax.set_title(f"{n} tasks under random kills")
    fig.tight_layout()
    fig.savefig(out / "chaos_completions.png", dpi=110)
    plt.close(fig)
    notes = (
        f"{n} tasks of four turns (two calculator calls and a 0.4 s nap between), 3 workers x 16 loops, "
        "2 tool executors, simulated provider at ~30 ms. Kills are SIGKILLs of the victim's process, "
        "every few seconds while the first 90% of the batch runs. Baseline: the same batch, same pool, "
        "no kills, just before."
    )
    cfg = {"quick": quick, "tasks": n, "every_s": killer._every_s, "workers": 3, "concurrency": 16}
    write(out, "chaos", figures=figures, notes=notes, config=cfg, plots=["chaos_completions.png"])
    return figures
